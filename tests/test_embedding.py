"""AHP priorities, target distances and the H-embedding fit, checked against scipy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from hyperlora.embedding import (
    ahp_priorities,
    fit_h_embedding,
    median_pairwise_distance,
    pairwise_comparison_matrix,
    target_distances,
)


def test_comparison_matrix_uses_saatys_scale_and_is_reciprocal():
    P = pairwise_comparison_matrix([1.0, 3.0, 2.0])
    assert P[1, 0] == pytest.approx(9.0)  # best vs worst
    assert P[2, 0] == pytest.approx(5.0)  # 1 + 8 * (2 - 1) / 2
    np.testing.assert_allclose(P * P.T, np.ones((3, 3)))
    np.testing.assert_array_equal(np.diag(P), np.ones(3))


def test_priorities_match_scipy_eigenvector_sum_to_one_and_rank_like_scores():
    scores = [0.3, 2.0, 1.1, 0.9]
    weights, _ = ahp_priorities(scores)
    values, vectors = scipy.linalg.eig(pairwise_comparison_matrix(scores))
    principal = np.abs(vectors[:, np.argmax(values.real)].real)
    np.testing.assert_allclose(weights, principal / principal.sum(), rtol=1e-10)
    assert weights.sum() == pytest.approx(1.0)
    assert list(np.argsort(weights)) == list(np.argsort(scores))


def test_equal_scores_give_equal_weights_and_zero_consistency_ratio():
    weights, ratio = ahp_priorities([2.0, 2.0, 2.0])
    np.testing.assert_allclose(weights, np.full(3, 1 / 3))
    assert ratio == 0.0


def test_consistency_ratio_for_three_tasks_by_hand():
    P = pairwise_comparison_matrix([1.0, 3.0, 2.0])
    lam = np.max(np.linalg.eigvals(P).real)
    _, ratio = ahp_priorities([1.0, 3.0, 2.0])
    assert ratio == pytest.approx((lam - 3) / 2 / 0.58)


def test_ahp_distances_put_the_most_transferable_task_at_tau():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4, 8))
    scores = [0.5, 3.0, 1.0, 2.0]
    d = target_distances(scores, old)
    tau = median_pairwise_distance(old)
    assert d[1] == pytest.approx(tau)
    assert np.all(d >= tau - 1e-12) and np.all(d <= 9 * tau + 1e-9)
    assert list(np.argsort(d)) == list(np.argsort(scores))[::-1]


def test_minmax_and_none_normalisations():
    old = np.eye(3)
    np.testing.assert_allclose(target_distances([1.0, 4.0, 2.0], old, "minmax", eps=0.1), [4.1, 1.1, 3.1])
    assert target_distances([1.0, 4.0, 2.0], old, "none") is None
    with pytest.raises(ValueError, match="normalisation must be one of"):
        target_distances([1.0], old[:1], "zscore")
    with pytest.raises(ValueError, match="2 scores but 3 old embeddings"):
        target_distances([1.0, 2.0], old)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fit_recovers_distances_when_an_exact_solution_exists(k):
    rng = np.random.default_rng(k)
    old = rng.normal(size=(k, 6))
    truth = rng.normal(size=6)
    d = np.linalg.norm(old - truth, axis=1)
    embedding, gamma = fit_h_embedding(old, d, steps=3000, seed=0)
    fitted = np.linalg.norm(old - embedding.numpy(), axis=1)
    np.testing.assert_allclose(fitted, gamma * d, rtol=0.02)
    if k == 1:
        assert gamma == 1.0


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    old, d = np.eye(3), np.ones(3)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a, _ = fit_h_embedding(old, d, steps=100, seed=4)
    assert torch.equal(torch.rand(1), before)
    b, _ = fit_h_embedding(old, d, steps=100, seed=4)
    assert torch.equal(a, b)


def test_first_task_gets_a_seeded_random_vector():
    a, gamma = fit_h_embedding(np.zeros((0, 5)), np.zeros(0), dim=5, seed=1)
    b, _ = fit_h_embedding(np.zeros((0, 5)), np.zeros(0), dim=5, seed=1)
    assert a.shape == (5,) and torch.equal(a, b) and gamma == 1.0
    with pytest.raises(ValueError, match="dim is required"):
        fit_h_embedding(np.zeros((0, 5)), np.zeros(0))


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        fit_h_embedding(np.eye(2), [-1.0, 1.0])
    with pytest.raises(ValueError, match="3 target distances but 2"):
        fit_h_embedding(np.eye(2), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        fit_h_embedding(np.eye(2), [np.nan, 1.0])
