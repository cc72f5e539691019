"""H-score against independent computations: scikit-learn's Ledoit-Wolf and a direct numpy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

import hyperlora.method.transferability as transferability_module
from hyperlora.method.router import GaussianRouter
from hyperlora.method.transferability import (
    SampleReads,
    frozen_reference,
    h_score,
    old_task_features,
    principal_subspace,
    screen_old_tasks,
    transferability,
)


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


@pytest.mark.parametrize("n, d", [(300, 6), (40, 60)])
def test_plain_score_matches_numpy_pinv_formula(n, d):
    F, y = blobs(n, d)
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


@pytest.mark.parametrize("shape", [(10, 4), (6, 10)])
def test_constant_features_score_zero(shape):
    assert h_score(np.ones(shape), np.arange(shape[0]) % 2) == 0.0
    assert h_score(np.ones(shape), np.arange(shape[0]) % 2, shrinkage=False) == 0.0


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


def _two_old_tasks_and_a_new_one(n: int = 400, d: int = 40, seed: int = 0):
    """Old task "u" separates its classes along u, old task "v" along v; the new task's classes differ along u."""
    rng = np.random.default_rng(seed)
    u, v = np.eye(d)[0], np.eye(d)[1]
    noise = lambda: rng.normal(size=(n, d))  # noqa: E731
    old_u, old_v, new = (np.arange(n) % 2, np.arange(n) % 2 + 2, np.arange(n) % 3)
    router = GaussianRouter(d, shrinkage=0.1)
    router.update(torch.tensor(noise() + 3 * np.outer(old_u, u)), torch.tensor(old_u), 0)
    router.update(torch.tensor(noise() + 3 * np.outer(old_v - 2, v)), torch.tensor(old_v), 1)
    return router, torch.tensor(noise() + 2 * np.outer(new, u)), new


def test_lda_features_score_the_related_old_task_higher_and_stay_in_unit_range():
    router, frozen, labels = _two_old_tasks_and_a_new_one()
    features = old_task_features("lda", 2, lambda task: frozen if task is None else None, router=router)
    assert [f.shape for f in features] == [(400, 2), (400, 2)]
    result = transferability(features, labels)
    assert 0 <= result.scores[1] < 0.05 and 0.3 < result.scores[0] <= 1
    assert result.scores[0] == pytest.approx(h_score(features[0], labels) / 2)  # normalised by C - 1


def test_pooled_features_saturate_when_samples_do_not_outnumber_dimensions():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 4
    noise = rng.normal(size=(60, 200)) / np.arange(1, 201)  # no information about the labels; a decaying spectrum
    assert transferability([noise], labels, shrinkage=False).scores[0] == pytest.approx(1.0)  # the maximum
    assert transferability([noise], labels).scores[0] > 0.5  # Ledoit-Wolf shrinks little on such a spectrum
    projected = noise @ rng.normal(size=(200, 4))  # what "lda" and "head" give: C_i dimensions
    assert transferability([projected], labels).scores[0] < 0.2


def test_bootstrap_resamples_are_paired_seeded_and_centred_on_the_scores():
    router, frozen, labels = _two_old_tasks_and_a_new_one()
    features = old_task_features("lda", 2, lambda task: frozen, router=router)
    a = transferability(features, labels, resamples=30, seed=5)
    b = transferability(features, labels, resamples=30, seed=5)
    np.testing.assert_array_equal(a.resampled, b.resampled)
    assert a.resampled.shape == (30, 2) and (a.resampled[:, 0] > a.resampled[:, 1]).all()
    np.testing.assert_allclose(a.resampled.mean(0), a.scores, atol=0.05)
    assert transferability(features, labels).resampled is None


def test_head_and_pooled_features_run_each_old_task():
    calls = []

    def features_of(task):
        calls.append(task)
        return torch.randn(10, 6, generator=torch.Generator().manual_seed(task))

    heads = [torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)]
    logits = old_task_features("head", 2, features_of, heads=heads)
    assert [tuple(f.shape) for f in logits] == [(10, 3), (10, 2)] and calls == [0, 1]
    assert [tuple(f.shape) for f in old_task_features("pooled", 2, features_of)] == [(10, 6), (10, 6)]
    with pytest.raises(ValueError, match="h_score_features must be one of"):
        old_task_features("logits", 2, features_of)
    with pytest.raises(ValueError, match="router"):
        old_task_features("lda", 2, features_of)


