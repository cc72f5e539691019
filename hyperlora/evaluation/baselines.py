"""Closed-form classifiers on the frozen backbone's features: the floor any continual learner must clear.

- ``linear_probe`` (task-incremental): a logistic regression per task on its own standardised features;
- ``ncm`` (class-incremental): nearest class mean by cosine similarity, SimpleCIL's classifier;
- ``lda`` (class-incremental): one Gaussian per class with a shared, shrunk covariance and equal priors;
- ``ranpac`` (class-incremental): a fixed random ReLU projection of the features to ``ranpac_dim`` dimensions, then
  the same LDA (RanPAC's recipe).

Like the continual learner, they see the tasks one at a time and keep no old sample: NCM and LDA keep class sums
and one covariance (the router's statistics), the probe keeps its weights, RanPAC its projection and statistics.
Nothing here trains for epochs, so the numbers do not depend on a budget.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..method.router import GaussianRouter

CLASS_INCREMENTAL = ("ncm", "lda", "ranpac")


class FrozenBaselines:
    """Fit with ``add_task`` as tasks arrive; ``predict`` names the global class of each row by every classifier.

    ``lda`` is a ``GaussianRouter``: the trainer routes class-incremental samples with this same classifier.
    """

    def __init__(self, feature_dim: int, *, shrinkage: float = 0.1, ranpac_dim: int = 0, seed: int = 0) -> None:
        self.lda = GaussianRouter(feature_dim, shrinkage=shrinkage)
        self.probes: list[dict[str, torch.Tensor]] = []  # per task: mean, scale, weight, bias, classes
        self.projection = None
        self.ranpac = None
        if ranpac_dim > 0:
            generator = torch.Generator().manual_seed(seed)
            self.projection = torch.randn(feature_dim, ranpac_dim, generator=generator, dtype=torch.float64)
            self.ranpac = GaussianRouter(ranpac_dim, shrinkage=shrinkage)

    @property
    def methods(self) -> tuple[str, ...]:
        return CLASS_INCREMENTAL if self.ranpac is not None else CLASS_INCREMENTAL[:2]

    def add_task(self, task_id: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One task's training features (n, d) and global labels; the task ids must come in order 0, 1, ..."""
        if task_id != len(self.probes):
            raise ValueError(f"tasks must be added in order: expected task {len(self.probes)}, got {task_id}")
        features = torch.as_tensor(features).to(torch.float64).cpu()
        labels = torch.as_tensor(labels).long().cpu()
        self.lda.update(features, labels, task_id)
        if self.ranpac is not None:
            self.ranpac.update(self._project(features), labels, task_id)
        scaler = StandardScaler().fit(features.numpy())
        # one BLAS thread: on a problem this small, threads cost more in handoffs than they save (5x on 2 cores)
        with threadpool_limits(limits=1, user_api="blas"):
            probe = LogisticRegression(max_iter=2000).fit(scaler.transform(features.numpy()), labels.numpy())
        weight, bias = probe.coef_, probe.intercept_
        if weight.shape[0] == 1:  # sklearn keeps one row for two classes: its logit is the second class's
            weight, bias = np.concatenate([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        self.probes.append(
            {
                "mean": torch.as_tensor(scaler.mean_),
                "scale": torch.as_tensor(scaler.scale_),
                "weight": torch.as_tensor(weight),
                "bias": torch.as_tensor(bias),
                "classes": torch.as_tensor(probe.classes_).long(),
            }
        )

    def probe_predict(self, task_id: int, features: torch.Tensor) -> torch.Tensor:
        """Task-incremental: the global class among ``task_id``'s own classes."""
        probe = self.probes[task_id]
        x = (torch.as_tensor(features).to(torch.float64).cpu() - probe["mean"]) / probe["scale"]
        return probe["classes"][(x @ probe["weight"].T + probe["bias"]).argmax(1)]

    def predict(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class-incremental: the global class among every class seen so far, by each classifier."""
        features = torch.as_tensor(features).to(torch.float64).cpu()
        predictions = {"lda": self.lda.predict(features)[0], "ncm": self._ncm(features)}
        if self.ranpac is not None:
            predictions["ranpac"] = self.ranpac.predict(self._project(features))[0]
        return {name: predictions[name] for name in self.methods}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but RanPAC (its statistics are ranpac_dim squared: recompute rather than checkpoint)."""
        state = {f"lda.{key}": value for key, value in self.lda.state_dict().items()}
        for t, probe in enumerate(self.probes):
            state.update({f"probe.{t}.{key}": value.contiguous().clone() for key, value in probe.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.ranpac is not None:
            raise ValueError("RanPAC's statistics are not checkpointed: load into FrozenBaselines(ranpac_dim=0)")
        self.lda.load_state_dict({key[4:]: value for key, value in state.items() if key.startswith("lda.")})
        num_tasks = len({key.split(".")[1] for key in state if key.startswith("probe.")})
        self.probes = [
            {key: state[f"probe.{t}.{key}"] for key in ("mean", "scale", "weight", "bias", "classes")}
            for t in range(num_tasks)
        ]

    def _ncm(self, features: torch.Tensor) -> torch.Tensor:
        seen = self.lda.counts > 0
        means = self.lda.sums[seen] / self.lda.counts[seen, None]
        similarity = F.normalize(features, dim=1) @ F.normalize(means, dim=1).T
        return torch.nonzero(seen).squeeze(1)[similarity.argmax(1)]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features @ self.projection)
