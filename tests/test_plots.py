"""Every plot writes a real PNG, for one task, many, and with NaN cells."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest

from hyperlora.evaluation import plots

PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("size", [1, 4])
def test_heatmaps(tmp_path, size):
    matrix = np.tril(np.full((size, size), 0.8))
    matrix[np.triu_indices(size, k=1)] = math.nan
    names = [f"task {i}" for i in range(size)]
    check_png(plots.plot_accuracy_matrix(matrix, tmp_path / "acc.png", task_names=names))
    check_png(plots.plot_h_scores(np.where(np.isnan(matrix), math.nan, 3.5), tmp_path / "h.png"))


@pytest.mark.parametrize("size", [1, 2, 5])
def test_embeddings(tmp_path, size):
    embeddings = np.random.default_rng(0).normal(size=(size, 8))
    check_png(plots.plot_embeddings(embeddings, tmp_path / "e.png", task_names=[str(i) for i in range(size)]))


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots close after saving, kept open for inspection."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        figure.clf()


@pytest.mark.parametrize("scores", [[8.3737, 8.3572, 8.3601], [1.0213, 1.0412, 1.0008]])
def test_close_h_scores_read_apart_without_an_offset_over_the_title(tmp_path, figures, scores):
    matrix = np.full((3, 3), math.nan)
    matrix[1, 0], matrix[2, 0], matrix[2, 1] = scores
    check_png(plots.plot_h_scores(matrix, tmp_path / "h.png"))
    [figure] = figures
    heatmap, colorbar = figure.axes
    cells = [text.get_text() for text in heatmap.texts]
    assert len(cells) == 3 and len(set(cells)) == 3  # distinct scores, distinct cells
    assert [float(cell) for cell in cells] == pytest.approx(scores, rel=1e-2)
    assert len({len(cell) for cell in cells}) == 1  # as many digits in every cell: "1.00", not "1"
    assert colorbar.yaxis.get_offset_text().get_text() == ""
    # each tick label is the whole value at its tick, no "+8.36" elsewhere to add
    labels = [float(label.get_text().replace("\N{MINUS SIGN}", "-")) for label in colorbar.get_yticklabels()]
    assert labels and labels == pytest.approx(list(colorbar.get_yticks()), abs=1e-9)


@pytest.mark.parametrize("size", [2, 3, 6])
def test_embedding_labels_stay_inside_the_axes_and_task_order_ticks_are_integers(tmp_path, figures, size):
    embeddings = np.random.default_rng(size).normal(size=(size, 8))
    names = [f"a long task name {i}" for i in range(size)]
    check_png(plots.plot_embeddings(embeddings, tmp_path / "e.png", task_names=names))
    [figure] = figures
    axes, colorbar = figure.axes
    renderer = figure.canvas.get_renderer()
    box = axes.get_window_extent(renderer)
    for label in axes.texts:
        extent = label.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, label
    ticks = colorbar.get_yticks()
    ticks = ticks[(ticks >= 0) & (ticks <= size - 1)]
    assert len(ticks) >= 2 and np.array_equal(ticks, np.round(ticks))
