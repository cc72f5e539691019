"""Checks made before a run starts: that the model returns features, and that a launch of several processes formed
one process group (each would otherwise run the whole job alone, all writing the same files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import nn


def feature_extractor(model: nn.Module, wrapped: bool = False) -> nn.Module:
    """The model whose forward returns features. Of a transformers model with a task head (ViTForImageClassification)
    that is its base model (ViTModel): every task gets a head of its own. A timm classifier returns logits: refused."""
    base = getattr(model, "base_model", model)  # transformers' base model: the model without its task head
    if getattr(model, "base_model_prefix", None) and base is not model:
        if wrapped:
            raise TypeError(
                f"the HyperLoRA model wraps a {type(model).__name__}, whose forward returns its task head's logits, "
                f"not features: wrap its base model instead (get_peft_model(model.{model.base_model_prefix}, "
                "config)), or pass the unwrapped model and a HyperLoraConfig"
            )
        return base
    if getattr(model, "num_classes", 0) and hasattr(model, "reset_classifier"):
        raise TypeError(
            f"this timm model has a {model.num_classes}-class classifier, so it returns logits, not features: "
            "create it with num_classes=0 (or call model.reset_classifier(0))"
        )
    return model


def check_process_group(num_processes: int) -> None:
    """Refuse a launch whose processes did not form one process group: each would run the whole job alone, all
    writing the same checkpoint files."""
    requested = int(os.environ.get("WORLD_SIZE", "1")) or 1
    if requested == 1 and os.environ.get("ACCELERATE_USE_CPU") == "True":
        requested = _simple_launcher_processes()
    if requested > num_processes:
        raise ValueError(
            f"the launcher asked for {requested} processes, but they did not form a process group ({num_processes} "
            "here): on a machine without GPUs, `accelerate launch --multi_gpu` starts independent runs unless "
            "ACCELERATE_USE_CPU=1 is set, and `--cpu` starts one process. Run instead: "
            f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {requested} ..."
        )


def _simple_launcher_processes() -> int:
    """--num_processes of an `accelerate launch --cpu` that started this process (Linux), else 1: that launcher starts
    a single process and passes it no trace of the number it was asked for but its own command line."""
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return 1
    # `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`, then options, then the script
    start = next((i for i, a in enumerate(launcher) if a == "launch" or a.endswith(("-launch", ".launch"))), None)
    if start is None or sys.argv[0] not in launcher[start:]:
        return 1
    options = launcher[start + 1 : launcher.index(sys.argv[0], start)]  # not the script's own arguments
    for i, option in enumerate(options):
        name, _, value = option.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (options[i + 1] if i + 1 < len(options) else "")
            return int(value) if value.isdigit() else 1
    return 1
