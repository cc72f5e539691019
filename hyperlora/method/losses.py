"""The two losses that keep the hypernet's memory: the output regulariser and the embedding guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tuner.hypernet import HypernetOutput


def output_regulariser(current: HypernetOutput, rows: list[int], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the sampled old tasks of sum_m ||A_m(e_i) - A*_{i,m}||^2 + ||B_m(e_i) - B*_{i,m}||^2.

    ``current`` holds the hypernet's outputs for the sampled tasks (its first rows), ``rows`` their positions in the
    recorded targets (``targets[key]`` is the shape group's ``flat`` output for every old task, recorded from the
    frozen hypernet before the task started). Computed per shape group on the heads' outputs, where A's fixed part
    cancels: a few operations per group, whatever the number of modules.
    """
    index = torch.as_tensor(rows, device=current.hidden.device)
    # mse_loss: one kernel each way per group, where (a - b).pow(2).sum() launches three forward and more backward
    total = sum(
        F.mse_loss(current.flat[key][: len(rows)], target.index_select(0, index), reduction="sum")
        for key, target in targets.items()
    )
    return total / len(rows)


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
