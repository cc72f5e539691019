"""The two losses on the generated weights: the output regulariser (memory) and the embedding guidance (relations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def relation_targets(h_embedding_output: HypernetOutput, old_outputs: torch.Tensor) -> torch.Tensor:
    """kappa_i = cos(f(e^_t), f*_i): how alike the weights the hypernetwork generates for the H-embedding and for each
    old task are, (old tasks,). Read from the frozen hypernetwork when the task starts: the task relations the
    H-embedding encodes, expressed where they act, in the generated weights."""
    return F.cosine_similarity(flat_outputs(h_embedding_output), old_outputs, dim=-1)


def guidance_loss(current: HypernetOutput, old_outputs: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """L_emb = mean_i (cos(f_t, f*_i) - kappa_i)^2 over the given old tasks (``old_outputs``, their recorded
    ``flat_outputs``; ``kappa`` from ``relation_targets``): the generated weights of task t keep the relations of its
    H-embedding to the old tasks' while it trains. Nothing but the hypernetwork and e_t can meet it, so it acts for
    as long as the cross-entropy pulls the weights elsewhere (a decoder of its own, as before, met it within a tenth
    of the task)."""
    return (F.cosine_similarity(flat_outputs(current), old_outputs, dim=-1) - kappa).square().mean()


def guidance_weight(task_index: int, slope: float) -> float:
    """beta_emb(t) = min(1, slope * t) with 0-based t: no guidance for the first task."""
    return min(1.0, slope * task_index)
