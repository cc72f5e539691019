"""A training step's operator calls (benchmarks/operators.py): HyperLoRA's per-block work is exactly PEFT LoRA's, and
its optimizer's calls do not depend on the number of modules, so its extra calls over LoRA are the same at any depth."""

from __future__ import annotations

import operators


def test_hyperlora_extra_operator_calls_do_not_change_with_the_adapted_blocks():
    shallow = operators.step_operator_calls("vit_tiny_patch16_224", depth=3, num_tasks=3)
    deep = operators.step_operator_calls("vit_tiny_patch16_224", depth=6, num_tasks=3)
    per_block = {
        key: (deep[key] - shallow[key]) / 3
        for key in ("lora_forward_backward", "lora_optimizer", "hyperlora_forward_backward", "hyperlora_optimizer")
    }
    assert per_block["lora_forward_backward"] > 50  # the count sees the blocks' work
    assert per_block["hyperlora_forward_backward"] == per_block["lora_forward_backward"]
    assert per_block["hyperlora_optimizer"] == per_block["lora_optimizer"] == 0  # multi-tensor clip and AdamW
    assert deep["extra"] == shallow["extra"] > 0
    # one pass is a fixed set of batched operations per shape group; only the CPU's split of a product may change as a
    # group's members grow (135 -> 138 calls from 3 to 6 blocks), never by a loop over modules (>= 4 calls per block)
    assert shallow["hypernet_pass"] <= deep["hypernet_pass"] <= shallow["hypernet_pass"] + deep["shape_groups"]


def test_multi_tensor_operators_count_once_and_views_not_at_all():
    import torch

    tensors = [torch.ones(3) for _ in range(5)]
    assert operators.operator_calls(lambda: torch._foreach_mul_(tensors, 2.0)) == 1
    assert operators.operator_calls(lambda: [t.view(3, 1).t() for t in tensors]) == 0
    assert operators.operator_calls(lambda: [t.mul(2.0) for t in tensors]) == 5


def test_each_loss_adds_its_own_calls_to_the_extra():
    model = {"model_name": "vit_tiny_patch16_224", "depth": 2, "num_tasks": 3}
    parts = operators.extra_breakdown(operators.step_operator_calls(**model), **model)
    assert parts["regulariser"] > 0 and parts["guidance"] > 0
    assert parts["without_losses"] < parts["extra"]
