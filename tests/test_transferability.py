"""H-score against independent computations: scikit-learn's Ledoit-Wolf and a direct numpy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from hyperlora.transferability import h_score


def blobs(n: int = 300, d: int = 6, classes: int = 3, separation: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, d)) * separation
    return centres[labels] + rng.normal(size=(n, d)), labels


def reference_plain(F: np.ndarray, y: np.ndarray) -> float:
    Fc = F - F.mean(0)
    G = np.stack([Fc[y == label].mean(0) for label in y])
    return float(np.trace(np.linalg.pinv(np.cov(Fc.T, bias=True)) @ np.cov(G.T, bias=True)))


def reference_shrinkage(F: np.ndarray, y: np.ndarray) -> float:
    lw = LedoitWolf().fit(F)
    Fc = F - F.mean(0)
    G = np.stack([Fc[y == label].mean(0) for label in y])
    sigma_g = G.T @ G / len(F)
    return float(np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * sigma_g)))


@pytest.mark.parametrize("n, d", [(300, 6), (40, 60)])
def test_shrinkage_score_matches_sklearn_ledoit_wolf(n, d):
    F, y = blobs(n, d)
    assert h_score(F, y) == pytest.approx(reference_shrinkage(F, y), rel=1e-9)


def test_plain_score_matches_numpy_pinv_formula():
    F, y = blobs()
    assert h_score(F, y, shrinkage=False) == pytest.approx(reference_plain(F, y), rel=1e-9)


def test_torch_and_numpy_inputs_agree():
    F, y = blobs()
    assert h_score(torch.tensor(F, dtype=torch.float64), torch.tensor(y)) == pytest.approx(h_score(F, y), rel=1e-12)


def test_plain_score_is_invariant_to_an_invertible_linear_map():
    F, y = blobs(n=500, d=5)
    M = np.random.default_rng(1).normal(size=(5, 5)) + 3 * np.eye(5)
    assert h_score(F @ M, y, shrinkage=False) == pytest.approx(h_score(F, y, shrinkage=False), rel=1e-8)


@pytest.mark.parametrize("shrinkage", [True, False])
def test_separable_labels_score_higher_than_shuffled(shrinkage):
    F, y = blobs(separation=3.0)
    shuffled = np.random.default_rng(2).permutation(y)
    assert h_score(F, y, shrinkage=shrinkage) > 5 * h_score(F, shuffled, shrinkage=shrinkage)


def test_constant_features_score_zero():
    assert h_score(np.ones((10, 4)), np.arange(10) % 2) == 0.0
    assert h_score(np.ones((10, 4)), np.arange(10) % 2, shrinkage=False) == 0.0


@pytest.mark.parametrize(
    "features, labels, match",
    [
        (np.zeros(5), np.zeros(5), "2-D"),
        (np.zeros((5, 2)), np.zeros((5, 1)), "1-D"),
        (np.zeros((5, 2)), np.zeros(4), "5 rows but labels has 4"),
        (np.zeros((1, 2)), np.zeros(1), "at least 2 samples"),
        (np.random.default_rng(0).normal(size=(6, 2)), np.zeros(6), "at least 2 classes"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
    ],
)
def test_bad_input_raises_a_clear_error(features, labels, match):
    with pytest.raises(ValueError, match=match):
        h_score(features, labels)
