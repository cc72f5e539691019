"""From H-scores to a task embedding: AHP priorities, target distances, the embedding that fits them, and the whole
stage that runs before a task trains (``guided_embedding``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, get_args

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from ..optim import cosine_schedule
from ..tuner.config import HyperLoraConfig, InheritFrom, Normalisation
from .transferability import (
    frozen_reference,
    head_logits,
    old_task_features,
    principal_subspace,
    related_old_tasks,
    screen_old_tasks,
    transferability,
)

NORMALISATIONS = get_args(Normalisation)
INHERIT_FROM = get_args(InheritFrom)

# Saaty's random consistency index for n = 1..15 (mean consistency index of random reciprocal matrices).
_RANDOM_INDEX = (0.0, 0.0, 0.58, 0.90, 1.12, 1.24, 1.32, 1.41, 1.45, 1.49, 1.51, 1.48, 1.56, 1.57, 1.59)


def _vector(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return array


def _matrix(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tasks, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return array


def pairwise_comparison_matrix(scores, resampled=None) -> np.ndarray:
    """Saaty's reciprocal 1-9 matrix: P_ik says how many times more old task i transfers than old task k.

    The magnitude is the score ratio h_i / h_k, clipped to [1/9, 9]. With ``resampled`` (bootstrap resamples x old
    tasks, paired: one resample serves every old task), it is raised to the confidence |2 p_ik - 1|, where p_ik is the
    share of resamples in which task i scores above task k (ties count half): a gap within the noise gives P near 1,
    a gap no resample reverses keeps the full ratio. (Min-max scaling of raw differences instead stretches any gap,
    however small, to the full 1-9 range.)
    """
    h = np.maximum(_vector(scores, "scores"), 1e-12)
    ratio = np.clip(h[:, None] / h[None, :], 1.0 / 9.0, 9.0)
    if resampled is None:
        return ratio
    samples = np.asarray(resampled, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[1] != h.size or samples.shape[0] == 0:
        raise ValueError(f"resampled must be (resamples, {h.size}), got shape {samples.shape}")
    above, tied = samples[:, :, None] > samples[:, None, :], samples[:, :, None] == samples[:, None, :]
    wins = above.mean(0) + 0.5 * tied.mean(0)
    return ratio ** np.abs(2.0 * wins - 1.0)


def random_index(n: int) -> float:
    """Saaty's table up to 15; beyond it the index flattens out, so the last value is kept."""
    return _RANDOM_INDEX[min(n, len(_RANDOM_INDEX)) - 1]


def ahp_priorities(scores, resampled=None) -> tuple[np.ndarray, float]:
    """(priority weights summing to 1, consistency ratio) from the principal eigenvector of the comparison matrix."""
    P = pairwise_comparison_matrix(scores, resampled)
    n = P.shape[0]
    eigenvalues, eigenvectors = np.linalg.eig(P)
    k = int(np.argmax(eigenvalues.real))
    weights = np.abs(eigenvectors[:, k].real)
    weights /= weights.sum()
    if n < 3:
        return weights, 0.0
    consistency_index = (eigenvalues[k].real - n) / (n - 1)
    return weights, float(max(consistency_index, 0.0) / random_index(n))


def median_pairwise_distance(embeddings) -> float:
    """tau: the typical spacing of the old task embeddings.

    With a single old embedding e, sqrt(2) |e|: how far an unrelated embedding of the same norm typically is (a fixed
    1.0 would put the second task next to the first, whatever they have in common).
    """
    E = _matrix(embeddings, "embeddings")
    if E.shape[0] < 2:
        tau = float(np.sqrt(2.0) * np.linalg.norm(E)) if E.size else 1.0
    else:
        distances = np.linalg.norm(E[:, None] - E[None, :], axis=-1)
        tau = float(np.median(distances[np.triu_indices(E.shape[0], k=1)]))
    return tau if tau > 0 else 1.0  # coinciding (or zero) embeddings give no scale


class Targets(NamedTuple):
    """What the H-embedding is fitted to: a distance to every old embedding, AHP's consistency ratio, and how near
    to any old embedding it may start."""

    distances: np.ndarray
    consistency_ratio: float | None  # AHP only
    min_distance: float | None = None  # tau for a fresh start (no related old task): it starts as a stranger


INHERIT_SCALE = 0.5  # a related old task's target distance is this share of its normalised one


