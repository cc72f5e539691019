"""Continual-learning metrics from the accuracy matrix R[i][j] (accuracy on task j after training task i)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("faa", "daa", "avg_incremental_accuracy", "forgetting", "bwt", "fwt")


def continual_metrics(
    accuracy_matrix, baseline: Sequence[float] | None = None, start: Sequence[float] | None = None
) -> dict[str, float | None]:
    """FAA, DAA, average incremental accuracy, forgetting, BWT and FWT, as plain floats (None where undefined).

    Only the lower triangle (with the diagonal) must be filled. FWT needs ``baseline``, the accuracy b_j of the
    untrained task-j model, and the accuracy on task j of the model after task j-1: ``start[j]`` when given (for a
    matrix that holds seen tasks only), else R[j-1][j].
    """
    R = np.asarray(accuracy_matrix, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {R.shape}")
    T = R.shape[0]
    lower = R[np.tril_indices(T)]
    if not np.isfinite(lower).all():
        raise ValueError("the accuracy matrix has NaN or Inf on or below the diagonal: every seen task needs a value")
    results: dict[str, float | None] = {
        "faa": float(R[T - 1].mean()),
        "daa": float(np.diag(R).mean()),
        "avg_incremental_accuracy": float(np.mean([R[i, : i + 1].mean() for i in range(T)])),
        "forgetting": None,
        "bwt": None,
        "fwt": None,
    }
    if T == 1:
        return results
    results["forgetting"] = float(np.mean([R[j : T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))
    results["bwt"] = float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"baseline must have one entry per task ({T}), got shape {b.shape}")
        a = np.asarray([np.nan] + [R[j - 1, j] for j in range(1, T)] if start is None else start, dtype=np.float64)
        if a.shape != (T,):
            raise ValueError(f"start must have one entry per task ({T}), got shape {a.shape}")
        transfer = [a[j] - b[j] for j in range(1, T)]
        if np.isfinite(transfer).all():
            results["fwt"] = float(np.mean(transfer))
    return results


def summarise_runs(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Mean and (sample) standard deviation of every metric over runs (one ``ContinualTrainer.fit`` result each).

    Keys are ``task_incremental`` and ``class_incremental``; a metric undefined in any run is None.
    """
    if not runs:
        raise ValueError("summarise_runs needs at least one run")
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for setting, pick in (("task_incremental", lambda r: r), ("class_incremental", lambda r: r["class_incremental"])):
        keys = METRIC_KEYS + (("router_task_accuracy",) if setting == "class_incremental" else ())
        summary[setting] = {}
        for key in keys:
            values = [pick(run).get(key) for run in runs]
            values = [v[-1] if isinstance(v, list) else v for v in values]  # per-task lists: the final value
            if any(v is None for v in values):
                summary[setting][key] = {"mean": None, "std": None, "n": len(values)}
                continue
            summary[setting][key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return summary
