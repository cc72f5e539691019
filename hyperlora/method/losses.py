"""The two losses that keep the hypernet's memory: the output regulariser and the embedding guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tuner.hypernet import HypernetOutput


def flat_outputs(generated: HypernetOutput) -> torch.Tensor:
    """Every shape group's head outputs side by side, (T, total): what the regulariser compares in one operation."""
    return torch.cat([flat.flatten(1) for flat in generated.flat.values()], dim=1)


def output_regulariser(current: HypernetOutput, rows: list[int], targets: torch.Tensor) -> torch.Tensor:
    """Mean over the sampled old tasks of sum_m ||A_m(e_i) - A*_{i,m}||^2 + ||B_m(e_i) - B*_{i,m}||^2.

    ``current`` holds the hypernet's outputs for the sampled tasks, ``rows`` their positions in the recorded
    ``targets`` (``flat_outputs`` of every old task, recorded from the frozen hypernet before the task started).
    Computed on the heads' outputs, where A's fixed part cancels: a few operations, whatever the number of modules or
    shape groups (one squared distance over all of them; its gradient is the per-module one, exactly).
    """
    index = torch.as_tensor(rows, device=targets.device)
    return F.mse_loss(flat_outputs(current), targets.index_select(0, index), reduction="sum") / len(rows)


class GuidanceDecoder(nn.Module):
    """D: maps the hypernet's hidden activation (averaged over modules) back to the task-embedding space."""

    def __init__(self, hidden_dim: int, embedding_dim: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_dim, width), nn.ReLU(), nn.Linear(width, embedding_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.mean(dim=-2))


def guidance_loss(decoder: GuidanceDecoder, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_emb = 1 - cos(D(h_t), e^_t): ties the generated weights of task t to its H-embedding."""
    return 1.0 - F.cosine_similarity(decoder(hidden), target.expand(hidden.shape[0], -1), dim=-1).mean()


def guidance_weight(task_index: int, slope: float) -> float:
    """beta_emb(t) = min(1, slope * t) with 0-based t: no guidance for the first task."""
    return min(1.0, slope * task_index)
