"""Operator calls per training step, counted with torch.profiler on the CPU: a device-independent proxy for the
kernel launches a GPU step makes, which bound a small step's speed there.

A call counts when it is an ATen operator that dispatches a kernel itself (not a view, metadata or allocation, and
calling no other operator that dispatches one), or a multi-tensor one (``_foreach_*``, ``_fused_*``: one kernel per
chunk of tensors on a GPU).
HyperLoRA's step is the trainer's own (``hyperlora.training.step``: cross-entropy, the output regulariser over the
sampled old tasks, the embedding guidance, grad-norm clip, AdamW, with the old tasks' head directions protected);
PEFT LoRA's is the same loss, clip and optimizer over its adapter. Counted per phase: forward + backward, and
clip + optimizer step. ``hypernet_pass`` is one forward and backward of the hypernetwork alone, for one task, with
the heads protected as the step has them.
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

MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_")
# Operators that dispatch no kernel: views, metadata, allocation, and ``to`` when nothing is converted (any copy it
# makes is its child ``copy_``, counted there).
NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in (  # noqa: SIM905 (a list literal would take a line per name)
        "empty empty_strided empty_like as_strided view _unsafe_view reshape _reshape_alias resolve_conj resolve_neg "
        "detach alias lift_fresh to expand t transpose permute unsqueeze squeeze slice select unbind split "
        "split_with_sizes narrow unflatten flatten numpy_T contiguous"
    ).split()
)


def _multi_tensor(event) -> bool:
    return event.name.startswith(MULTI_TENSOR)


def _launches(event) -> bool:
    """Whether the operator, or one it calls, dispatches a kernel."""
    if not event.name.startswith("aten::"):
        return False
    return event.name not in NO_KERNEL or any(_launches(child) for child in event.cpu_children)


def _counted(event) -> bool:
    if not event.name.startswith("aten::") or event.name in NO_KERNEL:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if _multi_tensor(parent):
            return False
        parent = parent.cpu_parent
    return _multi_tensor(event) or not any(_launches(child) for child in event.cpu_children)


def operator_calls(fn) -> int:
    """Kernel-dispatching operator calls of one call of ``fn`` (after one untimed call, so that lazy setup is not
    counted).

    A call is an ATen operator that dispatches a kernel itself: it is not a view, metadata or allocation operator
    (``NO_KERNEL``) and calls no operator that dispatches one. A multi-tensor operator (``_foreach_*``, ``_fused_*``)
    is one call, as a GPU runs it (one kernel per chunk of tensors), whatever the per-tensor loop the CPU runs it as.
    """
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if _counted(event))


def step_operator_calls(
    model_name: str = "vit_base_patch16_224",
    depth: int = 12,
    num_tasks: int = 6,
    regulariser: bool = True,
    guidance: bool = True,
    **model_kwargs,
) -> dict[str, int]:
    """Operator calls of one training step of PEFT LoRA and of HyperLoRA's trainer on task ``num_tasks`` - 1 (so
    with the regulariser, the guidance and the protection of the tasks before it, unless turned off), on a timm ViT
    of ``depth`` blocks."""
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
    counts["lora_forward_backward"] = operator_calls(
        lambda: (optimizer.zero_grad(), nn.functional.cross_entropy(head(lora(x)), y).backward())
    )
    counts["lora_optimizer"] = operator_calls(
        lambda: (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm), optimizer.step())
    )

    config = HyperLoraConfig(r=8, lora_alpha=16, **({} if regulariser else {"beta_reg": 0.0}))
    model = get_peft_model(vit(), config)
    for _ in range(num_tasks):
        model.add_task()
    t = num_tasks - 1
    h_embedding = torch.randn(config.task_embedding_dim) if guidance else None
    step = TaskStep(model, nn.Linear(model.get_base_model().num_features, 2), t, config, h_embedding, seed=0)
    optimizer = create_optimizer(step, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counts["hyperlora_forward_backward"] = operator_calls(lambda: (optimizer.zero_grad(), step(x, y)[0].backward()))
    counts["hyperlora_optimizer"] = operator_calls(
        lambda: (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm), optimizer.step())
    )
    hypernet = model.base_model.hypernet
    # the step's own pass: the protected heads' products, as the step runs them
    counts["hypernet_pass"] = operator_calls(
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


def extra_breakdown(full: dict[str, int], **model) -> dict[str, int]:
    """Where HyperLoRA's extra calls go, from ``full`` (``step_operator_calls(**model)`` with both losses): the
    step's hypernetwork pass, the extra without either loss, and what each loss adds (the extra with it minus the
    extra without it)."""
    return {
        "extra": full["extra"],
        "hypernet_pass": full["hypernet_pass"],
        "without_losses": step_operator_calls(**model, regulariser=False, guidance=False)["extra"],
        "regulariser": full["extra"] - step_operator_calls(**model, regulariser=False)["extra"],
        "guidance": full["extra"] - step_operator_calls(**model, guidance=False)["extra"],
    }