def target_distances(
    scores,
    old_embeddings,
    normalisation: str = "ahp",
    *,
    resampled=None,
    related=None,
    inherit_from: InheritFrom = "best",
) -> Targets | None:
    """How far the new task's embedding should sit from each old one: close to the old tasks that transfer best.

    "ahp": d_i = tau * (1 + (r_i - 1) / 8) with r_i = min(w_max / w_i, 9) from the AHP priorities w: Saaty's 1-9 scale
    mapped onto [tau, 2 tau]. The best old task sits at tau, the distance of an unrelated embedding, and no target
    is closer; 2 tau is as far as the triangle inequality lets the embedding be from one old task while it is tau
    from another that is tau away. (Ratios up to 9 as distances are out of reach at that scale: the fit meets them
    by shrinking gamma to 0.12-0.23, which sets the new task almost on its best old one, where the regulariser holding
    the old task's output also holds the new task's.)
    "minmax": min-max scaling onto the same range, d_i = tau * (1 + (h_max - h_i) / (h_max - h_min)) (all tau when
    the scores are equal), so that the ablation changes the normalisation and not the scale (the authors' earlier
    d_i = (h_max - h_i) + eps + h_min sits at the scores' own scale, far inside tau); "none": no guidance (returns
    None).

    ``related`` (a mask over the old tasks: those that beat the frozen backbone beyond the noise) picks the targets
    to halve, to [tau / 2, tau]: with ``inherit_from="best"`` (the default) only the top-scoring related old task's,
    with "related" every related one's. The new task starts nearer to it than any unrelated embedding is, and
    inherits its generated weights; where related scores tie within the noise, AHP gives them near-equal targets,
    and halving them all would start the new task among them, inheriting their average. Without a related old task
    every target stays at tau or beyond and ``min_distance`` (tau) asks ``fit_h_embedding`` for a fresh start: a
    random embedding at least that far from every old one.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    h = _vector(scores, "scores")
    E = _matrix(old_embeddings, "old_embeddings")
    if E.shape[0] != h.size:
        raise ValueError(f"{h.size} scores but {E.shape[0]} old embeddings")
    if normalisation == "none":
        return None
    tau = median_pairwise_distance(E)
    ratio = None
    if normalisation == "minmax":
        spread = h.max() - h.min()
        distances = tau * (1.0 + ((h.max() - h) / spread if spread > 0 else np.zeros_like(h)))
    else:
        weights, ratio = ahp_priorities(h, resampled)
        # The eigenvector of an inconsistent matrix can spread past Saaty's 1-9 range: clip to it.
        saaty = np.minimum(weights.max() / weights, 9.0)
        distances = tau * (1.0 + (saaty - 1.0) / 8.0)
    mask = np.zeros(h.shape, dtype=bool) if related is None else np.asarray(related, dtype=bool)
    if mask.shape != h.shape:
        raise ValueError(f"related must mark each of the {h.size} old tasks, got shape {mask.shape}")
    if inherit_from not in INHERIT_FROM:
        raise ValueError(f"inherit_from must be one of {INHERIT_FROM}, got {inherit_from!r}")
    if inherit_from == "best" and mask.any():
        mask = np.arange(h.size) == np.flatnonzero(mask)[np.argmax(h[mask])]
    distances = np.where(mask, INHERIT_SCALE * distances, distances)
    return Targets(distances, ratio, None if mask.any() else tau)


GAMMA_PRIOR = 1e-3


class HEmbedding(NamedTuple):
    """The fitted embedding, its scale gamma, and how well its distances follow the targets."""

    embedding: torch.Tensor
    gamma: float
    rank_correlation: float | None  # Spearman of the fitted distances with the targets (two or more old tasks)


def _fit_loss(
    e: torch.Tensor, log_gamma: torch.Tensor, E: torch.Tensor, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each start's loss (``fit_h_embedding``) and its gradients in e and log gamma, by hand: autograd's bookkeeping
    is most of the cost of a problem this small."""
    target = log_gamma.exp()[:, None] * D
    offset = e[:, None] - E
    distance = torch.sqrt((offset**2).sum(-1) + 1e-18)
    residual, norm = target - distance, (target**2).sum(1)
    # + a weak pull of gamma towards 1: targets with (nearly) equal ratios are met exactly by points arbitrarily far
    # away at any large gamma; this keeps the embedding at the scale the targets were set in (tau)
    loss = (residual**2).sum(1) / norm + GAMMA_PRIOR * log_gamma**2
    grad_e = -2 * ((residual / distance)[:, :, None] * offset).sum(1) / norm[:, None]
    grad_log_gamma = 2 * (residual * distance).sum(1) / norm + 2 * GAMMA_PRIOR * log_gamma
    return loss, grad_e, grad_log_gamma


