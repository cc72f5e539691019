"""The learning-rate schedule every optimisation in the project follows: the trainer's, the H-embedding fit's and the
benchmarks' baselines', so that their comparisons differ in what they train, not in how."""

from __future__ import annotations

import math

import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's learning rate to zero over ``total_steps``, then zero."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
