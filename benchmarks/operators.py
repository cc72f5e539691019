"""Operator calls per training step, counted with torch.profiler on the CPU: a device-independent proxy for the
kernel launches a GPU step makes, which bound a small step's speed there.

A call counts when it is an ATen operator that calls no other ATen operator (a leaf: what dispatches a kernel).
HyperLoRA's step is the trainer's own (``hyperlora.training.step``: cross-entropy, the output regulariser over the
sampled old tasks, the embedding guidance, grad-norm clip, AdamW, with the old tasks' head directions protected);
PEFT LoRA's is the same loss, clip and optimizer over its adapter. Counted per phase: forward + backward, and
clip + optimizer step. ``hypernet_pass`` is one forward and backward of the hypernetwork alone, for one task.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hyperlora import HyperLoraConfig
from hyperlora.trainer import ContinualTrainingArguments
from hyperlora.training.step import TaskStep, create_optimizer
from hyperlora.tuner.model import TIMM_VIT_TARGETS


def leaf_operator_calls(fn) -> int:
    """Leaf ATen operator calls of one call of ``fn`` (after one untimed call, so that lazy setup is not counted)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in event.cpu_children)
    )


def step_operator_calls(
    model_name: str = "vit_base_patch16_224", depth: int = 12, num_tasks: int = 6, **model_kwargs
) -> dict[str, int]:
    """Operator calls of one training step of PEFT LoRA and of HyperLoRA's trainer on task ``num_tasks`` - 1 (so
    with the regulariser and the protection of the tasks before it), on a timm ViT of ``depth`` blocks."""
    import timm

    def vit() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(model_name, pretrained=False, num_classes=0, depth=depth, img_size=32, **model_kwargs)

    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    args = ContinualTrainingArguments()
    counts = {}

    lora = get_peft_model(vit(), LoraConfig(r=8, lora_alpha=16, target_modules=TIMM_VIT_TARGETS))
    head = nn.Linear(lora.get_base_model().num_features, 2)
    params = [p for p in lora.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, fused=True)
    counts["lora_forward_backward"] = leaf_operator_calls(
        lambda: (optimizer.zero_grad(), nn.functional.cross_entropy(head(lora(x)), y).backward())
    )
    counts["lora_optimizer"] = leaf_operator_calls(
        lambda: (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm), optimizer.step())
    )

    config = HyperLoraConfig(r=8, lora_alpha=16)
    model = get_peft_model(vit(), config)
    for _ in range(num_tasks):
        model.add_task()
    t = num_tasks - 1
    step = TaskStep(model, nn.Linear(model.get_base_model().num_features, 2), t, config, torch.randn(32), seed=0)
    optimizer = create_optimizer(step, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counts["hyperlora_forward_backward"] = leaf_operator_calls(
        lambda: (optimizer.zero_grad(), step(x, y)[0].backward())
    )
    counts["hyperlora_optimizer"] = leaf_operator_calls(
        lambda: (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm), optimizer.step())
    )
    hypernet = model.base_model.hypernet
    counts["hypernet_pass"] = leaf_operator_calls(
        lambda: sum(flat.sum() for flat in hypernet(hypernet.stacked_task_embeddings([t])).flat.values()).backward()
    )
    step.release()
    counts["shape_groups"] = len(hypernet.heads)
    counts["lora_step"] = counts["lora_forward_backward"] + counts["lora_optimizer"]
    counts["hyperlora_step"] = counts["hyperlora_forward_backward"] + counts["hyperlora_optimizer"]
    counts["extra"] = counts["hyperlora_step"] - counts["lora_step"]
    return counts


def operator_table(rows: dict[int, dict[str, int]]) -> list[str]:
    """Markdown lines: one row per depth."""
    lines = [
        "| blocks | PEFT LoRA: forward+backward | clip+AdamW | step "
        "| HyperLoRA: forward+backward | clip+AdamW | step | extra calls | one hypernetwork pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for depth, c in rows.items():
        lines.append(
            f"| {depth} | {c['lora_forward_backward']} | {c['lora_optimizer']} | {c['lora_step']} | "
            f"{c['hyperlora_forward_backward']} | {c['hyperlora_optimizer']} | {c['hyperlora_step']} | "
            f"{c['extra']:+d} | {c['hypernet_pass']} ({c['shape_groups']} shape groups) |"
        )
    return lines
