"""From H-scores to a task embedding: AHP priorities, target distances, and the embedding that fits them."""

from __future__ import annotations

import numpy as np
import torch

NORMALISATIONS = ("ahp", "minmax", "none")

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


def pairwise_comparison_matrix(scores) -> np.ndarray:
    """Saaty's 1-9 scale: the best old task is up to 9 times as important as the worst, linearly in the score."""
    h = _vector(scores, "scores")
    spread = h.max() - h.min()
    if spread == 0:
        return np.ones((h.size, h.size))
    upper = 1.0 + 8.0 * (h[:, None] - h[None, :]) / spread  # P_ik for h_i >= h_k
    return np.where(h[:, None] >= h[None, :], upper, 1.0 / upper.T)


def random_index(n: int) -> float:
    """Saaty's table up to 15; beyond it the index flattens out, so the last value is kept."""
    return _RANDOM_INDEX[min(n, len(_RANDOM_INDEX)) - 1]


def ahp_priorities(scores) -> tuple[np.ndarray, float]:
    """(priority weights summing to 1, consistency ratio) from the principal eigenvector of the comparison matrix."""
    P = pairwise_comparison_matrix(scores)
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
    """tau: the typical spacing of the old task embeddings (1.0 while there are fewer than two)."""
    E = _matrix(embeddings, "embeddings")
    if E.shape[0] < 2:
        return 1.0
    distances = np.linalg.norm(E[:, None] - E[None, :], axis=-1)
    return float(np.median(distances[np.triu_indices(E.shape[0], k=1)]))


def target_distances(scores, old_embeddings, normalisation: str = "ahp", eps: float = 1e-3) -> np.ndarray | None:
    """How far the new task's embedding should sit from each old one: close to the old tasks that transfer best.

    "ahp": d_i = tau * min(w_max / w_i, 9) (the best old task at tau, the rest at most 9 tau); "minmax": the authors'
    earlier d_i = (h_max - h_i) + eps + h_min; "none": no guidance (returns None).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    h = _vector(scores, "scores")
    E = _matrix(old_embeddings, "old_embeddings")
    if E.shape[0] != h.size:
        raise ValueError(f"{h.size} scores but {E.shape[0]} old embeddings")
    if normalisation == "none":
        return None
    if normalisation == "minmax":
        return (h.max() - h) + eps + h.min()
    weights, _ = ahp_priorities(h)
    # The eigenvector of an inconsistent matrix can spread past Saaty's 1-9 range; clip to keep d_i <= 9 tau.
    return median_pairwise_distance(E) * np.minimum(weights.max() / weights, 9.0)


def fit_h_embedding(
    old_embeddings,
    target_distances,
    *,
    steps: int = 2000,
    lr: float = 0.05,
    seed: int = 0,
    dim: int | None = None,
) -> tuple[torch.Tensor, float]:
    """The H-embedding: argmin over e (and a scale gamma) of sum_i | gamma d_i - ||e - e_i|| |.

    gamma is learnt once there are two or more old tasks (with one, any distance is reachable at gamma = 1).
    Without old tasks the H-embedding is a seeded N(0, 1) vector of size ``dim``. Deterministic for a seed; the
    global RNG is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(old_embeddings, torch.Tensor):
        old_embeddings = old_embeddings.detach().cpu().numpy()
    old = np.asarray(old_embeddings, dtype=np.float64)
    if old.size == 0:
        if dim is None:
            raise ValueError("dim is required when there are no old embeddings")
        return torch.randn(dim, generator=generator), 1.0
    old = _matrix(old, "old_embeddings")
    d = _vector(target_distances, "target_distances")
    if d.size != old.shape[0]:
        raise ValueError(f"{d.size} target distances but {old.shape[0]} old embeddings")
    if (d < 0).any():
        raise ValueError("target distances must be non-negative")
    if dim is not None and dim != old.shape[1]:
        raise ValueError(f"dim={dim} but the old embeddings have dimension {old.shape[1]}")

    E = torch.as_tensor(old, dtype=torch.float64)
    D = torch.as_tensor(d, dtype=torch.float64)
    scale = float(E.std()) if E.shape[0] > 1 else 1.0
    e = (E.mean(0) + 0.1 * scale * torch.randn(E.shape[1], generator=generator, dtype=torch.float64)).requires_grad_()
    log_gamma = torch.zeros((), dtype=torch.float64, requires_grad=E.shape[0] >= 2)
    params = [e, log_gamma] if log_gamma.requires_grad else [e]
    optimizer = torch.optim.Adam(params, lr=lr * max(float(D.mean()), 1e-3))
    for _ in range(steps):
        optimizer.zero_grad()
        distance = torch.sqrt(((e - E) ** 2).sum(-1) + 1e-12)
        loss = (log_gamma.exp() * D - distance).abs().sum()
        loss.backward()
        optimizer.step()
    return e.detach().float(), float(log_gamma.detach().exp())