def test_an_old_task_counts_as_related_only_where_it_beats_the_frozen_backbone_in_its_place():
    """beats_reference: the share of paired resamples in which an old task's score tops the frozen backbone's read
    the same way; features that add label information beat it every time, the reference itself ties (one half), and
    both scores are the plain normalised H-scores (checked against h_score)."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 4
    frozen = rng.normal(size=(200, 3)) + 0.3 * labels[:, None]  # weakly informative
    adapted = frozen + 2.0 * np.eye(4)[labels][:, :3]  # the old task's adapter separates the classes further
    result = transferability([adapted, frozen], labels, resamples=40, reference=[frozen, frozen])
    assert result.scores[0] == pytest.approx(h_score(adapted, labels) / 3)
    np.testing.assert_allclose(result.reference, [h_score(frozen, labels) / 3] * 2)
    assert result.beats_reference[0] == 1.0 and result.beats_reference[1] == 0.5
    assert transferability([adapted], labels).beats_reference is None
    shared = transferability([adapted, frozen], labels, resamples=40, reference=[frozen])  # one for all: scored once
    np.testing.assert_array_equal(shared.beats_reference, result.beats_reference)
    np.testing.assert_array_equal(shared.reference, result.reference)
    unresampled = transferability([adapted, frozen], labels, reference=[frozen])
    np.testing.assert_array_equal(unresampled.beats_reference, [1.0, 0.5])
    with pytest.raises(ValueError, match="2 reference features for 3 old tasks"):
        transferability([adapted, frozen, frozen], labels, reference=[frozen, frozen])


def test_frozen_reference_reads_the_frozen_features_as_each_old_task_is_read():
    frozen = torch.randn(10, 6)
    heads = [torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)]
    reference = frozen_reference("head", 2, frozen, heads)
    torch.testing.assert_close(reference[1], heads[1](frozen).detach())
    assert [r is frozen for r in frozen_reference("pooled", 2, frozen)] == [True]  # shared, scored once
    assert frozen_reference("lda", 2, frozen) is None  # lda never sees an adapter: nothing to compare


@pytest.mark.parametrize("shrinkage", [True, False])
def test_the_batched_bootstrap_scores_each_resample_as_h_score_does(shrinkage, monkeypatch):
    """Resamples scored in stacks (here 3 per stack, memory-bounded) equal h_score on each, with a constant column
    and a resample that repeats one row per class."""
    F, y = blobs(40, 5, classes=2)
    F[:, 2] = 1.5
    order = np.argsort(y, kind="stable")
    F, y = F[order], y[order]
    rng = np.random.default_rng(0)
    members = [np.flatnonzero(y == c) for c in (0, 1)]
    rows = np.stack([np.concatenate([rng.choice(m, size=len(m)) for m in members]) for _ in range(7)])
    rows[3] = np.concatenate([np.full(len(m), m[0]) for m in members])  # each class one repeated row
    monkeypatch.setattr(transferability_module, "_BATCH_ELEMENTS", 3 * (40 * 5 + 25))
    batched = transferability_module._resampled_h_scores(F, rows, y, shrinkage)
    np.testing.assert_allclose(batched, [h_score(F[r], y[r], shrinkage) for r in rows], rtol=1e-10)


@pytest.mark.parametrize("shrinkage, by_eigenvectors", [(True, False), (True, True), (False, False)])
def test_more_dimensions_than_samples_score_each_resample_as_the_direct_formulas_do(
    shrinkage, by_eigenvectors, monkeypatch
):
    """With d > n the resamples are scored through the n x n Gram matrix (Woodbury): each equals scikit-learn's
    Ledoit-Wolf or the pseudo-inverse formula on the resample's own d x d covariance, in stacks of 3, with a constant
    column and a resample that repeats one row per class; also where the shrinkage goes through K's eigenvectors (too
    small to solve by: forced here)."""
    if by_eigenvectors:
        monkeypatch.setattr(transferability_module, "_SOLVE_FLOOR", np.inf)
    F, y = blobs(24, 40, classes=3)
    F[:, 5] = -0.5
    order = np.argsort(y, kind="stable")
    F, y = F[order], y[order]
    rng = np.random.default_rng(1)
    members = [np.flatnonzero(y == c) for c in range(3)]
    rows = np.stack([np.concatenate([rng.choice(m, size=len(m)) for m in members]) for _ in range(7)])
    rows[2] = np.concatenate([np.full(len(m), m[0]) for m in members])
    monkeypatch.setattr(transferability_module, "_BATCH_ELEMENTS", 3 * 3 * 24 * 24)
    batched = transferability_module._resampled_h_scores(F, rows, y, shrinkage)
    direct = reference_shrinkage if shrinkage else reference_plain
    np.testing.assert_allclose(batched, [direct(F[r], y[r]) for r in rows], rtol=1e-8)


def _old_task_reads(informative: set[int], n: int = 120, num_old: int = 6):
    """Pooled features of n samples (4 classes) under num_old old tasks: those in ``informative`` separate the
    classes, the others are noise; the frozen backbone's (None) are noise too. Records every call."""
    labels = torch.arange(n) % 4
    calls = []

    def features_of(task, first=None):
        calls.append((task, first))
        seed = 100 if task is None else task
        noise = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
        features = noise + (3.0 * torch.eye(4)[labels] if task in informative else 0.0)
        return features[:first]

    return features_of, labels, calls


