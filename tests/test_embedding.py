"""AHP priorities, target distances and the H-embedding fit, checked against scipy and hand computations."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from hyperlora.method.embedding import (
    _fit_loss,
    _keep_away,
    ahp_priorities,
    fit_h_embedding,
    median_pairwise_distance,
    pairwise_comparison_matrix,
    target_distances,
)
from hyperlora.method.transferability import related_old_tasks


def test_comparison_matrix_without_resamples_is_the_clipped_score_ratio():
    P = pairwise_comparison_matrix([0.1, 0.3, 0.2, 0.001])
    assert P[1, 0] == pytest.approx(3.0) and P[2, 0] == pytest.approx(2.0)
    assert P[1, 3] == pytest.approx(9.0) and P[3, 1] == pytest.approx(1 / 9)  # Saaty's scale ends at 9
    np.testing.assert_allclose(P * P.T, np.ones((4, 4)))
    np.testing.assert_array_equal(np.diag(P), np.ones(4))


def test_comparison_matrix_from_resamples_weighs_the_ratio_by_how_often_the_order_holds():
    resampled = np.array([[1.0, 2.0, 0.5], [1.0, 3.0, 2.0], [2.0, 2.5, 0.0], [1.0, 1.0, 3.0]])
    scores = resampled.mean(0)
    P = pairwise_comparison_matrix(scores, resampled)
    wins_10 = (1 + 1 + 1 + 0.5) / 4  # task 1 beats task 0 in three resamples, ties in one
    assert P[1, 0] == pytest.approx((scores[1] / scores[0]) ** (2 * wins_10 - 1))
    assert P[0, 2] == pytest.approx(1.0)  # task 0 is as often ahead of task 2 as behind: no preference
    np.testing.assert_allclose(P * P.T, np.ones((3, 3)))
    always = np.tile(scores, (5, 1))  # no resample reverses any order: the plain ratio
    np.testing.assert_allclose(pairwise_comparison_matrix(scores, always), pairwise_comparison_matrix(scores))
    with pytest.raises(ValueError, match="resampled must be"):
        pairwise_comparison_matrix([1.0, 2.0], resampled)


def test_gaps_within_the_noise_give_near_uniform_distances_and_clear_gaps_the_full_range():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4, 8))
    tau = median_pairwise_distance(old)
    noise = rng.normal(scale=1e-3, size=(200, 4))
    tied = target_distances(0.5 + np.array([3e-6, 0, 1e-6, 2e-6]), old, resampled=0.5 + noise)
    assert tied.distances.max() < 1.3 * tau  # the old code stretched a 3.6e-6 spread to 1x-14.7x tau
    clear = target_distances([0.9, 0.1, 0.5, 0.3], old, resampled=np.array([0.9, 0.1, 0.5, 0.3]) + noise)
    saaty = np.array([1.0, 9.0, 1.8, 3.0])  # h_max / h_i
    np.testing.assert_allclose(clear.distances, tau * (1 + (saaty - 1) / 8), rtol=1e-6)
    assert clear.consistency_ratio == pytest.approx(0.0, abs=1e-9)


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
    resampled = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.5], [1.5, 1.0, 2.0]])  # wins that do not follow the ratios
    P = pairwise_comparison_matrix(resampled.mean(0), resampled)
    lam = np.max(np.linalg.eigvals(P).real)
    _, ratio = ahp_priorities(resampled.mean(0), resampled)
    assert ratio > 0 and ratio == pytest.approx((lam - 3) / 2 / 0.58)


def test_ahp_distances_put_the_most_transferable_task_at_tau():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4, 8))
    scores = [0.5, 3.0, 1.0, 2.0]
    d = target_distances(scores, old).distances
    tau = median_pairwise_distance(old)
    assert d[1] == pytest.approx(tau)
    assert np.all(d >= tau - 1e-12) and np.all(d <= 2 * tau + 1e-9)
    assert list(np.argsort(d)) == list(np.argsort(scores))[::-1]


def test_the_fitted_h_embedding_stays_as_far_from_every_old_task_as_an_unrelated_one():
    """Saaty's ratios as distances (tau to 7 tau here) are met exactly at gamma ~0.2, a quarter tau from the best old
    task (H-scores of a trainer run on the structured sequence)."""
    old = np.random.default_rng(0).normal(size=(3, 32))
    embedding, gamma, rank = fit_h_embedding(old, target_distances([0.14, 0.03, 0.02], old).distances, seed=0)
    fitted = np.linalg.norm(old - embedding.numpy(), axis=1)
    assert fitted.min() > 0.9 * median_pairwise_distance(old)
    assert gamma == pytest.approx(1.0, abs=0.1) and rank == pytest.approx(1.0)


def test_minmax_and_none_normalisations():
    old = np.eye(3)  # every pair sqrt(2) apart: tau = sqrt(2)
    tau = np.sqrt(2.0)
    minmax = target_distances([1.0, 4.0, 2.0], old, "minmax").distances
    np.testing.assert_allclose(minmax, tau * np.array([2.0, 1.0, 1.0 + 2.0 / 3.0]))
    ahp = target_distances([1.0, 4.0, 2.0], old, "ahp").distances
    assert minmax.min() == ahp.min() == pytest.approx(tau) and minmax.max() <= 2 * tau  # AHP's range, another map
    np.testing.assert_allclose(target_distances([0.5, 0.5, 0.5], old, "minmax").distances, [tau] * 3)
    assert target_distances([1.0, 4.0, 2.0], old, "none") is None
    with pytest.raises(ValueError, match="normalisation must be one of"):
        target_distances([1.0], old[:1], "zscore")
    with pytest.raises(ValueError, match="2 scores but 3 old embeddings"):
        target_distances([1.0, 2.0], old)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fit_recovers_distances_when_an_exact_solution_exists(k):
    rng = np.random.default_rng(k)
    old = rng.normal(size=(k, 6))
    truth = rng.normal(size=6)
    d = np.linalg.norm(old - truth, axis=1)
    embedding, gamma, rank = fit_h_embedding(old, d, seed=0)
    fitted = np.linalg.norm(old - embedding.numpy(), axis=1)
    np.testing.assert_allclose(fitted, gamma * d, rtol=1e-3)
    if k == 1:
        assert gamma == 1.0 and rank is None
    else:
        assert rank == pytest.approx(1.0)


def test_fit_keeps_the_order_of_targets_it_cannot_meet_exactly():
    """Ratios of up to 9 between old tasks a few tau apart cannot all hold in 32-d: the order still must."""
    rng = np.random.default_rng(0)
    old = rng.normal(size=(10, 32))
    d = median_pairwise_distance(old) * rng.uniform(1, 9, size=10)
    embedding, gamma, rank = fit_h_embedding(old, d, seed=0)
    fitted = np.linalg.norm(old - embedding.numpy(), axis=1)
    assert rank == pytest.approx(scipy.stats.spearmanr(fitted, d).statistic)
    assert rank > 0.95 and gamma > 0


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    old, d = np.eye(3), np.ones(3)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = fit_h_embedding(old, d, steps=100, seed=4).embedding
    assert torch.equal(torch.rand(1), before)
    b = fit_h_embedding(old, d, steps=100, seed=4).embedding
    assert torch.equal(a, b)


def test_first_task_gets_a_seeded_random_vector():
    a, gamma, _ = fit_h_embedding(np.zeros((0, 5)), np.zeros(0), dim=5, seed=1)
    b = fit_h_embedding(np.zeros((0, 5)), np.zeros(0), dim=5, seed=1).embedding
    assert a.shape == (5,) and torch.equal(a, b) and gamma == 1.0
    with pytest.raises(ValueError, match="dim is required"):
        fit_h_embedding(np.zeros((0, 5)), np.zeros(0))


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        fit_h_embedding(np.eye(2), [-1.0, 1.0])
    with pytest.raises(ValueError, match="3 target distances but 2"):
        fit_h_embedding(np.eye(2), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        fit_h_embedding(np.eye(2), [np.nan, 1.0])


def test_related_old_tasks_get_half_their_target_and_without_any_every_target_stays_beyond_tau():
    old = np.eye(3)
    tau = median_pairwise_distance(old)
    plain = target_distances([0.2, 0.6, 0.4], old).distances
    inherited = target_distances([0.2, 0.6, 0.4], old, related=[False, True, True], inherit_from="related").distances
    np.testing.assert_allclose(inherited, plain * [1.0, 0.5, 0.5])
    assert inherited.min() == pytest.approx(tau / 2)  # the best related task: nearer than any unrelated one
    fresh = target_distances([0.2, 0.6, 0.4], old, related=[False] * 3)
    assert fresh.distances.min() == pytest.approx(tau) and fresh.min_distance == pytest.approx(tau)
    assert target_distances([0.2, 0.6, 0.4], old, related=[False, True, False]).min_distance is None
    assert target_distances([0.2, 0.6, 0.4], old, "minmax", related=[True, False, False]).distances[0] == tau
    with pytest.raises(ValueError, match="related must mark each of the 3 old tasks"):
        target_distances([0.2, 0.6, 0.4], old, related=[True])


def test_inheriting_from_the_best_halves_only_the_top_scoring_related_old_tasks_target():
    old = np.eye(4)
    scores, related = [0.2, 0.6, 0.4, 0.9], [True, True, True, False]  # the top score overall is not related
    plain = target_distances(scores, old).distances
    best = target_distances(scores, old, related=related).distances  # "best" is the default
    np.testing.assert_allclose(best, plain * [1.0, 0.5, 1.0, 1.0])
    unrelated = target_distances(scores, old, related=[False] * 4)
    np.testing.assert_allclose(unrelated.distances, plain)
    assert unrelated.min_distance == pytest.approx(median_pairwise_distance(old))
    with pytest.raises(ValueError, match="inherit_from must be"):
        target_distances(scores, old, related=related, inherit_from="nearest")


def test_the_fits_hand_written_gradients_are_autograds():
    rng = np.random.default_rng(0)
    E, D = torch.as_tensor(rng.normal(size=(5, 7))), torch.as_tensor(rng.uniform(1, 3, size=5))
    e = torch.as_tensor(rng.normal(size=(4, 7)), dtype=torch.float64).requires_grad_()
    log_gamma = torch.as_tensor(rng.normal(size=4), dtype=torch.float64).requires_grad_()
    loss, grad_e, grad_log_gamma = _fit_loss(e, log_gamma, E, D)
    loss.sum().backward()
    torch.testing.assert_close(grad_e, e.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_log_gamma, log_gamma.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 8])
def test_a_fresh_start_is_the_seeded_random_embedding_kept_tau_from_every_old_one(seed):
    """Eight old tasks in 32 dimensions: the fresh start is the N(0, 1) draw a random embedding would be, moved out
    along its ray from the nearest old embedding only where it lies nearer than tau (as it does here), and no further
    than it must."""
    rng = np.random.default_rng(seed)
    old = rng.normal(size=(8, 32))
    targets = target_distances(rng.uniform(0.1, 0.5, size=8), old)
    tau = median_pairwise_distance(old)
    fresh = fit_h_embedding(old, targets.distances, seed=seed, min_distance=targets.min_distance).embedding.numpy()
    draw = torch.randn(32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    before = np.linalg.norm(old - draw, axis=1)
    assert before.min() < tau  # the case the bound is for
    assert np.linalg.norm(old - fresh.astype(np.float64), axis=1).min() >= tau  # in float32, as it is stored
    ray = (fresh - draw) / np.linalg.norm(fresh - draw)
    np.testing.assert_allclose(ray, (draw - old[before.argmin()]) / before.min(), atol=1e-5)
    least, most = tau - before.min(), tau + before.max()
    step = np.linalg.norm(fresh - draw)
    assert least - 1e-6 <= step <= most + 1e-6
    if step > least + 1e-6:  # a step shorter by one of the 64 candidates' spacing still leaves one inside
        assert np.linalg.norm(old - (draw + ray * (step - (most - least) / 64)), axis=1).min() < tau


def test_a_fresh_start_shares_no_more_with_the_old_task_than_a_random_embedding_does():
    """With one old task, the fit to tau starts next to it and stops on the sphere: cosine about 0.5 with it; the fresh
    start shares no more with it than a random embedding does (cosines centred on 0, a little below, as the draws
    nearer than tau are moved away), and is of its norm."""
    rng = np.random.default_rng(0)
    cosines, fitted, norms = [], [], []
    for seed in range(100):
        old = rng.normal(size=(1, 32))
        tau = median_pairwise_distance(old)
        for out, bound in ((cosines, tau), (fitted, None)):
            e = fit_h_embedding(old, [tau], seed=seed, min_distance=bound, steps=100).embedding.double().numpy()
            out.append(e @ old[0] / np.linalg.norm(e) / np.linalg.norm(old))
            if bound is not None:
                norms.append(np.linalg.norm(e) / np.linalg.norm(old))
    assert -0.15 < np.mean(cosines) < 0.02 and np.mean(fitted) > 0.3
    assert 0.9 < np.median(norms) < 1.2


def test_a_fresh_start_keeps_tau_once_stored_in_float32():
    """The bound is met in float64; the float32 embedding the task stores would fall short of tau by rounding in about
    a fifth of draws placed exactly on it (66 of 300 here without the margin)."""
    rng = np.random.default_rng(0)
    for seed in range(100):
        old = rng.normal(size=(1, 32))
        tau = median_pairwise_distance(old)
        stored = fit_h_embedding(old, [tau], seed=seed, min_distance=tau).embedding
        assert stored.dtype == torch.float32
        assert np.linalg.norm(old - stored.double().numpy(), axis=1).min() >= tau, seed


def test_a_fresh_start_next_to_the_only_old_embedding_is_moved_out_to_tau_exactly():
    old, inside = np.array([[3.0, 4.0, 0.0]]), torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64)
    moved = _keep_away(inside, torch.as_tensor(old), 5.0)
    np.testing.assert_allclose(moved.numpy(), [-2.0, 4.0, 0.0])
    torch.testing.assert_close(_keep_away(moved, torch.as_tensor(old), 5.0), moved)  # already clear: unchanged


def test_a_fresh_start_between_two_old_embeddings_goes_as_far_as_clears_both():
    """Out of the nearer one's ball along the ray lands inside the other's: the first longer step that clears both."""
    old = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    moved = _keep_away(torch.tensor([0.5, 0.0], dtype=torch.float64), old, 2.0)
    distances = torch.linalg.vector_norm(moved - old, dim=1)
    assert distances.min() >= 2.0 - 1e-9 and moved[0] >= 5.0 - 1e-9  # the ray runs through the second ball
    assert moved[0] < 5.0 + (2.0 + 2.5 - 1.5) / 64 + 1e-9  # no further than one step past its edge


def test_relatedness_holds_its_confidence_for_all_old_tasks_together():
    """Bonferroni: with m old tasks each must win 1 - 0.05 / m of the resamples."""
    np.testing.assert_array_equal(related_old_tasks([0.95], 0.95), [True])
    np.testing.assert_array_equal(related_old_tasks([0.96, 0.98, 1.0, 0.5], 0.95), [False, False, True, False])
    np.testing.assert_array_equal(related_old_tasks([0.975, 0.97], 0.95), [True, False])
    assert not related_old_tasks([1.0, 1.0], 1.5).any()  # above 1: never
    assert related_old_tasks([], 0.95).shape == (0,)


@pytest.mark.parametrize("seed", [7, 11, 13])
def test_guided_embedding_starts_fresh_at_tau_or_beyond_when_no_old_task_beats_the_frozen_backbone(seed, monkeypatch):
    """Old tasks whose features are noise lose to the frozen backbone in every resample: none is related, and the
    H-embedding keeps tau from all eight old embeddings, where its random draw alone lies nearer."""
    import hyperlora.method.embedding as embedding_module
    from hyperlora import HyperLoraConfig

    rng = np.random.default_rng(seed)
    labels = torch.as_tensor(np.repeat(np.arange(4), 32))
    signal = np.eye(4)[labels.numpy()] * 2 + rng.normal(size=(128, 4))
    frozen = torch.as_tensor(np.concatenate([signal, rng.normal(size=(128, 4))], axis=1))
    noise = [torch.as_tensor(rng.normal(size=(128, 8))) for _ in range(8)]
    old = rng.normal(size=(8, 32))

    def features_of(task, first=None):
        return (frozen if task is None else noise[task])[:first]

    config = HyperLoraConfig(target_modules=["qkv"], h_score_features="pooled")
    tau = median_pairwise_distance(old)
    guided = embedding_module.guided_embedding(old, features_of, labels, config, seed=seed)
    assert not related_old_tasks(guided.beats_reference, config.relatedness_confidence).any()
    assert np.linalg.norm(old - guided.embedding.numpy(), axis=1).min() >= tau * (1 - 1e-6)
    monkeypatch.setattr(embedding_module, "_keep_away", lambda e, *_: e)  # the bare draw: nearer than tau
    bare = embedding_module.guided_embedding(old, features_of, labels, config, seed=seed).embedding.numpy()
    assert np.linalg.norm(old - bare, axis=1).min() < tau


@pytest.mark.parametrize("inherit_from", ["best", "related"])
def test_guided_embedding_passes_the_configs_inherit_from_to_the_targets(inherit_from, monkeypatch):
    import hyperlora.method.embedding as embedding_module
    from hyperlora import HyperLoraConfig

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(np.repeat(np.arange(4), 32))
    features = torch.as_tensor(rng.normal(size=(128, 8)))
    seen, targets = [], embedding_module.target_distances

    def recording(*args, **kwargs):
        seen.append(kwargs["inherit_from"])
        return targets(*args, **kwargs)

    monkeypatch.setattr(embedding_module, "target_distances", recording)
    config = HyperLoraConfig(target_modules=["qkv"], h_score_features="pooled", inherit_from=inherit_from)
    embedding_module.guided_embedding(
        rng.normal(size=(3, 16)), lambda task, first=None: features[:first], labels, config
    )
    assert seen == [inherit_from]


def test_an_old_head_that_beats_its_reference_is_related_only_if_its_pooled_features_beat_the_frozen_ones():
    """Old task 0's adapter only moves the frozen features' class signal to the dimensions its head reads: the head
    beats its reference (itself on the frozen features) in every resample, yet the adapted features hold exactly what
    the frozen ones do (a permutation: tied in every resample, up to rounding). Starting from it gives nothing: by
    default it is not related; with relatedness_pooled=False, the head's reading alone, it is."""
    from hyperlora import HyperLoraConfig
    from hyperlora.method.embedding import guided_embedding

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(np.repeat(np.arange(4), 32))
    centres = rng.normal(size=(4, 2)) * 3
    signal, other = centres[labels.numpy()] + rng.normal(size=(128, 2)), rng.normal(size=(128, 2))
    frozen = torch.as_tensor(np.concatenate([signal, other], axis=1))
    adapted = [frozen[:, [2, 3, 0, 1]], torch.as_tensor(rng.normal(size=(128, 4)))]
    heads = [torch.nn.Linear(4, 4, bias=False).double() for _ in range(2)]
    with torch.no_grad():
        heads[0].weight.zero_()
        heads[0].weight[:, 2:] = torch.as_tensor(centres)

    def features_of(task, first=None):
        return (frozen if task is None else adapted[task])[:first]

    old = rng.normal(size=(2, 32))
    config = HyperLoraConfig(target_modules=["qkv"], h_score_features="head")
    guided = guided_embedding(old, features_of, labels, config, heads=heads)
    assert guided.beats_reference[0] == 1.0 and guided.beats_pooled_reference[0] < 0.9  # ties, up to rounding
    assert np.isnan(guided.beats_pooled_reference[1])  # its head lost: its pooled features are not read
    np.testing.assert_array_equal(guided.related, [False, False])
    head_alone = guided_embedding(old, features_of, labels, replace(config, relatedness_pooled=False), heads=heads)
    np.testing.assert_array_equal(head_alone.related, [True, False])
    assert head_alone.beats_pooled_reference is None
    nearest = np.linalg.norm(old - head_alone.embedding.numpy(), axis=1)
    assert nearest[0] < nearest[1] and np.linalg.norm(old - guided.embedding.numpy(), axis=1).min() >= (
        median_pairwise_distance(old) * (1 - 1e-6)
    )


