"""The hypernetwork: (task embedding, module embedding) -> that module's LoRA factors A and B."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_optimizer_step(*_) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (AdamW(fused=True), on the CPU and CUDA) update parameters without bumping their version counters,
# so the weight cache's key counts every optimizer step as well.
register_optimizer_step_post_hook(_count_optimizer_step)


class HypernetOutput:
    """Generated factors for T tasks, kept as the heads produced them: one tensor per weight shape.

    ``flat[key]`` is (T, members, r * in + out * r), the group's heads output (A without its fixed part). Factors
    per module are views of it, made on demand with a few operations per shape group, whatever the number of modules:
    ``A[m]`` is (T, r, in_m), ``B[m]`` (T, out_m, r), and ``task_factors(row)`` gives one task's 2-D ones.
    """

    def __init__(self, hidden: torch.Tensor, flat: dict[str, torch.Tensor], hypernet: HyperNetwork) -> None:
        self.hidden = hidden  # (T, M, hidden_dim): the trunk activation
        self.flat = flat
        self._hypernet = hypernet
        self._factors: dict[int | None, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def A(self) -> list[torch.Tensor]:
        return self.task_factors(None)[0]

    @property
    def B(self) -> list[torch.Tensor]:
        return self.task_factors(None)[1]

    def task_factors(self, row: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every module's (A, B) of one generated task (``row``), 2-D, or of all of them (None), with a task axis."""
        if row not in self._factors:
            self._factors[row] = self._hypernet.split(self.flat, row)
        return self._factors[row]

    def split_tasks(self, first: int) -> tuple[HypernetOutput, HypernetOutput]:
        """The first ``first`` tasks' output and the rest's, with one split per tensor: its backward is one
        concatenation, where indexing each part would build a zero gradient the size of the whole and add it."""
        sizes = [first, self.hidden.shape[0] - first]
        hidden = self.hidden.split(sizes)
        flat = {key: tensor.split(sizes) for key, tensor in self.flat.items()}
        return tuple(
            HypernetOutput(hidden[part], {key: parts[part] for key, parts in flat.items()}, self._hypernet)
            for part in (0, 1)
        )


