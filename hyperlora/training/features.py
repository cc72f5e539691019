"""What the trainer reads: a task split as model inputs (kept decoded while it fits in memory) and its pooled
features under any task's adapter or the frozen backbone, gathered across processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from peft import PeftModel

from ..data import Task, TaskImages, pooled_features
from ..data.tasks import ImageSpec
from .arguments import ContinualTrainingArguments
from .prefix import FrozenPrefix

# Decoded unaugmented images kept in memory: test splits are read at every evaluation, a training split every epoch
# (without augmentation), and decoding is a fifth of a small run's time. Splits past the budget are read as they come.
IMAGE_CACHE_BYTES = 1 << 30


class FeatureReader:
    """Loaders and features of the tasks' splits for one model on one accelerator.

    The frozen backbone's test features are computed once per batch and kept: the backbone never changes, and
    every later evaluation reads them again.
    """

    def __init__(
        self, model: PeftModel, accelerator: Accelerator, args: ContinualTrainingArguments, spec: ImageSpec
    ) -> None:
        self.model, self.accelerator, self.args, self.spec = model, accelerator, args, spec
        self._frozen_test: dict[int, list[torch.Tensor]] = {}  # the frozen backbone's test features, per task
        self._decoded: dict[tuple[str, str], tuple[TaskImages, int]] = {}  # (task, split) -> cached images, bytes

    def release(self, task: Task, split: str) -> None:
        """Drop a split's decoded images: it will be read no more."""
        self._decoded.pop((task.name, split), None)

    def frozen_test_batch(self, t: int, b: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's features of batch b of task t's test loader (this process's share), computed the
        first time the batch is seen: the backbone never changes, and every later evaluation reads them again."""
        cached = self._frozen_test.setdefault(t, [])
        if b == len(cached):
            cached.append(self.forward(pixel_values, None))
        return cached[b]

    def forward(self, pixel_values: torch.Tensor, task_ids, exact: bool = False) -> torch.Tensor:
        """Pooled features under the given tasks' adapters; the frozen backbone's (``task_ids=None``) and ``exact``
        ones in full precision: statistics and H-scores must not see mixed precision's rounding."""
        if task_ids is None:
            with self.model.disable_adapter():
                return pooled_features(self.model(pixel_values)).float()
        with self.accelerator.autocast() if not exact else torch.autocast(pixel_values.device.type, enabled=False):
            return pooled_features(self.model(pixel_values, task_ids=task_ids)).float()

    def features(
        self,
        loader,
        task_id: int | None,
        exact: bool = False,
        prefix: Callable[[int, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a whole loader under one task's adapter (None: the frozen backbone), gathered; with a
        ``prefix`` (a ``FrozenPrefix`` or one of its parts) that has seen the loader's batches, only through the
        adapted blocks."""
        self.model.eval()
        features, labels = [], []
        with torch.no_grad():
            for b, (pixel_values, batch_labels) in enumerate(loader):
                if prefix is None:
                    batch = self.forward(pixel_values, task_id, exact)
                else:
                    batch = prefix(b, lambda x=pixel_values: self.forward(x, task_id, exact))
                if not isinstance(loader, _OnDevice):
                    batch, batch_labels = self.accelerator.gather_for_metrics((batch, batch_labels))
                features.append(batch)
                labels.append(batch_labels)
        return torch.cat(features), torch.cat(labels)

    def frozen_features(
        self, task: Task, first: Sequence[Sequence[int]] = (), prefix: FrozenPrefix | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen backbone's features of a task's training split, gathered, in the split's order. The images of
        ``first`` (lists of indices) are read first and unsharded, by every process, through ``prefix`` as its parts
        0, 1, ...: the frozen prefix of the images that every old task's adapter will read again."""
        if not first:
            return self.features(self.loader(task, "train"), None)
        taken = {i for part in first for i in part}
        rest = [i for i in range(len(task.train)) if i not in taken]
        reads = [
            (part, self.features(self.loader(task, "train", indices=part, shard=False), None, prefix=prefix.part(p)))
            for p, part in enumerate(first)
        ]
        if rest:
            reads.append((rest, self.features(self.loader(task, "train", indices=rest), None)))
        features = reads[0][1][0].new_empty(len(task.train), reads[0][1][0].shape[1])
        labels = reads[0][1][1].new_empty(len(task.train))
        for rows, (part_features, part_labels) in reads:
            index = torch.as_tensor(rows, device=features.device)
            features[index], labels[index] = part_features, part_labels
        return features, labels

    def feature_dim(self, task: Task) -> int:
        pixel_values, _ = next(iter(self.loader(task, "test", shard=False)))
        with torch.no_grad():
            return self.forward(pixel_values[:1].to(self.accelerator.device), None).shape[1]

    def images(self, task: Task, split: str, augment: bool) -> TaskImages:
        """The split as model inputs; unaugmented, it is kept decoded while it fits ``IMAGE_CACHE_BYTES``."""
        if augment or self.args.dataloader_num_workers > 0:  # workers would fill copies of the cache
            return TaskImages(getattr(task, split), self.spec.transform(augment), task.classes)
        if (task.name, split) in self._decoded:
            return self._decoded[task.name, split][0]
        dataset = getattr(task, split)
        size = len(dataset) * 3 * self.spec.size**2 * 4
        cache = sum(size for _, size in self._decoded.values()) + size <= IMAGE_CACHE_BYTES
        images = TaskImages(dataset, self.spec.transform(), task.classes, cache=cache)
        if cache:
            self._decoded[task.name, split] = images, size
        return images

    def loader(self, task: Task, split: str, *, indices=None, augment=False, shuffle=False, shard=True, seed=0):
        dataset = self.images(task, split, augment)
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, list(indices))
        batch_size = (
            self.args.per_device_train_batch_size
            if split == "train" and shuffle
            else self.args.per_device_eval_batch_size
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.args.dataloader_num_workers,
            # its own generator, even unshuffled (a worker's seed): reading never moves the global RNG, so how
            # much the trainer reads (old tasks, evaluations) does not change how it trains
            generator=torch.Generator().manual_seed(seed),
        )
        if shard:
            return self.accelerator.prepare_data_loader(loader)
        if not shuffle:
            return _OnDevice(loader, self.accelerator.device)
        return loader


class _OnDevice:
    """An unsharded loader whose batches land on the accelerator's device (every process reads all of it)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for pixel_values, labels in self.loader:
            yield pixel_values.to(self.device), labels.to(self.device)