def test_the_pooled_test_compares_the_features_in_the_frozen_features_leading_directions():
    """beats_pooled_reference is the pooled test read in relatedness_pooled_dims principal directions of the frozen
    features (scikit-learn's PCA, fitted on them), on the same resamples as the head's test."""
    from sklearn.decomposition import PCA

    from hyperlora import HyperLoraConfig
    from hyperlora.method.embedding import guided_embedding
    from hyperlora.method.transferability import transferability

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(np.repeat(np.arange(4), 32))
    centres = rng.normal(size=(4, 40))
    frozen = torch.as_tensor(0.5 * centres[labels.numpy()] + rng.normal(size=(128, 40)) * np.linspace(2, 0.2, 40))
    adapted = [frozen + w * torch.as_tensor(centres[labels.numpy()]) for w in (1.0, 0.02)]
    heads = [torch.nn.Linear(40, 4, bias=False).double() for _ in range(2)]
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.as_tensor(centres))

    def features_of(task, first=None):
        return (frozen if task is None else adapted[task])[:first]

    config = HyperLoraConfig(target_modules=["qkv"], h_score_features="head", relatedness_pooled_dims=3)
    guided = guided_embedding(rng.normal(size=(2, 32)), features_of, labels, config, seed=3, heads=heads)
    pca = PCA(n_components=3).fit(frozen.numpy())
    expected = transferability(
        [pca.transform(f.numpy()) for f in adapted],
        labels,
        resamples=config.h_score_resamples,
        seed=3,
        reference=[pca.transform(frozen.numpy())],
    ).beats_reference
    assert (guided.beats_reference == 1.0).all()  # both heads pass, so both are read
    assert expected[0] == 1.0 and 0 < expected[1] < 1  # one sure win, one near tie: both sides of the test
    np.testing.assert_allclose(guided.beats_pooled_reference, expected)
