"""The H-score: how well features transfer to a labelled task, without training anything on them.

``h_score`` is the raw score, in [0, C - 1] for C classes. ``transferability`` scores every old task on a new task's
data, normalised to [0, 1], with paired bootstrap resamples for the noise-aware AHP (hyperlora.method.embedding). Which
features each old task is judged by (``old_task_features``) is ``HyperLoraConfig.h_score_features``:

- ``"lda"``: the frozen backbone's features times the old task's LDA directions (from the class statistics the router
  keeps): C_i dimensions per old task, one frozen forward pass for all of them;
- ``"head"``: the old task's head's logits under its generated adapter: C_i dimensions, a forward pass per old task;
- ``"pooled"``: the pooled features under the old task's adapter (the original method). With n samples not well above
  the feature dimension d this saturates at C - 1 for any features, which is why it is no longer the default.

"head" and "pooled" also score the frozen backbone in each old task's place (``frozen_reference``): an old task is
related to the new one only where it beats that reference in most resamples, not merely where it ranks first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple, get_args

import numpy as np
import torch
from torch import nn

from ..tuner.config import HScoreFeatures

H_SCORE_FEATURES = get_args(HScoreFeatures)


def _as_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


# Elements of the stacked resamples and their d x d covariances scored at once: the bootstrap's numpy calls batched,
# in bounded memory (32 MB of float64) whatever the feature dimension.
_BATCH_ELEMENTS = 1 << 22
# Below this shrinkage (lam, relative to the mean eigenvalue of K) the Gram H-score takes K's eigenvectors instead of a
# solve with K + lam I, which is then close to singular.
_SOLVE_FLOOR = 1e-9


def _ledoit_wolf_alpha(beta: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf's shrinkage towards mu * I, min(beta, delta) / delta (0 where the covariance is already mu * I)."""
    return np.where(delta > 0, np.minimum(beta, delta) / np.where(delta > 0, delta, 1.0), 0.0)


def _h_scores(F: np.ndarray, inverse: np.ndarray, shrinkage: bool) -> np.ndarray:
    """The H-score of each of a stack of feature matrices F (B, n, d) that share one labelling (class index per row)."""
    _, n, d = F.shape
    centred = F - F.mean(axis=1, keepdims=True)
    # a constant column's mean can be one rounding step off: that offset is no signal, and it makes cov_f singular
    centred *= np.ptp(F, axis=1, keepdims=True) != 0
    cov_f = np.einsum("bni,bnj->bij", centred, centred) / n
    counts = np.bincount(inverse).astype(float)
    one_hot = np.eye(len(counts))[inverse]  # (n, C)
    class_means = np.einsum("nc,bnd->bcd", one_hot, centred) / counts[:, None]
    cov_g = np.einsum("c,bci,bcj->bij", counts, class_means, class_means) / n
    informative = cov_f.any(axis=(1, 2))  # constant features carry no information about the labels: 0
    eye = np.eye(d)
    if not shrinkage:
        scores = np.einsum("bii->b", np.linalg.pinv(cov_f, hermitian=True) @ cov_g)
        return np.where(informative, scores, 0.0)
    # Ledoit-Wolf's optimal shrinkage towards mu * I, per matrix
    mu = np.einsum("bii->b", cov_f) / d
    delta = ((cov_f - mu[:, None, None] * eye) ** 2).sum(axis=(1, 2)) / d
    squared = centred**2
    beta = (np.einsum("bni,bnj->b", squared, squared) / n - (cov_f**2).sum(axis=(1, 2))) / (d * n)
    alpha = _ledoit_wolf_alpha(beta, delta)[:, None, None]
    shrunk = (1.0 - alpha) * cov_f + alpha * mu[:, None, None] * eye
    shrunk[~informative] = eye
    scores = np.einsum("bii->b", np.linalg.solve(shrunk, (1.0 - alpha) * cov_g))
    return np.where(informative, scores, 0.0)


