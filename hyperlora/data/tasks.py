"""Tasks as Hugging Face datasets, and the image transform a backbone expects."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Task:
    """One step of a continual sequence: a train and a test ``datasets.Dataset`` with ``image`` and ``label``, and
    optionally a validation one (where settings are chosen, so that the test split is only ever reported)."""

    name: str
    train: object
    test: object
    validation: object | None = None
    classes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        splits = (("train", self.train), ("test", self.test), ("validation", self.validation))
        for split, dataset in splits:
            if dataset is None and split == "validation":
                continue
            columns = getattr(dataset, "column_names", None)
            if columns is None or "image" not in columns or "label" not in columns:
                raise ValueError(
                    f"task {self.name!r}: the {split} split must be a datasets.Dataset with 'image' and 'label' "
                    f"columns, got columns {columns}"
                )
            if len(dataset) == 0:
                raise ValueError(f"task {self.name!r}: the {split} split is empty")
        self.classes = sorted(set(_labels(self.train, f"task {self.name!r}: the train split")))
        for split, dataset in splits[1:]:
            if dataset is None:
                continue
            unknown = sorted(set(_labels(dataset, f"task {self.name!r}: the {split} split")) - set(self.classes))
            if unknown:
                raise ValueError(f"task {self.name!r}: {split} labels {unknown[:10]} never occur in the train split")
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r}: needs at least 2 classes, the train split has {self.classes}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _labels(dataset, where: str) -> list[int]:
    labels = list(dataset["label"])
    bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, int) or label < 0]
    if bad:
        raise ValueError(f"{where} has labels that are not non-negative integers: {bad[:10]}")
    return labels


@dataclass(frozen=True)
class ImageSpec:
    """What the backbone expects: square input size and normalisation."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self, augment: bool = False) -> Callable:
        resize = (
            [transforms.RandomResizedCrop(self.size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip()]
            if augment
            else [transforms.Resize(self.size), transforms.CenterCrop(self.size)]
        )
        return transforms.Compose([_to_rgb, *resize, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])


def _to_rgb(image):
    """Any PIL mode (grayscale, palette, RGBA, 16-bit, float) becomes RGB; anything else is refused by name."""
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"expected a PIL image in the 'image' column (a datasets.Image() feature), got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot use an empty image of size {image.size}")
    return image.convert("RGB")


def image_spec(model: nn.Module, size: int | None = None) -> ImageSpec:
    """Read input size and normalisation off a timm model, a transformers model or a ``pretrained_cfg`` dict."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    hf_config = getattr(base, "config", None)
    if size is None:
        patch_embed_size = getattr(getattr(base, "patch_embed", None), "img_size", None)
        if patch_embed_size is not None:
            size = int(patch_embed_size[0])
        elif getattr(hf_config, "image_size", None) is not None:
            size = int(hf_config.image_size)
        else:
            size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if hf_config is not None and not cfg:  # transformers ViT image processors normalise with 0.5 / 0.5
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return ImageSpec(size=size, mean=mean, std=std)


class TaskImages(torch.utils.data.Dataset):
    """A task split as (pixel_values, local label) pairs; local labels index the task's sorted classes.

    ``cache`` keeps every item once transformed (only for a deterministic transform): a split read every epoch and
    at every evaluation is then decoded once. The cache lives in this object, so it helps loaders without workers.
    """

    def __init__(
        self,
        dataset,
        transform: Callable,
        classes: Sequence[int],
        indices: Sequence[int] | None = None,
        *,
        cache: bool = False,
    ):
        self.dataset = dataset
        self.transform = transform
        self.local = {label: i for i, label in enumerate(classes)}
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self._cached: dict[int, tuple[torch.Tensor, int]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = self.indices[i]
        if self._cached is not None and index in self._cached:
            return self._cached[index]
        example = self.dataset[index]
        label = example["label"]
        if label not in self.local:  # a bare KeyError(7) would not say whose label it is
            raise ValueError(f"example {index} has label {label!r}, not one of this task's {list(self.local)}")
        item = self.transform(example["image"]), self.local[label]
        if self._cached is not None:
            self._cached[index] = item
        return item


def pooled_features(output) -> torch.Tensor:
    """Pooled pre-logits features from a timm model (a tensor) or a transformers ViT output (the CLS token)."""
    if isinstance(output, torch.Tensor):
        if output.ndim != 2:
            raise ValueError(
                f"the backbone must return pooled features (batch, dim), got shape {tuple(output.shape)}: "
                "create timm models with num_classes=0"
            )
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(
            f"cannot read pooled features from a {type(output).__name__}: the backbone must return features, as a "
            "transformers base model (ViTModel, not ViTForImageClassification) or a timm model with num_classes=0 do"
        )
    return hidden[:, 0]
