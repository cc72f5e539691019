"""A training step's operator calls (benchmarks/operators.py): HyperLoRA's per-block work is at most PEFT LoRA's, so
its extra calls over LoRA do not grow with the number of adapted blocks."""

from __future__ import annotations

import operators


def test_hyperlora_extra_operator_calls_do_not_grow_with_the_adapted_blocks():
    shallow = operators.step_operator_calls("vit_tiny_patch16_224", depth=2, num_tasks=3)
    deep = operators.step_operator_calls("vit_tiny_patch16_224", depth=4, num_tasks=3)
    per_block = {
        key: (deep[key] - shallow[key]) / 2
        for key in ("lora_forward_backward", "lora_optimizer", "hyperlora_forward_backward", "hyperlora_optimizer")
    }
    assert per_block["lora_forward_backward"] > 100  # the count sees the blocks' work
    assert per_block["hyperlora_forward_backward"] <= per_block["lora_forward_backward"]
    assert per_block["hyperlora_optimizer"] == 0 < per_block["lora_optimizer"]  # one optimizer group per shape
    assert deep["extra"] <= shallow["extra"]
    assert deep["hypernet_pass"] == shallow["hypernet_pass"] > 0  # one pass: the same calls whatever the depth
