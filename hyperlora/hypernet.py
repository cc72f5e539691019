"""The hypernetwork: (task embedding, module embedding) -> that module's LoRA factors A and B."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn


class HypernetOutput(NamedTuple):
    """Generated factors for T tasks; ``A[m]`` is (T, r, in_m), ``B[m]`` is (T, out_m, r)."""

    hidden: torch.Tensor  # (T, M, hidden_dim): the trunk activation, read by the guidance decoder
    A: list[torch.Tensor]
    B: list[torch.Tensor]


def _shape_key(shape: tuple[int, int]) -> str:
    out_features, in_features = shape
    return f"{out_features}x{in_features}"


class HyperNetwork(nn.Module):
    """One shared MLP trunk on [e_t ; c_m] and one output head per distinct (out, in) weight shape.

    Modules of the same shape share a head and are told apart by their module embedding c_m, so the parameter count
    grows with the number of distinct shapes, not with depth. The B half of every head starts at exactly zero: a
    fresh adapter leaves the base model's outputs unchanged.
    """

    def __init__(
        self,
        module_shapes: Sequence[tuple[int, int]],
        *,
        r: int,
        task_embedding_dim: int,
        module_embedding_dim: int,
        hidden_dim: int,
        num_layers: int,
    ) -> None:
        super().__init__()
        if not module_shapes:
            raise ValueError("HyperNetwork needs at least one module shape")
        self.r = r
        self.module_shapes = [tuple(s) for s in module_shapes]
        self.task_embedding_dim = task_embedding_dim
        self.task_embeddings = nn.ParameterList()
        self.module_embeddings = nn.Parameter(torch.randn(len(self.module_shapes), module_embedding_dim))

        layers: list[nn.Module] = []
        width = task_embedding_dim + module_embedding_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)

        # Output multiplier on the heads' weight path: Adam moves every weight by about lr per step, and each output
        # sums hidden_dim of them, so without it B would move ~hidden_dim times faster than a LoRA B trained directly.
        self.output_scale = 1.0 / hidden_dim
        self.heads = nn.ModuleDict()
        groups: dict[str, list[int]] = {}
        for m, shape in enumerate(self.module_shapes):
            groups.setdefault(_shape_key(shape), []).append(m)
        for key, members in groups.items():
            out_features, in_features = self.module_shapes[members[0]]
            head = nn.Linear(hidden_dim, r * in_features + out_features * r)
            _init_head(head, r * in_features, in_features, hidden_dim)
            self.heads[key] = head
            self.register_buffer(f"_members_{key}", torch.tensor(members), persistent=False)
        self._groups = groups
        # Runtime state, not saved: which task calls without task_ids use, and which one is merged.
        self.active_task: int | None = None
        self.merged_task: int | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_embeddings)

    @property
    def num_modules(self) -> int:
        return len(self.module_shapes)

    def add_task(self, embedding: torch.Tensor | None = None) -> int:
        """Append a task embedding (N(0, 1) unless given) and return its id."""
        device = self.module_embeddings.device
        if embedding is None:
            embedding = torch.randn(self.task_embedding_dim)
        try:
            embedding = torch.as_tensor(embedding)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"task embedding must be a real tensor, got {type(embedding).__name__}: {exc}") from None
        if embedding.dtype.is_complex or embedding.dtype == torch.bool:  # casting would drop or invent values
            raise TypeError(f"task embedding must be a real tensor, got dtype {embedding.dtype}")
        embedding = embedding.to(torch.float32).detach().clone()
        if embedding.shape != (self.task_embedding_dim,):
            raise ValueError(
                f"task embedding must have shape ({self.task_embedding_dim},), got {tuple(embedding.shape)}"
            )
        if not torch.isfinite(embedding).all():
            raise ValueError("task embedding contains NaN or Inf")
        self.task_embeddings.append(nn.Parameter(embedding.to(device)))
        return self.num_tasks - 1

    def resize_tasks(self, num_tasks: int) -> None:
        """Grow the task list to ``num_tasks`` entries (values are overwritten by the checkpoint being loaded)."""
        while self.num_tasks < num_tasks:
            self.add_task(torch.zeros(self.task_embedding_dim))

    def check_task(self, task_id: int) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"task id must be an int, got {type(task_id).__name__}")
        if not 0 <= task_id < self.num_tasks:
            known = f"0..{self.num_tasks - 1}" if self.num_tasks else "none yet: call add_task() first"
            raise ValueError(f"unknown task id {task_id}; known task ids: {known}")
        return task_id

    def stacked_task_embeddings(self, task_ids: Sequence[int] | None = None) -> torch.Tensor:
        ids = range(self.num_tasks) if task_ids is None else task_ids
        return torch.stack([self.task_embeddings[i] for i in ids])

    def forward(self, task_embeddings: torch.Tensor) -> HypernetOutput:
        """Generate every module's (A, B) for a batch of task embeddings of shape (T, task_embedding_dim)."""
        num_tasks = task_embeddings.shape[0]
        modules = self.module_embeddings.unsqueeze(0).expand(num_tasks, -1, -1)
        tasks = task_embeddings.unsqueeze(1).expand(-1, self.num_modules, -1)
        hidden = self.trunk(torch.cat([tasks, modules], dim=-1))
        A: list[torch.Tensor] = [hidden] * self.num_modules  # placeholders, all overwritten below
        B: list[torch.Tensor] = [hidden] * self.num_modules
        for key, head in self.heads.items():
            members = self._groups[key]
            out_features, in_features = self.module_shapes[members[0]]
            selected = hidden.index_select(1, getattr(self, f"_members_{key}"))
            # output_scale multiplies the (small) hidden input, so no backward pass scales a head-sized gradient
            flat = torch.addmm(head.bias, selected.flatten(0, 1) * self.output_scale, head.weight.t())
            flat = flat.view(num_tasks, len(members), -1)
            a, b = flat.split([self.r * in_features, out_features * self.r], dim=-1)
            # unbind, not a[:, j] per member: its backward is one stack, where per-member selects would each
            # build and sum a gradient the size of the whole group
            a = a.reshape(num_tasks, -1, self.r, in_features).unbind(1)
            b = b.reshape(num_tasks, -1, out_features, self.r).unbind(1)
            for j, m in enumerate(members):
                A[m] = a[j]
                B[m] = b[j]
        return HypernetOutput(hidden, A, B)

    def version(self) -> tuple:
        """Changes whenever any parameter is replaced or updated in place: the key of the weight cache."""
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())


def _init_head(head: nn.Linear, a_size: int, in_features: int, hidden_dim: int) -> None:
    # A: a LoRA-like random projection (kaiming-uniform bound 1/sqrt(in)) shared through the bias, plus a smaller
    # task- and module-dependent part through the (output_scale-multiplied) weight. B: exactly zero.
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:a_size].normal_(0.0, 0.5 * bound * math.sqrt(hidden_dim))
        head.bias[:a_size].uniform_(-bound, bound)
