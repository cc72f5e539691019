"""``hyperlora.trainer``, the import path of :mod:`hyperlora.training` that users write."""

from .training import ContinualTrainer, ContinualTrainingArguments

__all__ = ["ContinualTrainer", "ContinualTrainingArguments"]
