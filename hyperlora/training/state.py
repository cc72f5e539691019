"""The run's state: what a checkpoint records of the tasks done so far, typed, with its JSON form (state.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# The frozen-feature classifiers every run reports beside its own accuracy (hyperlora.evaluation.baselines).
FROZEN_CLASS_INCREMENTAL = ("ncm", "lda")

Row = list[float]  # one value per task; NaN until measured
Matrix = list[Row]  # [i][j]: after training task i, on task j


@dataclass
class RunState:
    """Per-task results and the method's diagnostics, filled task by task; ``completed`` tasks are final."""

    completed: int
    task_names: list[str]
    task_il: Matrix
    class_il: Matrix
    h_scores: Matrix
    h_score_reference: Matrix  # [t][i]: the frozen backbone's score in old task i's place (head / pooled features)
    h_score_beats_reference: Matrix  # [t][i]: share of resamples in which old task i beats it
    h_score_related: Matrix  # [t][i]: 1.0 where task t started near old task i (it beat the frozen backbone), else 0.0
    h_embeddings: list[list[float] | None]
    learning_curves: list[list[list[float]]]  # per task, [step, test accuracy] pairs
    guidance: list[list[list[float]]]  # per task, [step, guidance loss, its weighted gradient norm on the hypernet]
    gamma: Row
    consistency_ratio: Row
    h_embedding_rank_correlation: Row
    frozen_linear_probe: Row
    frozen_class_il: dict[str, Row]
    fwt_start: Row
    fwt_baseline: Row
    seen_class_accuracy: Row
    router_task_accuracy: Row
    evaluated_samples: list[int]
    timings: dict[str, Row]  # seconds per task: frozen_features_s, h_embedding_s, train_s, eval_s
    training_arguments: dict[str, Any] | None = None

    @classmethod
    def fresh(cls, task_names: list[str]) -> RunState:
        n = len(task_names)

        def row() -> Row:
            return [math.nan] * n

        return cls(
            completed=0,
            task_names=list(task_names),
            task_il=[row() for _ in range(n)],
            class_il=[row() for _ in range(n)],
            h_scores=[row() for _ in range(n)],
            h_score_reference=[row() for _ in range(n)],
            h_score_beats_reference=[row() for _ in range(n)],
            h_score_related=[row() for _ in range(n)],
            h_embeddings=[None] * n,
            learning_curves=[[] for _ in range(n)],
            guidance=[[] for _ in range(n)],
            gamma=row(),
            consistency_ratio=row(),
            h_embedding_rank_correlation=row(),
            frozen_linear_probe=row(),
            frozen_class_il={name: row() for name in FROZEN_CLASS_INCREMENTAL},
            fwt_start=row(),
            fwt_baseline=row(),
            seen_class_accuracy=row(),
            router_task_accuracy=row(),
            evaluated_samples=[0] * n,
            timings={key: row() for key in ("frozen_features_s", "h_embedding_s", "train_s", "eval_s")},
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> RunState:
        """The state a checkpoint's state.json holds (JSON stores NaN as null: the numeric tables get NaN back)."""
        known = {f.name for f in fields(cls)}
        n = len(saved["task_names"])
        earlier = {  # checkpoints from before the guidance log and the frozen reference
            "guidance": [[] for _ in range(n)],
            "h_score_reference": [[None] * n for _ in range(n)],
            "h_score_beats_reference": [[None] * n for _ in range(n)],
            "h_score_related": [[None] * n for _ in range(n)],
        }
        state = cls(**{key: value for key, value in (earlier | saved).items() if key in known})
        for name in (
            "task_il",
            "class_il",
            "h_scores",
            "h_score_reference",
            "h_score_beats_reference",
            "h_score_related",
        ):
            setattr(state, name, [_nan_row(row) for row in getattr(state, name)])
        for name in (
            "gamma",
            "consistency_ratio",
            "h_embedding_rank_correlation",
            "frozen_linear_probe",
            "fwt_start",
            "fwt_baseline",
            "seen_class_accuracy",
            "router_task_accuracy",
        ):
            setattr(state, name, _nan_row(getattr(state, name)))
        state.timings = {key: _nan_row(row) for key, row in state.timings.items()}
        state.frozen_class_il = {key: _nan_row(row) for key, row in state.frozen_class_il.items()}
        return state


def _nan_row(row: list[float | None]) -> Row:
    return [math.nan if value is None else value for value in row]
