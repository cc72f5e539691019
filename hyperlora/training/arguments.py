"""The trainer's arguments, in transformers' names, and which of them a resume may change."""

from __future__ import annotations

from dataclasses import dataclass

# Training arguments a resume may change: where and how a run reports, not what it computes (see check_resume).
RESUME_SAFE_ARGUMENTS = (
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "logging_steps",
    "report_to",
    "plots",
    "per_device_eval_batch_size",
    "dataloader_num_workers",
)


@dataclass
class ContinualTrainingArguments:
    """How to train each task; the method's own switches live in HyperLoraConfig.

    ``resume_from_checkpoint`` continues the run in ``output_dir`` after its last finished task. The checkpoint
    records these arguments, and a resume that changes any of them is refused, except ``output_dir``,
    ``resume_from_checkpoint``, ``overwrite_output_dir``, ``logging_steps``, ``report_to``, ``plots``,
    ``per_device_eval_batch_size`` and ``dataloader_num_workers``, which do not change the results.
    ``embedding_learning_rate`` is the new task embedding's (None: ``learning_rate``). ``eval_curve_points`` > 0
    evaluates each task's test accuracy that many times, evenly, during its training: ``learning_curves`` in
    metrics.json, from which benchmarks read how fast a task learns. A fresh run into
    an ``output_dir`` that holds checkpoints is refused unless ``overwrite_output_dir`` is set (then the old
    checkpoints are deleted when it starts).
    """

    output_dir: str = "outputs"
    num_train_epochs: int = 2
    max_steps_per_task: int | None = None
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 128
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-2
    embedding_learning_rate: float | None = None
    eval_curve_points: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # None: whatever `accelerate launch` / `accelerate config` chose
    seed: int = 0
    image_size: int | None = None
    augment: bool = False
    dataloader_num_workers: int = 0
    resume_from_checkpoint: bool = False
    overwrite_output_dir: bool = False
    report_to: str | None = None
    logging_steps: int = 20
    plots: bool = True

    def __post_init__(self) -> None:
        if self.report_to in ("", "none"):  # the command-line spelling of "no trackers"
            self.report_to = None
        if self.eval_curve_points < 0:
            raise ValueError(f"eval_curve_points must be >= 0, got {self.eval_curve_points}")
        for name in (
            "num_train_epochs",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_task is not None and self.max_steps_per_task < 1:
            raise ValueError(f"max_steps_per_task must be >= 1 or None, got {self.max_steps_per_task}")
        rates = (self.learning_rate, self.head_learning_rate, self.embedding_learning_rate or self.learning_rate)
        if not all(rate > 0 for rate in rates):
            raise ValueError("learning rates must be > 0")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or None, got {self.mixed_precision!r}")
