"""Hooks into ``ContinualTrainer.fit``, as transformers' ``TrainerCallback`` hooks into ``Trainer.train``: code that
runs between tasks or steps (a comparison trained side by side, a custom log) without a copy of the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .state import RunState

if TYPE_CHECKING:
    from .trainer import ContinualTrainer


class TrainerCallback:
    """Subclass and override what you need; every hook does nothing by default."""

    def on_task_begin(self, trainer: ContinualTrainer, t: int, state: RunState) -> None:
        """Task ``t`` is about to start (before its frozen features, H-embedding and training)."""

    def on_step_end(self, trainer: ContinualTrainer, t: int, step: int, state: RunState) -> None:
        """Task ``t`` took its optimizer step ``step`` (from 1). Time spent here counts in the task's ``train_s``."""

    def on_task_end(self, trainer: ContinualTrainer, t: int, state: RunState) -> None:
        """Task ``t`` is trained, evaluated and checkpointed: ``state`` holds its results and timings."""