MAX_PACE = 10.0  # the free part's largest scale (protect_tasks' pace_task), so that a tiny free share is not blown up


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
        self._groups = groups
        # the modules in shape-group order: one index_select and one split give every group its hidden rows
        self.register_buffer("_group_order", torch.tensor([m for members in groups.values() for m in members]), False)
        # While a task trains with old tasks protected: each head's free part D (see protect_tasks), and its fixed
        # (U, Q, C, pace) where W = C U^T + pace D Q^T (pace None: 1). Empty otherwise, so saved adapters hold the
        # heads' weights alone.
        self.free = nn.ParameterDict()
        self.fixed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]] = {}
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
        """Generate every module's (A, B) for a batch of task embeddings of shape (T, task_embedding_dim): one matmul
        per shape group."""
        hidden = self.hidden(task_embeddings)
        # output_scale multiplies the (small) hidden input, once for all groups, so that no backward pass scales a
        # head-sized gradient
        scaled_all = (hidden * self.output_scale).index_select(1, self._group_order)
        sizes = [len(members) for members in self._groups.values()]
        flat = {}
        for (key, head), scaled in zip(self.heads.items(), scaled_all.split(sizes, dim=1), strict=True):
            scaled = scaled.contiguous()  # as one (T * members, hidden) matrix: each product below is a single mm
            if key in self.fixed:  # W = C U^T + pace D Q^T, without forming W
                U, Q, C, pace = self.fixed[key]
                free = (scaled @ Q) @ self.free[key].t()
                flat[key] = (scaled @ U) @ C.t() + (free if pace is None else pace * free)
            else:
                flat[key] = scaled @ head.weight.t()
        return HypernetOutput(hidden, flat, self)

    def split(
        self, flat: dict[str, torch.Tensor], row: int | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-module factors from the heads' outputs, of one task ``row`` (2-D) or all tasks (3-D). The views of a
        group come from one unbind each: its backward is one stack, where a select per module would each build and
        sum a gradient the size of the whole group."""
        A: list[torch.Tensor] = [None] * self.num_modules  # every entry is set below
        B: list[torch.Tensor] = [None] * self.num_modules
        for key, members in self._groups.items():
            out_features, in_features = self.module_shapes[members[0]]
            group = flat[key]
            if row is not None:  # of a single task, a view: its backward builds no zero gradient for other rows
                group = group.squeeze(0) if group.shape[0] == 1 else group[row]
            a, b = group.split([self.r * in_features, out_features * self.r], dim=-1)
            a = a.unflatten(-1, (self.r, in_features)) + getattr(self, f"_a0_{key}")
            b = b.unflatten(-1, (out_features, self.r))
            for m, a_m, b_m in zip(members, a.unbind(-3), b.unbind(-3), strict=True):
                A[m], B[m] = a_m, b_m
        return A, B

    @torch.no_grad()
    def head_bases(
        self, task_ids: Sequence[int], max_rank: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For every head, an orthonormal basis [U Q] of the hidden space: U (hidden_dim, k) spans the hidden
        activations the given tasks feed it, Q the rest.

        A head update along Q alone leaves those tasks' generated (A, B) exactly as they were (``protect_tasks``). At
        most ``max_rank`` directions go to U (default: three quarters of hidden_dim, so that new tasks keep room to
        learn); past that capacity, the weakest directions are left to the output regulariser.
        """
        hidden = self.hidden(self.stacked_task_embeddings(task_ids)).float()
        max_rank = max_rank or 3 * hidden.shape[-1] // 4
        bases = {}
        for key, members in self._groups.items():
            rows = hidden[:, members].reshape(-1, hidden.shape[-1])
            basis, S, _ = torch.linalg.svd(rows.T, full_matrices=True)
            keep = int((1e-5 * S.max() < S).sum().clamp(max=max_rank))
            bases[key] = basis[:, :keep].contiguous(), basis[:, keep:].contiguous()
        return bases

    @torch.no_grad()
    def protect_tasks(self, task_ids: Sequence[int], max_rank: int | None = None, pace_task: int | None = None) -> None:
        """Until ``release_tasks``, train each head only in the hidden directions the given tasks do not feed it:
        their generated (A, B) then cannot move through the heads, exactly, whatever the optimizer does.

        Each head W is held as C U^T + D Q^T, with [U Q] an orthonormal basis of the hidden space and U spanning the
        protected tasks' activations (``head_bases``): C = W U is fixed and D, in ``free``, is what trains. An
        optimizer over D steps every free direction at its own pace (Adam: about lr, as a LoRA's weights) and never
        a protected one, and a step costs what an unprotected one costs: no projection before or after it.

        With ``pace_task``, the free part is scaled by pace = |h| / |Q^T h| over that task's activations h at this
        head (at most ``MAX_PACE``), and D starts at W Q / pace: the same weights, but a step of D moves the task's
        generated weights as far as a step of an unprotected head would, however much of h lies in the protected
        directions (a task started near an old one, to inherit from it, overlaps them most).
        """
        self.release_tasks()
        paced = None if pace_task is None else self.hidden(self.stacked_task_embeddings([pace_task]))[0].float()
        for key, (U, Q) in self.head_bases(task_ids, max_rank).items():
            weight = self.heads[key].weight
            pace = None
            if paced is not None:
                h = paced[self._groups[key]]
                pace = float((h.norm() / (h @ Q).norm().clamp_min(1e-12)).clamp(max=MAX_PACE))
            self.fixed[key] = (U, Q, weight @ U, pace)
            self.free[key] = nn.Parameter(weight @ Q / (pace or 1.0), requires_grad=weight.requires_grad)
            weight.requires_grad_(False)

    @torch.no_grad()
    def release_tasks(self) -> None:
        """Fold the free parts back into the heads' weights (W = C U^T + pace D Q^T) and train them whole again."""
        for key, (U, Q, C, pace) in self.fixed.items():
            free = self.free[key]
            weight = self.heads[key].weight
            weight.copy_(C @ U.t() + (pace or 1.0) * free @ Q.t())
            weight.requires_grad_(free.requires_grad)
        self.fixed.clear()
        self.free.clear()

    def version(self) -> tuple:
        """Changes whenever any parameter is replaced or updated in place, or any optimizer steps: the key of the
        weight cache."""
        return _optimizer_steps, tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
