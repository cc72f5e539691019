"""Checkpoints: one atomic folder per finished task (the adapter, the heads, the frozen-feature statistics and the
run state, with SHA-256 digests), what a resume restores from the latest, and the checks that refuse a resume
that would not continue the same run."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn

from ..evaluation.baselines import FrozenBaselines
from ..files import (
    LATEST,
    atomic_directory,
    atomic_write_json,
    check_sha256,
    latest_checkpoint,
    publish_checkpoint,
    sha256,
)
from ..tuner import HyperLoraConfig
from ..tuner.config import differing_fields
from .arguments import RESUME_SAFE_ARGUMENTS, ContinualTrainingArguments
from .state import RunState

# Checkpoint files whose SHA-256 state.json records (the adapter's adapter_config.json records its weights').
CHECKED_FILES = ("heads.safetensors", "frozen.safetensors")


def check_resume(
    output_dir: Path,
    args: ContinualTrainingArguments,
    config: HyperLoraConfig,
    task_names: Sequence[str],
    training_record: dict,
) -> None:
    """Refuse, writing nothing, a run that the checkpoints in ``output_dir`` contradict.

    A resume is refused when the checkpoint was written for other task names, another HyperLoraConfig, other
    training arguments (all but those in RESUME_SAFE_ARGUMENTS) or another number of processes, naming every
    difference: it would not continue the same run. A fresh run into a folder holding checkpoints is refused
    unless ``overwrite_output_dir``. Without checkpoints there is nothing to check. ``ContinualTrainer.fit`` calls
    this first.
    """
    root = output_dir / "checkpoints"
    if not args.resume_from_checkpoint:
        if (root / LATEST).exists() and not args.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} already holds the checkpoints of a run: pass --resume_from_checkpoint "
                "(resume_from_checkpoint=True) to continue it, or --overwrite_output_dir "
                "(overwrite_output_dir=True) to start a new run there"
            )
        return
    path = latest_checkpoint(root)
    if path is None:
        return
    saved = json.loads((path / "state.json").read_text())
    differences = []
    if saved["task_names"] != list(task_names):
        differences.append(f"tasks: {saved['task_names']} in the checkpoint, {list(task_names)} now")
    check_sha256(path, saved.get("sha256", {}), "state.json")
    saved_config = HyperLoraConfig.from_pretrained(str(path / "adapter")).to_dict()  # checks its SHA-256 too
    differences += [
        f"HyperLoraConfig.{name}: {saved_config.get(name)!r} in the checkpoint, {getattr(config, name)!r} now"
        for name in differing_fields(saved_config, config)
    ]
    saved_args = saved.get("training_arguments")
    if saved_args is None:
        warnings.warn(f"{path} does not record its training arguments (an older hyperlora): not compared", stacklevel=2)
    else:
        differences += [
            f"{name}: {saved_args.get(name)!r} in the checkpoint, {training_record.get(name)!r} now"
            for name in sorted(saved_args.keys() | training_record.keys())
            if name not in RESUME_SAFE_ARGUMENTS and saved_args.get(name) != training_record.get(name)
        ]
    if differences:
        raise ValueError(
            f"cannot resume from {path}: it was written by a different run ("
            + "; ".join(differences)
            + "). Only these training arguments may change on resume: "
            + ", ".join(RESUME_SAFE_ARGUMENTS)
        )


def save_artifacts(directory: Path, model: PeftModel, heads: nn.ModuleList, baselines: FrozenBaselines) -> None:
    """What a finished run or task leaves: adapter/ (PEFT), heads.safetensors and frozen.safetensors."""
    model.save_pretrained(directory / "adapter")
    weights = {
        f"{j}.{k}": v.detach().cpu().contiguous() for j, h in enumerate(heads) for k, v in h.state_dict().items()
    }
    save_file(weights, directory / "heads.safetensors")
    save_file(baselines.state_dict(), directory / "frozen.safetensors")


def save_checkpoint(
    output_dir: Path, state: RunState, model: PeftModel, heads: nn.ModuleList, baselines: FrozenBaselines
) -> None:
    """Checkpoint the last completed task, published atomically (main process only)."""
    root = output_dir / "checkpoints"
    name = f"task-{state.completed - 1:03d}"
    with atomic_directory(root / name) as tmp:
        save_artifacts(tmp, model, heads, baselines)
        digests = {file: sha256(tmp / file) for file in CHECKED_FILES}  # the adapter records its own
        atomic_write_json(tmp / "state.json", state.to_json() | {"sha256": digests})
    publish_checkpoint(root, name)


def load_checkpoint(
    output_dir: Path, model: PeftModel, device: torch.device, config: HyperLoraConfig
) -> tuple[RunState, list[nn.Linear], FrozenBaselines] | None:
    """Load the latest checkpoint's adapter into ``model``; return its state, heads and frozen-feature statistics
    (None without a checkpoint). ``check_resume`` has checked the files' digests."""
    path = latest_checkpoint(output_dir / "checkpoints")
    if path is None:
        return None
    state = RunState.from_json(json.loads((path / "state.json").read_text()))
    set_peft_model_state_dict(model, load_peft_weights(str(path / "adapter"), device=str(device)))
    model.base_model.set_task(model.base_model.num_tasks - 1)
    weights = load_file(path / "heads.safetensors")
    heads = []
    for j in range(state.completed):
        weight, bias = weights[f"{j}.weight"], weights[f"{j}.bias"]
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
        head.load_state_dict({"weight": weight, "bias": bias})
        heads.append(head.eval().requires_grad_(False))
    frozen_state = load_file(path / "frozen.safetensors")
    baselines = FrozenBaselines(frozen_state["lda.outer"].shape[0], shrinkage=config.router_shrinkage)
    baselines.load_state_dict(frozen_state)
    return state, heads, baselines