def _gram_h_scores(F: np.ndarray, rows: np.ndarray, inverse: np.ndarray, shrinkage: bool) -> np.ndarray:
    """``_h_scores`` of F (n, d) on each resample (rows: (resamples, n)) through the n x n Gram matrix, for d > n.

    Why: pooled features (d = 768-1280) are read on n = 128 images, where a d x d solve per resample costs d^3. Every
    quantity of the Ledoit-Wolf H-score is a function of K = X X^T (X the centred resample): with S = (1 - a) X^T X / n
    + a mu I, Woodbury gives tr(S^-1 (1 - a) Sigma_G) = sum_c b_c^T K (K + lam I)^-1 b_c / n_c, with lam = a mu n /
    (1 - a) and b_c class c's indicator, centred; that is C - 1 - lam sum_c b_c^T (K + lam I)^-1 b_c / n_c, one n x n
    solve. Plain (lam = 0: the pseudo-inverse) or lam too small to solve by goes through K's eigenvectors instead.
    K comes from one Gram matrix of all n samples, so a resample costs n^3, not n^2 d.
    """
    n, d = F.shape
    centred = F - F.mean(0)
    centred *= np.ptp(F, axis=0) != 0  # as in _h_scores: a constant column's rounding is no signal
    gram = centred @ centred.T
    counts = np.bincount(inverse).astype(float)
    indicators = np.eye(len(counts))[inverse] - counts / n  # (n, C), orthogonal to K's null vector 1
    scores, step = [], max(1, _BATCH_ELEMENTS // (3 * n * n))
    for start in range(0, len(rows), step):
        batch = rows[start : start + step]
        K = gram[batch[:, :, None], batch[:, None, :]]
        K = K - K.mean(1, keepdims=True) - K.mean(2, keepdims=True) + K.mean((1, 2), keepdims=True)
        trace = np.einsum("bii->b", K)
        lam = np.zeros(len(K))
        if shrinkage:  # Ledoit-Wolf's alpha, from the Gram matrix: ||C||_F = ||K||_F / n, ||x_i||^2 = K_ii
            mu = trace / (n * d)
            frobenius = (K**2).sum((1, 2)) / n**2
            delta = (frobenius - mu**2 * d) / d
            beta = ((np.einsum("bii->bi", K) ** 2).sum(1) / n - frobenius) / (d * n)
            alpha = _ledoit_wolf_alpha(beta, delta)
            lam = np.where(alpha < 1, alpha * mu * n / np.maximum(1 - alpha, 1e-300), np.inf)
        score = np.zeros(len(K))
        solve = np.isfinite(lam) & (lam > _SOLVE_FLOOR * trace / n)
        if solve.any():
            shifted = K[solve] + lam[solve, None, None] * np.eye(n)
            quadratic = np.einsum("nc,bnc,c->b", indicators, np.linalg.solve(shifted, indicators), 1.0 / counts)
            score[solve] = len(counts) - 1 - lam[solve] * quadratic
        exact = ~solve & np.isfinite(lam)  # f(k) = k / (k + lam) on K's range: 1 there when plain (lam = 0)
        if exact.any():
            eigenvalues, eigenvectors = np.linalg.eigh(K[exact])
            kept = eigenvalues > eigenvalues.max(1, keepdims=True).clip(min=0) * max(n, d) * np.finfo(float).eps
            k = np.where(kept, eigenvalues, 0.0)
            f = np.divide(k, k + lam[exact, None], out=np.zeros_like(k), where=kept)
            projections = np.einsum("bnj,nc->bjc", eigenvectors, indicators) ** 2
            score[exact] = np.einsum("bj,bjc,c->b", f, projections, 1.0 / counts)
        scores.append(np.where(trace > 0, score, 0.0))
    return np.concatenate(scores)


def h_score(features, labels, shrinkage: bool = True) -> float:
    """H(F, y) = tr(Sigma_F^-1 Sigma_G): between-class variance of the features relative to their total variance.

    ``shrinkage=True`` (default) is the Ledoit-Wolf H_alpha of Ibrahim et al. (2022), well conditioned when the
    feature dimension is close to or above the number of samples; ``False`` is the plain score with a
    pseudo-inverse. Constant features carry no information about the labels and score 0.0.
    """
    F = _as_float64(features)
    y = _as_labels(labels)
    if F.ndim != 2:
        raise ValueError(f"features must be 2-D (n_samples, dim), got shape {F.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if F.shape[0] != y.shape[0]:
        raise ValueError(f"features has {F.shape[0]} rows but labels has {y.shape[0]} entries")
    if F.shape[0] < 2:
        raise ValueError(f"the H-score needs at least 2 samples, got {F.shape[0]}")
    if not np.isfinite(F).all():
        raise ValueError("features contain NaN or Inf")
    classes, inverse = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the H-score needs at least 2 classes, got {len(classes)}")
    return float(_resampled_h_scores(F, np.arange(len(F))[None], inverse, shrinkage)[0])


def _resampled_h_scores(F: np.ndarray, rows: np.ndarray, inverse: np.ndarray, shrinkage: bool) -> np.ndarray:
    """h_score of F on each resample (rows: (resamples, n), each with the class layout ``inverse``), in batches."""
    n, d = F.shape
    if d > n:
        return _gram_h_scores(F, rows, inverse, shrinkage)
    batch = max(1, _BATCH_ELEMENTS // (n * d + d * d))
    return np.concatenate(
        [_h_scores(F[rows[start : start + batch]], inverse, shrinkage) for start in range(0, len(rows), batch)]
    )


class Transferability(NamedTuple):
    """Every old task's normalised H-score on the new task, and the same on paired bootstrap resamples; with a
    reference, the score the frozen backbone earns in the old task's place, and how surely the old task beats it."""

    scores: np.ndarray  # (old tasks,), in [0, 1]
    resampled: np.ndarray | None  # (resamples, old tasks): one resample of the new task's samples per row
    reference: np.ndarray | None = None  # (old tasks,): the frozen backbone's score read the same way
    beats_reference: np.ndarray | None = None  # (old tasks,): share of resamples with score > reference (ties half)


def related_old_tasks(beats_reference, confidence: float) -> np.ndarray:
    """Which old tasks beat the frozen backbone beyond the noise, with ``confidence`` for all of them together.

    Each old task is a test (its share of resamples lost to the reference is its p-value), so with m old tasks each
    must win 1 - (1 - confidence) / m of the resamples (Bonferroni). Why: at 0.95 each, among 8 old tasks that add
    nothing one passes a third of the time (1 - 0.95^8), and the new task then inherits from a stranger; on the
    relations benchmark two of six probes with no transferring old task did (one at 95% of resamples exactly).
    """
    beats = np.asarray(beats_reference, dtype=float)  # NaN: not tested, so not related
    return beats >= 1.0 - (1.0 - confidence) / max(beats.size, 1)


def sample_size(kind: str, samples: int, adapted_samples: int) -> int:
    """How many of the new task's images an estimator reads: ``samples`` (n_max) for "lda", whose frozen features are
    computed for the router anyway; at most ``adapted_samples`` for those that run them through every old task's
    adapter, whose cost grows with them times the old tasks."""
    return samples if kind == "lda" else min(samples, adapted_samples)


def old_task_features(
    kind: str,
    num_old_tasks: int,
    features_of: Callable[[int | None], torch.Tensor],
    *,
    heads: Sequence[nn.Module] | None = None,
    router=None,
    read: Collection[int] | None = None,
) -> list[torch.Tensor]:
    """What each old task makes of the new task's samples; ``features_of(i)`` gives their pooled features under old
    task i's adapter (``None``: the frozen backbone), in full precision. An old task left out of ``read``
    (``screen_old_tasks``) is given the frozen backbone's features in its place: it scores as its own reference."""
    if kind not in H_SCORE_FEATURES:
        raise ValueError(f"h_score_features must be one of {H_SCORE_FEATURES}, got {kind!r}")
    if kind == "lda":
        if router is None:
            raise ValueError('h_score_features="lda" needs the router\'s class statistics')
        frozen = features_of(None).to(torch.float64).cpu()
        return [frozen @ router.discriminant(i) for i in range(num_old_tasks)]
    if kind == "head" and (heads is None or len(heads) < num_old_tasks):
        raise ValueError('h_score_features="head" needs the head of every old task')
    frozen = None if read is None or len(read) == num_old_tasks else features_of(None)
    features = [features_of(i) if read is None or i in read else frozen for i in range(num_old_tasks)]
    return features if kind == "pooled" else head_logits(heads, features)


def head_logits(heads: Sequence[nn.Module], features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each old task's head on its pooled features ("head" from "pooled"): both readings from one pass."""
    with torch.no_grad():
        return [head(f.to(head.weight.dtype)) for head, f in zip(heads, features, strict=False)]


def screen_old_tasks(
    kind: str,
    num_old_tasks: int,
    features_of: Callable[..., torch.Tensor],
    labels,
    *,
    keep: int,
    samples: int,
    heads: Sequence[nn.Module] | None = None,
    shrinkage: bool = True,
) -> list[int] | None:
    """The old tasks worth reading on all the sampled images, for the estimators that read the old tasks' models:
    with more than ``keep`` of them, the ``keep`` best H-scores on the first ``samples`` images
    (``features_of(i, samples)``); None when every old task is to be read.

    The first round of a successive halving: beyond ``keep`` old tasks, reading them grows by ``samples`` images per
    old task instead of all of them (a quarter, at the defaults). The old tasks screened out count as the frozen
    backbone in their place (``old_task_features``' ``read``): never related, ranked by what their head makes of the
    frozen features.
    """
    y = _as_labels(labels)
    if kind == "lda" or num_old_tasks <= keep or samples >= len(y) or len(np.unique(y[:samples])) < 2:
        return None
    screen = old_task_features(kind, num_old_tasks, lambda i: features_of(i, samples), heads=heads)
    scores = transferability(screen, y[:samples], shrinkage=shrinkage).scores
    return sorted(np.argsort(-scores, kind="stable")[:keep].tolist())


class SampleReads:
    """``features_of`` for ``guided_embedding`` over a sample read in two parts, the screen (its first ``screen``
    images) and the rest: every old task's screen is read once and kept for the full read of the finalists.

    ``read(part, task_id)`` gives old task ``task_id``'s features on part 0 (the screen) or 1 (the rest);
    ``frozen``: the frozen backbone's features of the whole sample, which the router's pass has already computed.
    """

    def __init__(self, read: Callable[[int, int], torch.Tensor], frozen: torch.Tensor, screen: int) -> None:
        self.read, self.frozen, self.screen = read, frozen, min(screen, len(frozen))
        self._screens: dict[int, torch.Tensor] = {}

    def __call__(self, task_id: int | None, first: int | None = None) -> torch.Tensor:
        if task_id is None:
            return self.frozen[:first]
        if first is not None and first != self.screen:
            return self(task_id)[:first]
        head = self._screens.pop(task_id, None)
        if head is None:
            head = self.read(0, task_id)
        if first is not None:
            self._screens[task_id] = head
            return head
        return head if self.screen == len(self.frozen) else torch.cat([head, self.read(1, task_id)])


def principal_subspace(reference, others: Sequence, dims: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``reference`` and ``others`` read in the top ``dims`` principal directions of ``reference`` (as they are where
    it has no more dimensions than that).

    Why: the pooled features' H-score on n = 128 images of d = 768-1280 dimensions needs Ledoit-Wolf to shrink hard,
    and what survives the shrinkage hardly differs between an adapter that helps and the frozen backbone: beating it
    in every resample becomes a test without power. In the frozen features' own leading directions, with n well above
    ``dims``, it keeps its power; both sides are read in the same directions, so the comparison stays like for like.
    """
    F = _as_float64(reference)
    if dims >= F.shape[1]:
        return F, [_as_float64(features) for features in others]
    basis = np.linalg.svd(F - F.mean(0), full_matrices=False)[2][:dims].T
    return F @ basis, [_as_float64(features) @ basis for features in others]


def frozen_reference(kind: str, num_old_tasks: int, frozen, heads: Sequence[nn.Module] | None = None):
    """What the frozen backbone makes of the new task's samples in each old task's place, read as
    ``old_task_features`` reads the old task (``frozen``: their pooled features without any adapter): for "head",
    old task i's head on the frozen features; for "pooled", the frozen features themselves, one reference shared by
    every old task (scored once). None for "lda", which never sees an adapter, so has nothing to compare. An old task
    that does not beat its reference by more than the noise transfers nothing that the backbone does not already
    give."""
    if kind == "lda":
        return None
    if kind == "head":
        return head_logits(heads[:num_old_tasks], [frozen] * num_old_tasks)
    return [frozen]


def transferability(
    old_features: Sequence,
    labels,
    *,
    shrinkage: bool = True,
    resamples: int = 0,
    seed: int = 0,
    reference: Sequence | None = None,
) -> Transferability:
    """H(F_i, y) / (C - 1) for every old task's features F_i on the new task's labels y (C classes), in [0, 1].

    ``resamples`` bootstrap resamples (within each class, so every class stays present) are drawn once and shared by
    all old tasks (and their ``reference`` features, ``frozen_reference``: one per old task, or one for all), so that
    scores can be compared resample by resample.
    """
    y = _as_labels(labels)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"the H-score needs at least 2 classes, got {len(classes)}")
    matrices = [_as_float64(features) for features in old_features]
    if reference is not None and len(reference) not in (1, len(matrices)):
        raise ValueError(f"{len(reference)} reference features for {len(matrices)} old tasks (give one or each)")
    references = [] if reference is None else [_as_float64(features) for features in reference]
    everything = matrices + references
    norm = len(classes) - 1
    scores = np.array([h_score(F, y, shrinkage) / norm for F in everything])
    resampled = None
    if resamples > 0:
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(y == c) for c in classes]
        rows = np.stack([np.concatenate([rng.choice(m, size=len(m)) for m in members]) for _ in range(resamples)])
        layout = np.repeat(np.arange(len(classes)), [len(m) for m in members])  # every resample's classes, in order
        resampled = np.stack([_resampled_h_scores(F, rows, layout, shrinkage) for F in everything], axis=1) / norm
    n = len(matrices)
    own = Transferability(scores[:n], None if resampled is None else resampled[:, :n])
    if reference is None:
        return own
    rows = scores[None] if resampled is None else resampled  # (resamples or 1, old tasks + references)
    own_rows, ref_rows = rows[:, :n], rows[:, n:]  # a shared reference (one column) broadcasts
    beats = (own_rows > ref_rows).mean(0) + 0.5 * (own_rows == ref_rows).mean(0)
    return own._replace(reference=np.broadcast_to(scores[n:], (n,)).copy(), beats_reference=beats.astype(float))
