"""The class-incremental router against scikit-learn's LDA, streaming updates, and persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from hyperlora.method.router import GaussianRouter, entropy_route


def blobs(seed: int = 0, classes: int = 6, per_class: int = 40, d: int = 5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 2
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), d)), labels


def test_predictions_match_sklearn_lda_with_uniform_priors():
    X, y = blobs()
    router = GaussianRouter(5, shrinkage=0.0)
    for task in range(3):  # classes 2t, 2t+1 belong to task t
        mask = (y // 2) == task
        router.update(torch.tensor(X[mask]), torch.tensor(y[mask]), task)
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(6, 1 / 6)).fit(X, y)
    test, _ = blobs(seed=1)
    classes, tasks = router.predict(torch.tensor(test))
    np.testing.assert_array_equal(classes.numpy(), lda.predict(test))
    np.testing.assert_array_equal(tasks.numpy(), classes.numpy() // 2)
    assert router.num_classes == 6 and router.seen_tasks == [0, 1, 2]


def test_chunked_updates_equal_one_update_and_state_round_trips(tmp_path):
    X, y = blobs()
    whole = GaussianRouter(5)
    whole.update(torch.tensor(X), torch.tensor(y), 0)
    chunked = GaussianRouter(5)
    for part in np.array_split(np.random.default_rng(0).permutation(len(y)), 4):
        chunked.update(torch.tensor(X[part]), torch.tensor(y[part]), 0)
    test = torch.tensor(blobs(seed=2)[0])
    assert torch.equal(whole.predict(test)[0], chunked.predict(test)[0])
    save_file(chunked.state_dict(), tmp_path / "router.safetensors")
    restored = GaussianRouter.from_state_dict(load_file(tmp_path / "router.safetensors"))
    assert torch.equal(restored.predict(test)[0], whole.predict(test)[0])


def test_router_errors():
    router = GaussianRouter(3)
    with pytest.raises(RuntimeError, match="update"):
        router.predict(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        router.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="one entry per feature row"):
        router.update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 0)
    router.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), 0)
    with pytest.raises(ValueError, match="already belong to another task"):
        router.update(torch.randn(2, 3), torch.tensor([1, 2]), 1)


def test_entropy_route_picks_the_most_confident_head():
    confident = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 9.0]])
    assert entropy_route([confident, unsure]).tolist() == [0, 1]


def test_discriminant_is_sklearn_lda_coefficients_of_the_tasks_classes_up_to_scale():
    X, y = blobs()
    router = GaussianRouter(5, shrinkage=0.0)
    for task in range(3):
        mask = (y // 2) == task
        router.update(torch.tensor(X[mask]), torch.tensor(y[mask]), task)
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(X, y)
    directions = router.discriminant(1).numpy()  # classes 2 and 3
    # sklearn divides the within-class scatter by n, the router by n - C: the same directions, scaled
    ratio = directions / lda.coef_[2:4].T
    np.testing.assert_allclose(ratio, np.full_like(ratio, (len(y) - 6) / len(y)), rtol=1e-6)
    with pytest.raises(ValueError, match="has not seen task 3"):
        router.discriminant(3)