def test_screening_keeps_the_old_tasks_that_score_best_on_the_first_images():
    features_of, labels, calls = _old_task_reads({1, 4})
    heads = [torch.nn.Linear(4, 4) for _ in range(6)]
    for head in heads:  # heads that pass the features on: the scores are the features' own
        head.weight.data, head.bias.data = torch.eye(4), torch.zeros(4)
    kept = screen_old_tasks("head", 6, features_of, labels, keep=2, samples=32, heads=heads)
    assert kept == [1, 4] and calls == [(i, 32) for i in range(6)]
    for kind, num_old, samples in [("lda", 6, 32), ("head", 2, 32), ("head", 6, 120)]:  # nothing to screen
        assert screen_old_tasks(kind, num_old, features_of, labels, keep=2, samples=samples, heads=heads) is None


def test_an_old_task_screened_out_scores_as_its_reference_and_is_never_related():
    """old_task_features' ``read``: the tasks left out get the frozen features in their place, so their scores equal
    their references and they beat them in half the resamples, a tie (never related); the tasks read score as
    without a screen, and the frozen features are read once."""
    features_of, labels, calls = _old_task_reads({1, 4})
    heads = [torch.nn.Linear(4, 3, bias=False) for _ in range(6)]
    reference = frozen_reference("head", 6, features_of(None), heads)
    full = transferability(old_task_features("head", 6, features_of, heads=heads), labels, reference=reference)
    calls.clear()
    features = old_task_features("head", 6, features_of, heads=heads, read=[1, 4])
    assert calls == [(None, None), (1, None), (4, None)]
    screened = transferability(features, labels, resamples=20, reference=reference)
    out = [0, 2, 3, 5]
    np.testing.assert_allclose(screened.scores[out], screened.reference[out])
    np.testing.assert_array_equal(screened.beats_reference[out], 0.5)
    np.testing.assert_allclose(screened.scores[[1, 4]], full.scores[[1, 4]])
    pooled = old_task_features("pooled", 6, features_of, read=[1, 4])
    assert pooled[0] is pooled[2] and torch.equal(pooled[1], features_of(1))


def test_sample_reads_read_each_screen_once_and_the_rest_only_for_a_full_read():
    """SampleReads against slicing one full read: the screen is the first images, the full read the screen (kept
    from the screening) and the rest."""
    sample = torch.randn(10, 3)
    reads = []

    def reader(screen):
        def read(part, task):
            reads.append((part, task))
            return (sample[:screen] if part == 0 else sample[screen:]) + task

        return read

    features_of = SampleReads(reader(4), sample, screen=4)
    assert torch.equal(features_of(2, 4), sample[:4] + 2)
    assert torch.equal(features_of(2), sample + 2) and reads == [(0, 2), (1, 2)]
    assert torch.equal(features_of(3), sample + 3) and reads[2:] == [(0, 3), (1, 3)]
    assert torch.equal(features_of(3, 2), (sample + 3)[:2])  # another length: sliced from a full read
    assert torch.equal(features_of(None), sample) and torch.equal(features_of(None, 4), sample[:4])
    whole = SampleReads(reader(32), sample, screen=32)  # a screen as large as the sample: one part
    reads.clear()
    assert torch.equal(whole(1), sample + 1) and reads == [(0, 1)]


def test_principal_subspace_reads_both_sides_in_the_reference_s_leading_directions_as_sklearn_pca_does():
    """Cross-checked against scikit-learn's PCA fitted on the reference: same projections up to each direction's sign,
    so the same H-scores; with no more dimensions than asked for, the features are left as they are."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 16)
    reference = rng.normal(size=(64, 40)) * np.linspace(3, 0.1, 40)
    others = [rng.normal(size=(64, 40)), torch.as_tensor(reference[:, ::-1].copy())]
    projected, read = principal_subspace(reference, others, 5)
    pca = PCA(n_components=5, svd_solver="full").fit(reference)
    for ours, theirs in zip([projected, *read], [reference, *others], strict=True):
        expected = pca.transform(np.asarray(theirs)) + pca.mean_ @ pca.components_.T  # ours does not centre
        signs = np.sign((ours * expected).sum(0))
        np.testing.assert_allclose(ours * signs, expected, atol=1e-9)
        assert h_score(ours, labels) == pytest.approx(h_score(expected, labels), rel=1e-9)
    whole, kept = principal_subspace(reference, others, 40)
    np.testing.assert_array_equal(whole, reference)
    np.testing.assert_array_equal(kept[1], others[1].numpy())
