"""The H-score: how well features transfer to a labelled task, without training anything on them."""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Ledoit-Wolf's optimal shrinkage of the sample covariance of ``centred`` (n x d) towards mu * I."""
    n, d = centred.shape
    covariance = centred.T @ centred / n
    mu = np.trace(covariance) / d
    delta = ((covariance - mu * np.eye(d)) ** 2).sum() / d
    squared = centred**2
    beta = ((squared.T @ squared).sum() / n - (covariance**2).sum()) / (d * n)
    if delta == 0:
        return 0.0
    return float(min(beta, delta) / delta)


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

    centred = F - F.mean(axis=0)
    # a constant column's mean can be one rounding step off: that offset is no signal, and it makes cov_f singular
    centred[:, np.ptp(F, axis=0) == 0] = 0.0
    n, d = centred.shape
    cov_f = centred.T @ centred / n
    if not np.any(cov_f):
        return 0.0
    class_means = np.zeros((len(classes), d))
    np.add.at(class_means, inverse, centred)
    class_means /= np.bincount(inverse)[:, None]
    g = class_means[inverse]
    cov_g = g.T @ g / n
    if not shrinkage:
        return float(np.trace(np.linalg.pinv(cov_f, hermitian=True) @ cov_g))
    alpha = ledoit_wolf_shrinkage(centred)
    shrunk = (1.0 - alpha) * cov_f + alpha * (np.trace(cov_f) / d) * np.eye(d)
    return float(np.trace(np.linalg.solve(shrunk, (1.0 - alpha) * cov_g)))
