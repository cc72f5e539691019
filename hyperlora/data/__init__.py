"""Tasks as Hugging Face datasets (``tasks``), the benchmark protocol that splits a dataset into them (``protocol``),
and offline sequences with known relations (``structured``)."""

from .tasks import IMAGENET_MEAN, IMAGENET_STD, ImageSpec, Task, TaskImages, image_spec, pooled_features

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageSpec", "Task", "TaskImages", "image_spec", "pooled_features"]
