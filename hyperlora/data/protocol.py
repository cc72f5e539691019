"""The class-incremental benchmark protocol: one image classification dataset cut into a reproducible task sequence.

The split (when the dataset has no test split), the class order and every task's classes are returned as a plain
dict so a recipe can write them beside its results: another run, or another library, can rebuild the same sequence.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .tasks import Task

CLASS_ORDER_SEED = 1993


def load_image_dataset(
    source: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
):
    """A ``datasets.DatasetDict`` with ``image`` and integer ``label`` columns, from a Hub id or a local folder.

    A local directory is read as an ``imagefolder`` (one sub-folder per class, optionally under train/ and test/;
    its columns are always image and label); anything else is a Hub dataset id. String labels (e.g. WordNet ids)
    are encoded to integers in sorted order. A source that can only be a path (``./data6``, ``/data/x``, or
    ``data/x`` where ``data/`` is a local folder) and does not exist is refused without asking the Hub.
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.is_dir():
        splits = load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        if "label" not in next(iter(splits.values())).column_names:  # imagefolder labels only two or more folders
            raise ValueError(
                f"{source} has no classes to learn: put its images in one sub-folder per class (two or more), "
                "optionally under train/ and test/"
            )
        image_column, label_column = "image", "label"
    elif _is_path(source):
        raise FileNotFoundError(
            f"{source}: {path.absolute()} {'is not a folder' if path.exists() else 'does not exist'}"
        )
    else:
        try:
            splits = load_dataset(source, name, revision=revision, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as error:  # the Hub's DatasetNotFoundError is a FileNotFoundError
            raise FileNotFoundError(
                f"{source}: {path.absolute()} does not exist, and the Hub did not give the dataset: {error}"
            ) from error
    return standardise_columns(splits, image_column, label_column, source=source)


def _is_path(source: str) -> bool:
    """Whether ``source`` can only mean a local path: not a Hub id, or a Hub-like id whose first part is local."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return Path(source).exists() or ("/" in source and Path(source.split("/")[0]).is_dir())


def standardise_columns(splits, image_column: str, label_column: str, *, source: str = "the dataset"):
    """Keep only the image and label columns, named ``image`` and ``label``, with integer labels."""
    for split, dataset in splits.items():
        missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{source}: split {split!r} has no column {missing[0]!r} (columns: {dataset.column_names}); "
                "set image_column / label_column"
            )
    keep = {image_column, label_column}
    splits = splits.remove_columns([c for c in next(iter(splits.values())).column_names if c not in keep])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    if renames:
        splits = splits.rename_columns(renames)
    if next(iter(splits.values())).features["label"].dtype == "string":
        splits = splits.class_encode_column("label")
    return splits


def train_test_split(
    splits, train_split: str, test_split: str | None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Any, Any, dict[str, Any]]:
    """The train and test sets: the dataset's own test split, or a per-class ``test_fraction`` of ``train_split``.

    A dataset with a single split (a flat image folder, ImageNet-R) uses it as the pool whatever its name. Returns
    the sets with a record of how they were made (the test indices, for a generated split).
    """
    if len(splits) == 1:
        train_split = next(iter(splits))
        test_split = None
    if train_split not in splits:
        raise ValueError(f"no split {train_split!r} in the dataset (splits: {list(splits)})")
    train = splits[train_split]
    if test_split is not None:
        if test_split not in splits:
            raise ValueError(f"no split {test_split!r} in the dataset (splits: {list(splits)})")
        return train, splits[test_split], {"train_split": train_split, "test_split": test_split}
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(train["label"])
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: max(1, round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(len(labels)), test)
    record = {
        "train_split": train_split,
        "test_split": None,
        "test_fraction": test_fraction,
        "split_seed": seed,
        "test_indices": test.tolist(),
    }
    return train.select(train_indices), train.select(test), record


def class_order(classes: list[int], seed: int | None = CLASS_ORDER_SEED, order: list[int] | None = None) -> list[int]:
    """The order classes arrive in: ``order`` if given (checked), else a seeded shuffle (``seed=None``: sorted).

    ``np.random.seed(1993); np.random.permutation(n)`` is the order most continual-learning code bases use.
    """
    classes = sorted(int(c) for c in classes)
    if order is not None:
        if sorted(order) != classes:
            counts = Counter(order)
            raise ValueError(
                f"class_order must list each of the {len(classes)} classes once: missing "
                f"{sorted(set(classes) - set(order))[:10]}, unknown {sorted(set(order) - set(classes))[:10]}, "
                f"repeated {sorted(c for c, n in counts.items() if n > 1)[:10]}"
            )
        return [int(c) for c in order]
    if seed is None:
        return classes
    return [classes[i] for i in np.random.RandomState(seed).permutation(len(classes))]


def split_into_tasks(
    train,
    test,
    num_tasks: int,
    order: list[int],
    *,
    max_train_per_class: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Cut ``order`` into ``num_tasks`` equal groups of classes, one Task each (its classes keep their labels)."""
    if num_tasks < 1 or len(order) % num_tasks:
        raise ValueError(f"{len(order)} classes cannot be cut into {num_tasks} tasks of equal size")
    size = len(order) // num_tasks
    train_labels, test_labels = np.asarray(train["label"]), np.asarray(test["label"])
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        classes = order[t * size : (t + 1) * size]
        train_indices = []
        for label in classes:
            members = np.flatnonzero(train_labels == label)
            if max_train_per_class is not None:
                members = np.sort(rng.permutation(members)[:max_train_per_class])
            train_indices.append(members)
        train_indices = np.sort(np.concatenate(train_indices))
        test_indices = np.flatnonzero(np.isin(test_labels, classes))
        tasks.append(Task(f"task-{t:02d}", train.select(train_indices), test.select(test_indices)))
    return tasks


def class_names(dataset) -> list[str] | None:
    feature = dataset.features["label"]
    return list(feature.names) if hasattr(feature, "names") else None
