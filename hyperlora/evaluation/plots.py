"""Pictures of a run: accuracy matrices, transferability, and where the task embeddings sit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _names(count: int, task_names: Sequence[str] | None) -> list[str]:
    return list(task_names) if task_names is not None else [str(i) for i in range(count)]


def _significant(value: float, digits: int) -> str:
    return f"{value:#.{digits}g}".rstrip(".")  # trailing zeros kept: 1.00 next to 1.02, not 1


def _significant_digits(values: np.ndarray, most: int = 6) -> int:
    """The fewest significant digits (at least 2) that print distinct values distinctly: close H-scores such as
    8.3737 and 8.3572 must not all read "8.4"."""
    distinct = np.unique(values)
    for digits in range(2, most):
        if len({_significant(v, digits) for v in distinct}) == len(distinct):
            return digits
    return most


def _heatmap(matrix, path, title: str, xlabel: str, ylabel: str, task_names, percent: bool, cmap: str) -> Path:
    from matplotlib.ticker import ScalarFormatter

    plt = _pyplot()
    values = np.array(matrix, dtype=np.float64)
    names = _names(values.shape[0], task_names)
    size = 1.6 + 0.55 * values.shape[0]
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap=cmap, vmin=0.0 if percent else None, vmax=1.0 if percent else None)
    # plain tick labels: an offset ("+8.36") or a multiplier would be drawn over the title
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, format=formatter)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    digits = _significant_digits(finite) if finite.size else 2
    if values.shape[0] <= 20:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                text = f"{100 * value:.0f}" if percent else _significant(value, digits)
                color = "white" if (value < 0.5 if percent else value < middle) else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if len(text) <= 4 else 6, color=color)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_accuracy_matrix(matrix, path, *, title: str = "Accuracy", task_names: Sequence[str] | None = None) -> Path:
    """R[i][j] as a heatmap, in percent: rows are training steps, columns the evaluated tasks."""
    return _heatmap(
        matrix, path, title, "evaluated on task", "after training task", task_names, percent=True, cmap="viridis"
    )


def plot_h_scores(matrix, path, *, task_names: Sequence[str] | None = None) -> Path:
    """Transferability H[t][i] of old task i's features to new task t."""
    return _heatmap(
        matrix, path, "Transferability (H-score)", "old task", "new task", task_names, percent=False, cmap="magma"
    )


def plot_embeddings(embeddings, path, *, task_names: Sequence[str] | None = None) -> Path:
    """The task embeddings in their first two principal directions, in training order."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    E = np.asarray(embeddings, dtype=np.float64)
    names = _names(E.shape[0], task_names)
    centred = E - E.mean(axis=0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    points = centred @ directions[:2].T if E.shape[0] > 1 else np.zeros((1, 2))
    if points.shape[1] < 2:
        points = np.hstack([points, np.zeros((points.shape[0], 1))])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(points[:, 0], points[:, 1], color="0.8", zorder=1)
    scatter = ax.scatter(points[:, 0], points[:, 1], c=np.arange(len(points)), cmap="viridis", zorder=2)
    ax.margins(0.15)
    middle = (points[:, 0].min() + points[:, 0].max()) / 2
    for (x, y), name in zip(points, names, strict=True):
        right = x > middle  # labels point inwards, so that none runs off the axes
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(-4 if right else 4, 4),
            ha="right" if right else "left",
            fontsize=8,
        )
    fig.colorbar(scatter, ax=ax, label="task order", ticks=MaxNLocator(integer=True))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Task embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