def fit_h_embedding(
    old_embeddings,
    target_distances,
    *,
    steps: int = 500,
    lr: float = 0.05,
    seed: int = 0,
    dim: int | None = None,
    starts: int = 8,
    min_distance: float | None = None,
) -> HEmbedding:
    """The H-embedding: argmin over e (and a scale gamma) of sum_i (gamma d_i - ||e - e_i||)^2 / sum_i (gamma d_i)^2
    + 1e-3 log(gamma)^2.

    gamma is learnt once there are two or more old tasks (with one, any distance is reachable at gamma = 1). The
    relative squared error is smooth (Adam converges instead of circling a kink) and has no degenerate gamma -> 0;
    the weak prior on gamma picks, among exact fits, the one at the targets' own scale rather than one far away.
    The fit runs from ``starts`` points at once (near the old embeddings with the smallest targets, and their
    centroid) with a cosine-decayed learning rate, and keeps the best. Without old tasks the H-embedding is a seeded
    N(0, 1) vector of size ``dim``.

    ``min_distance`` asks for a fresh start (no old task to inherit from): the seeded N(0, 1) vector, as a random
    embedding starts, moved straight away from its nearest old embedding until every one is at least that far. Not
    the fit: it starts near the old embeddings and stops as soon as they are far enough, so with one old task it ends
    at cosine 0.2-0.6 with it and 1.3-1.7 times its norm, sharing its generated weights (the second task of the domain
    and mixed sequences ended 3.2 points below no guidance's random start). Deterministic for a seed; the global RNG
    is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(old_embeddings, torch.Tensor):
        old_embeddings = old_embeddings.detach().cpu().numpy()
    old = np.asarray(old_embeddings, dtype=np.float64)
    if old.size == 0:
        if dim is None:
            raise ValueError("dim is required when there are no old embeddings")
        return HEmbedding(torch.randn(dim, generator=generator), 1.0, None)
    old = _matrix(old, "old_embeddings")
    d = _vector(target_distances, "target_distances")
    if d.size != old.shape[0]:
        raise ValueError(f"{d.size} target distances but {old.shape[0]} old embeddings")
    if (d <= 0).any():
        raise ValueError("target distances must be positive")
    if dim is not None and dim != old.shape[1]:
        raise ValueError(f"dim={dim} but the old embeddings have dimension {old.shape[1]}")

    E = torch.as_tensor(old, dtype=torch.float64)
    D = torch.as_tensor(d, dtype=torch.float64)
    if min_distance is not None:
        fresh = torch.randn(E.shape[1], generator=generator, dtype=torch.float64)
        # a hair beyond the bound, so that it still holds once the embedding is cast to float32
        return _fitted(_keep_away(fresh, E, min_distance * (1 + 1e-6)), 1.0, E, d)
    spread = float(torch.cdist(E, E).max()) if E.shape[0] > 1 else float(D[0])
    nearest = torch.argsort(D, stable=True)[: max(1, starts - 1)]
    inits = torch.cat([E[nearest], E.mean(0, keepdim=True)])
    e = inits + 0.05 * spread * torch.randn(inits.shape, generator=generator, dtype=torch.float64)
    learn_gamma = E.shape[0] >= 2
    # gamma starts at the least-squares scale of each start's distances
    scale = (torch.cdist(e, E) * D).sum(1) / (D * D).sum()
    log_gamma = torch.log(scale) if learn_gamma else torch.zeros_like(scale)
    optimizer = torch.optim.Adam([e, log_gamma] if learn_gamma else [e], lr=lr * spread)
    schedule = cosine_schedule(optimizer, steps)

    for _ in range(steps):
        _, e.grad, log_gamma.grad = _fit_loss(e, log_gamma, E, D)
        optimizer.step()
        schedule.step()
    best = int(_fit_loss(e, log_gamma, E, D)[0].argmin())
    return _fitted(e[best], float(log_gamma[best].exp()), E, d)


def _fitted(embedding: torch.Tensor, gamma: float, E: torch.Tensor, targets: np.ndarray) -> HEmbedding:
    distances = torch.linalg.vector_norm(embedding - E, dim=1).numpy()
    rank = float(spearmanr(distances, targets).statistic) if targets.size >= 2 and np.ptp(targets) > 0 else None
    return HEmbedding(embedding.float(), gamma, rank)


def _keep_away(e: torch.Tensor, E: torch.Tensor, radius: float, candidates: int = 64) -> torch.Tensor:
    """The nearest point to e, along the ray from e's nearest old embedding through e, at least ``radius`` from every
    old embedding: the step that puts that one at ``radius``, if it clears the others, else the first of
    ``candidates`` evenly spaced longer steps that does. The longest, radius + the farthest distance, always does."""
    distance = torch.linalg.vector_norm(e - E, dim=1)
    if distance.min() >= radius:
        return e
    nearest = int(distance.argmin())
    direction = (e - E[nearest]) / distance[nearest].clamp_min(1e-12)
    least, most = radius - distance[nearest], radius + distance.max()
    steps = least + (most - least) * torch.arange(candidates + 1, dtype=e.dtype) / candidates
    moved = e + steps[:, None] * direction
    clear = (torch.linalg.vector_norm(moved[:, None] - E, dim=-1).min(1).values >= radius * (1 - 1e-9)).nonzero()
    return moved[int(clear[0])]


class GuidedEmbedding(NamedTuple):
    scores: np.ndarray  # every old task's transferability to the new task, in [0, 1]
    embedding: torch.Tensor | None  # the H-embedding; None without guidance (normalisation "none")
    gamma: float | None
    consistency_ratio: float | None
    rank_correlation: float | None
    reference: np.ndarray | None = None  # the frozen backbone's score in each old task's place
    beats_reference: np.ndarray | None = None  # how surely each old task beats it (share of resamples)
    related: np.ndarray | None = None  # the old tasks the new one starts near (None: no reference to judge by)
    beats_pooled_reference: np.ndarray | None = None  # relatedness_pooled: how surely its pooled features beat the
    # frozen backbone's, where its head beat its own reference (NaN elsewhere)


def guided_embedding(
    old_embeddings: np.ndarray,
    features_of: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    config: HyperLoraConfig,
    *,
    seed: int = 0,
    heads: Sequence[nn.Module] | None = None,
    router=None,
) -> GuidedEmbedding:
    """The stage before a new task trains: the old tasks' transferability to it (``features_of`` and ``labels`` are
    its sampled images, as ``old_task_features`` reads them; ``features_of(i, first)``: on the first images only, for
    ``screen_old_tasks``), which old tasks beat the frozen backbone (``frozen_reference``; with
    ``relatedness_pooled``, by their pooled features too), the target distances, and the fitted H-embedding."""
    kind, num_old = config.h_score_features, len(old_embeddings)
    read = screen_old_tasks(
        kind,
        num_old,
        features_of,
        labels,
        keep=config.h_score_finalists,
        samples=config.h_score_screen_samples,
        heads=heads,
        shrinkage=config.h_score_shrinkage,
    )
    pooled = None
    if kind == "head" and config.relatedness_pooled:  # one read of every old task's adapter serves both
        pooled = old_task_features("pooled", num_old, features_of, read=read)
        old_features = head_logits(heads, pooled)
    else:
        old_features = old_task_features(kind, num_old, features_of, heads=heads, router=router, read=read)
    frozen = None if kind == "lda" else features_of(None)
    estimate = functools.partial(
        transferability,
        labels=labels,
        shrinkage=config.h_score_shrinkage,
        resamples=config.h_score_resamples,
        seed=seed,  # the same resamples for both readings
    )
    scores = estimate(
        old_features, reference=None if frozen is None else frozen_reference(kind, num_old, frozen, heads)
    )
    related = by_pooled = None
    if scores.beats_reference is not None:
        related = related_old_tasks(scores.beats_reference, config.relatedness_confidence)
    if pooled is not None:  # the second test, only where the first passed (m stays every old task)
        by_pooled, tested = np.full(num_old, np.nan), np.flatnonzero(related)
        if tested.size:
            reference, adapted = principal_subspace(frozen, [pooled[i] for i in tested], config.relatedness_pooled_dims)
            by_pooled[tested] = estimate(adapted, reference=[reference]).beats_reference
        related = related_old_tasks(by_pooled, config.relatedness_confidence)
    judged = {
        "reference": scores.reference,
        "beats_reference": scores.beats_reference,
        "related": related,
        "beats_pooled_reference": by_pooled,
    }
    targets = target_distances(
        scores.scores,
        old_embeddings,
        normalisation=config.normalisation,
        resampled=scores.resampled,
        related=related,
        inherit_from=config.inherit_from,
    )
    if targets is None:
        return GuidedEmbedding(scores.scores, None, None, None, None, **judged)
    fitted = fit_h_embedding(
        old_embeddings, targets.distances, steps=config.h_embedding_steps, seed=seed, min_distance=targets.min_distance
    )
    return GuidedEmbedding(
        scores.scores, fitted.embedding, fitted.gamma, targets.consistency_ratio, fitted.rank_correlation, **judged
    )
