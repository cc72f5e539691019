"""Frozen-feature baselines against independent computations: scikit-learn's probe and LDA, a numpy NCM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hyperlora.evaluation.baselines import FrozenBaselines


def two_tasks(seed: int = 0, d: int = 6, per_class: int = 30):
    """Task 0: classes 0, 1 (binary); task 1: classes 2, 3, 4; Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d)) * 1.5
    labels = np.repeat(np.arange(5), per_class)
    return centres[labels] + rng.normal(size=(len(labels), d)), labels


def fitted(ranpac_dim: int = 0, shrinkage: float = 0.0) -> FrozenBaselines:
    X, y = two_tasks()
    baselines = FrozenBaselines(6, shrinkage=shrinkage, ranpac_dim=ranpac_dim, seed=3)
    for task, classes in enumerate(((0, 1), (2, 3, 4))):
        mask = np.isin(y, classes)
        baselines.add_task(task, torch.tensor(X[mask]), torch.tensor(y[mask]))
    return baselines


@pytest.mark.parametrize("task, classes", [(0, (0, 1)), (1, (2, 3, 4))])
def test_linear_probe_matches_sklearn_including_the_binary_case(task, classes):
    X, y = two_tasks()
    mask = np.isin(y, classes)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[mask], y[mask])
    test = two_tasks(seed=1)[0]
    np.testing.assert_array_equal(fitted().probe_predict(task, torch.tensor(test)).numpy(), reference.predict(test))


def test_lda_and_ranpac_match_sklearn_lda_and_ncm_matches_numpy():
    X, y = two_tasks()
    test = two_tasks(seed=2)[0]
    baselines = fitted(ranpac_dim=20)
    predictions = baselines.predict(torch.tensor(test))
    assert set(predictions) == {"ncm", "lda", "ranpac"}
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(5, 0.2)).fit(X, y)
    np.testing.assert_array_equal(predictions["lda"].numpy(), lda.predict(test))
    projection = baselines.projection.numpy()
    projected = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(5, 0.2)).fit(np.maximum(X @ projection, 0), y)
    np.testing.assert_array_equal(predictions["ranpac"].numpy(), projected.predict(np.maximum(test @ projection, 0)))
    means = np.stack([X[y == c].mean(0) for c in range(5)])
    cosine = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1)[:, None]).T
    np.testing.assert_array_equal(predictions["ncm"].numpy(), cosine.argmax(1))


def test_state_round_trips_through_safetensors(tmp_path):
    baselines = fitted(shrinkage=0.1)
    save_file(baselines.state_dict(), tmp_path / "baselines.safetensors")
    restored = FrozenBaselines(6, shrinkage=0.1)
    restored.load_state_dict(load_file(tmp_path / "baselines.safetensors"))
    test = torch.tensor(two_tasks(seed=3)[0])
    for name, predicted in baselines.predict(test).items():
        assert torch.equal(restored.predict(test)[name], predicted), name
    for task in range(2):
        assert torch.equal(restored.probe_predict(task, test), baselines.probe_predict(task, test))
    with pytest.raises(ValueError, match="not checkpointed"):
        FrozenBaselines(6, ranpac_dim=4).load_state_dict(baselines.state_dict())


def test_tasks_must_arrive_in_order():
    X, y = two_tasks()
    with pytest.raises(ValueError, match="expected task 0, got 1"):
        FrozenBaselines(6).add_task(1, torch.tensor(X), torch.tensor(y))
