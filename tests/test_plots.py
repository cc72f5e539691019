"""Every plot writes a real PNG, for one task, many, and with NaN cells."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest

from hyperlora import plots

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
