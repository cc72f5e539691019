"""ContinualTrainer: the method of ``hyperlora.method`` run over a task sequence, one task after another, with
checkpoints, evaluation against the frozen baselines, and the protocol's multi-seed recipe runner (``recipe``)."""

from .callbacks import TrainerCallback
from .trainer import ContinualTrainer, ContinualTrainingArguments

__all__ = ["ContinualTrainer", "ContinualTrainingArguments", "TrainerCallback"]
