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
    grows with the number of distinct shapes, not with depth.

    Everything a task gets is *odd in its embedding*: the heads read h(e, c) = trunk([e; c]) - trunk([-e; c]), at
    unit mean absolute value, and B = W_B h has no bias. So no part of B is shared by all tasks: training one task
    moves another task's B only as far as their hidden activations overlap, and tasks whose embeddings are far apart
    get unrelated LoRAs while neighbours get similar ones (a task-independent B bias would instead absorb every task's
    training signal and make all tasks' LoRAs alike). A is a fixed random down-projection per weight shape (as LoRA
    initialises A) plus a task-dependent part. B starts at exactly zero: a fresh adapter leaves the base model's
    outputs unchanged.
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

        # Output multiplier on the heads' input: Adam moves every weight by about lr per step, and each output sums
        # hidden_dim of them, so without it B would move ~hidden_dim times faster than a LoRA B trained directly.
        self.output_scale = 1.0 / hidden_dim
        self.heads = nn.ModuleDict()
        groups: dict[str, list[int]] = {}
        for m, shape in enumerate(self.module_shapes):
            groups.setdefault(_shape_key(shape), []).append(m)
        for key, members in groups.items():
            out_features, in_features = self.module_shapes[members[0]]
            head = nn.Linear(hidden_dim, r * in_features + out_features * r, bias=False)
            bound = 1.0 / math.sqrt(in_features)  # LoRA's kaiming-uniform bound for A
            with torch.no_grad():
                head.weight.zero_()
                head.weight[: r * in_features].normal_(0.0, 0.5 * bound * math.sqrt(hidden_dim))
            self.heads[key] = head
            # persistent: the shared A is part of what a saved adapter reproduces
            self.register_buffer(f"_a0_{key}", torch.empty(r, in_features).uniform_(-bound, bound))
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

    def hidden(self, task_embeddings: torch.Tensor) -> torch.Tensor:
        """The trunk's activation for every (task, module) pair, (T, M, hidden_dim): odd in the task embedding."""
        num_tasks = task_embeddings.shape[0]
        modules = self.module_embeddings.unsqueeze(0).expand(2 * num_tasks, -1, -1)
        signed = torch.cat([task_embeddings, -task_embeddings]).unsqueeze(1).expand(-1, self.num_modules, -1)
        both = self.trunk(torch.cat([signed, modules], dim=-1))
        odd = both[:num_tasks] - both[num_tasks:]
        # Unit mean absolute value (still odd): Adam moves each head weight by about lr, so B = W_B h / hidden_dim
        # moves by lr * mean|h| per step, a directly trained LoRA B's pace, whatever the trunk's scale.
        return odd / odd.abs().mean(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, task_embeddings: torch.Tensor) -> HypernetOutput:
        """Generate every module's (A, B) for a batch of task embeddings of shape (T, task_embedding_dim)."""
        num_tasks = task_embeddings.shape[0]
        hidden = self.hidden(task_embeddings)
        A: list[torch.Tensor] = [hidden] * self.num_modules  # placeholders, all overwritten below
        B: list[torch.Tensor] = [hidden] * self.num_modules
        for key, head in self.heads.items():
            members = self._groups[key]
            out_features, in_features = self.module_shapes[members[0]]
            selected = hidden.index_select(1, getattr(self, f"_members_{key}"))
            # output_scale multiplies the (small) hidden input, so no backward pass scales a head-sized gradient
            flat = (selected * self.output_scale) @ head.weight.t()
            a, b = flat.split([self.r * in_features, out_features * self.r], dim=-1)
            # unbind, not a[:, j] per member: its backward is one stack, where per-member selects would each
            # build and sum a gradient the size of the whole group
            a = (a.reshape(num_tasks, -1, self.r, in_features) + getattr(self, f"_a0_{key}")).unbind(1)
            b = b.reshape(num_tasks, -1, out_features, self.r).unbind(1)
            for j, m in enumerate(members):
                A[m] = a[j]
                B[m] = b[j]
        return HypernetOutput(hidden, A, B)

    @torch.no_grad()
    def head_bases(self, task_ids: Sequence[int], max_rank: int | None = None) -> dict[str, torch.Tensor]:
        """For every head, an orthonormal basis (hidden_dim, k) of the hidden activations the given tasks feed it.

        A head update orthogonal to these directions leaves those tasks' generated (A, B) exactly as they were
        (``protect``). At most ``max_rank`` directions are kept (default: three quarters of hidden_dim, so that new
        tasks keep room to learn); past that capacity, the weakest directions are left to the output regulariser.
        """
        hidden = self.hidden(self.stacked_task_embeddings(task_ids)).float()
        max_rank = max_rank or 3 * hidden.shape[-1] // 4
        bases = {}
        for key, members in self._groups.items():
            rows = hidden[:, members].reshape(-1, hidden.shape[-1])
            U, S, _ = torch.linalg.svd(rows.T, full_matrices=False)
            keep = int((1e-5 * S.max() < S).sum().clamp(max=max_rank))
            bases[key] = U[:, :keep].contiguous()
        return bases

    @torch.no_grad()
    def protect(self, bases: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Undo the part of every head's change that moves the protected directions: W <- W - (W U - C) U^T, where
        ``outputs[key]`` = C is W U recorded when the bases were taken (``protected_outputs``)."""
        for key, head in self.heads.items():
            U = bases[key]
            head.weight.addmm_(head.weight @ U - outputs[key], U.T, alpha=-1.0)

    @torch.no_grad()
    def project_gradients(self, bases: dict[str, torch.Tensor]) -> None:
        """Remove from every head's gradient the part along the protected directions, before the optimizer sees it:
        ``protect`` would undo a step there anyway, and Adam, which gives every weight a step of about lr, would
        otherwise spend on those directions what the new task's free directions need."""
        for key, head in self.heads.items():
            if head.weight.grad is not None:
                U = bases[key]
                head.weight.grad.addmm_(head.weight.grad @ U, U.T, alpha=-1.0)

    @torch.no_grad()
    def protected_outputs(self, bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: head.weight @ bases[key] for key, head in self.heads.items()}

    def version(self) -> tuple:
        """Changes whenever any parameter is replaced or updated in place: the key of the weight cache."""
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
