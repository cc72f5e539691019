"""Class-incremental routing: which task does a test sample belong to, when nobody says?"""

from __future__ import annotations

import torch


class GaussianRouter:
    """LDA over the frozen backbone's features: one mean per class and one shared covariance.

    Only sufficient statistics are kept (per-class count and sum, and the total sum of outer products), so no
    sample of an old task is stored and tasks can be added one at a time. ``shrinkage`` blends the covariance with
    a scaled identity, which keeps the solve well conditioned when a task has fewer samples than feature dimensions.
    """

    def __init__(self, feature_dim: int, shrinkage: float = 0.1) -> None:
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.feature_dim = feature_dim
        self.shrinkage = shrinkage
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.sums = torch.zeros(0, feature_dim, dtype=torch.float64)
        self.outer = torch.zeros(feature_dim, feature_dim, dtype=torch.float64)
        self.class_to_task = torch.zeros(0, dtype=torch.long)
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def seen_tasks(self) -> list[int]:
        return sorted(set(self.class_to_task[self.counts > 0].tolist()))

    def update(self, features: torch.Tensor, labels: torch.Tensor, task_id: int) -> None:
        """Add one task's training features; ``labels`` are global class ids."""
        features = torch.as_tensor(features).to(torch.float64).cpu()
        labels = torch.as_tensor(labels).long().cpu()
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (n, {self.feature_dim}), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have one entry per feature row ({features.shape[0]}), got {labels.shape}")
        if (labels < 0).any():
            raise ValueError("class ids must be non-negative")
        size = int(labels.max()) + 1
        if size > self.counts.numel():
            grow = size - self.counts.numel()
            self.counts = torch.cat([self.counts, torch.zeros(grow, dtype=torch.float64)])
            self.sums = torch.cat([self.sums, torch.zeros(grow, self.feature_dim, dtype=torch.float64)])
            self.class_to_task = torch.cat([self.class_to_task, torch.full((grow,), -1, dtype=torch.long)])
        present = labels.unique()
        owners = self.class_to_task[present]
        clash = present[(owners >= 0) & (owners != task_id)]
        if clash.numel():
            raise ValueError(f"classes {clash.tolist()} already belong to another task: use global class ids")
        self.class_to_task[present] = task_id
        self.counts.index_add_(0, labels, torch.ones(labels.shape[0], dtype=torch.float64))
        self.sums.index_add_(0, labels, features)
        self.outer += features.T @ features
        self._solved = None

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._solved is None:
            seen = self.counts > 0
            if not seen.any():
                raise RuntimeError("the router has seen no task yet: call update() first")
            counts, sums = self.counts[seen], self.sums[seen]
            means = sums / counts[:, None]
            dof = max(float(counts.sum()) - means.shape[0], 1.0)
            covariance = (self.outer - (means.T * counts) @ means) / dof
            d = self.feature_dim
            regularised = (1 - self.shrinkage) * covariance + self.shrinkage * (
                torch.trace(covariance) / d
            ) * torch.eye(d, dtype=torch.float64)
            regularised += 1e-9 * torch.eye(d, dtype=torch.float64) * max(float(torch.trace(covariance)) / d, 1e-12)
            weights = torch.linalg.solve(regularised, means.T)  # (d, C): Sigma^-1 mu_c
            bias = -0.5 * (means * weights.T).sum(-1)
            classes = torch.nonzero(seen).squeeze(1)
            self._solved = (weights, bias, classes)
        return self._solved

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global class id, task id) of each row, by the LDA score with equal class priors."""
        weights, bias, classes = self._solve()
        predicted = classes[(self._check(features) @ weights + bias).argmax(-1)]
        return predicted, self.class_to_task[predicted]

    def discriminant(self, task_id: int) -> torch.Tensor:
        """(feature_dim, C_i): the LDA directions Sigma^-1 mu_c of one task's classes. Features times these are the
        scores (up to a shift) that task's own classes get: the frozen backbone seen through that task."""
        weights, _, classes = self._solve()
        mine = self.class_to_task[classes] == task_id
        if not mine.any():
            raise ValueError(f"the router has not seen task {task_id}; seen tasks: {self.seen_tasks}")
        return weights[:, mine]

    def _check(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.as_tensor(features).to(torch.float64).cpu()
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (n, {self.feature_dim}), got {tuple(features.shape)}")
        return features

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "counts": self.counts.clone(),
            "sums": self.sums.clone(),
            "outer": self.outer.clone(),
            "class_to_task": self.class_to_task.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        d = self.feature_dim
        if state["outer"].shape != (d, d) or state["sums"].shape[1:] != (d,):
            raise ValueError(f"router state is for features of dimension {state['outer'].shape[0]}, not {d}")
        self.counts = state["counts"].to(torch.float64)
        self.sums = state["sums"].to(torch.float64)
        self.outer = state["outer"].to(torch.float64)
        self.class_to_task = state["class_to_task"].long()
        self._solved = None

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], shrinkage: float = 0.1) -> GaussianRouter:
        router = cls(state["outer"].shape[0], shrinkage=shrinkage)
        router.load_state_dict(state)
        return router


def entropy_route(logits_per_task: list[torch.Tensor]) -> torch.Tensor:
    """The task whose head is most confident (lowest softmax entropy) on each sample: T forward passes."""
    if not logits_per_task:
        raise ValueError("entropy_route needs the logits of at least one task")
    entropies = []
    for logits in logits_per_task:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        entropies.append(-(log_p.exp() * log_p).sum(-1))
    return torch.stack(entropies, dim=-1).argmin(-1)
