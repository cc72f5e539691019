"""What every benchmark recipe (recipes/imagenet_r.py, ...) shares: arguments, data, backbone, the multi-seed loop
and its summary.

A recipe is a set of defaults; arguments come from those, then from ``--config file.yaml|json``, then from the
command line (each overriding the last), the Hugging Face ``HfArgumentParser`` way.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from peft import PeftConfig

from .. import cli
from ..data import Task
from ..evaluation.metrics import METRIC_KEYS, summarise_runs
from ..files import atomic_write_json, atomic_write_text
from ..tuner import HyperLoraConfig
from .trainer import ContinualTrainingArguments

WEIGHTS = {
    "in21k": "vit_base_patch16_224.augreg_in21k",
    "in21k_ft_in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k",
}


@dataclass
class DataArguments:
    dataset_name: str = field(
        metadata={"help": "A Hub dataset id, or a local image folder (one sub-folder per class)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "A Hub revision (commit) to pin."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches (default: HF_HOME)."})
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str | None = field(
        default="test", metadata={"help": "None: hold out test_fraction of every class of train_split instead."}
    )
    test_fraction: float = 0.2
    split_seed: int = field(default=0, metadata={"help": "Seed of the generated train/test split."})
    num_tasks: int = 10
    class_order: list[int] | None = field(default=None, metadata={"help": "Explicit class order (all classes)."})
    class_order_seed: int = field(default=1993, metadata={"help": "Seed of the shuffled class order."})
    max_train_per_class: int | None = field(
        default=None, metadata={"help": "Keep at most this many training images per class (quick trials)."}
    )

    def __post_init__(self) -> None:
        if self.test_split in ("", "none", "None"):  # the command line cannot spell None otherwise
            self.test_split = None


@dataclass
class ModelArguments:
    weights: Literal["in21k", "in21k_ft_in1k"] = field(
        default="in21k", metadata={"help": "ViT-B/16 pretrained on ImageNet-21k, or additionally fine-tuned on 1k."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Any timm model name or hf-hub:<id>; overrides --weights."}
    )
    pretrained: bool = True
    checkpoint_path: str | None = field(
        default=None, metadata={"help": "A local weights file (safetensors) to load instead of downloading."}
    )
    model_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra timm.create_model arguments as JSON, e.g. '{\"drop_path_rate\": 0.1}'."}
    )
    num_seeds: int = field(default=3, metadata={"help": "Runs with seeds seed, seed+1, ...; reported as mean/std."})

    def create_model(self):
        import timm

        kwargs = json.loads(self.model_kwargs) if isinstance(self.model_kwargs, str) else dict(self.model_kwargs or {})
        if self.checkpoint_path is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": self.checkpoint_path}
        name = self.model_name_or_path or WEIGHTS[self.weights]
        return timm.create_model(name, pretrained=self.pretrained, num_classes=0, **kwargs)


ARGUMENT_CLASSES = (DataArguments, ModelArguments, HyperLoraConfig, ContinualTrainingArguments)
ALIASES = {**cli.TRAINING_ALIASES, "dataset": "dataset_name", "model_name": "model_name_or_path"}
MODULE_LISTS = ("target_modules", "exclude_modules")


def parse_arguments(defaults: dict[str, Any], argv: list[str] | None = None):
    """Recipe defaults, then the ``--config`` file, then the command line (``hyperlora.cli``)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES)
    bookkeeping = {f.name for f in fields(PeftConfig)}
    for action in parser._actions:
        if action.dest in bookkeeping:  # PEFT's own fields (peft_type, task_type, ...) are not recipe settings
            action.help = argparse.SUPPRESS
        elif action.dest in MODULE_LISTS:  # HfArgumentParser reads `list[str] | str | None` as one string
            action.nargs = "+"
    namespace = cli.parse(parser, argv, defaults, ALIASES)
    for name in MODULE_LISTS:
        setattr(namespace, name, module_names(getattr(namespace, name)))
    return cli.to_dataclasses(namespace, ARGUMENT_CLASSES)


def module_names(values: list[str] | str | None) -> list[str] | str | None:
    """Names or suffixes, except that one value with regex syntax stays a string, which PEFT matches as a regex."""
    if isinstance(values, list) and len(values) == 1 and re.search(r"[\\^$*+?()\[\]{}|]", values[0]):
        return values[0]
    return values


def arguments_dict(*groups) -> dict[str, dict[str, Any]]:
    """Every argument by group, without PEFT's bookkeeping fields (a flattened group is a valid ``--config``)."""
    bookkeeping = {f.name for f in fields(PeftConfig)}
    return {
        type(group).__name__: {
            f.name: sorted(value) if isinstance(value := getattr(group, f.name), set) else value
            for f in fields(group)
            if f.init and f.name not in bookkeeping
        }
        for group in groups
    }


def load_tasks(data: DataArguments) -> tuple[list[Task], dict[str, Any]]:
    """The protocol's task sequence, and what reproduces it (split, class order, task sizes) for protocol.json."""
    from ..data.protocol import class_names, class_order, load_image_dataset, split_into_tasks, train_test_split

    splits = load_image_dataset(
        data.dataset_name,
        name=data.dataset_config,
        revision=data.dataset_revision,
        image_column=data.image_column,
        label_column=data.label_column,
        cache_dir=data.cache_dir,
    )
    train_split, test_split = data.train_split, data.test_split
    if Path(data.dataset_name).expanduser().is_dir() and {"train", "test"} <= set(splits):
        train_split, test_split = "train", "test"  # a folder's own split, whatever the recipe says of its Hub copy
    train, test, split = train_test_split(splits, train_split, test_split, data.test_fraction, data.split_seed)
    order = class_order(sorted(set(train["label"])), data.class_order_seed, data.class_order)
    tasks = split_into_tasks(
        train, test, data.num_tasks, order, max_train_per_class=data.max_train_per_class, seed=data.split_seed
    )
    protocol = {
        "dataset": data.dataset_name,
        "dataset_config": data.dataset_config,
        "dataset_revision": data.dataset_revision,
        "class_order": order,
        "class_order_seed": None if data.class_order is not None else data.class_order_seed,
        "class_names": class_names(train),
        "tasks": [
            {"name": task.name, "classes": task.classes, "train": len(task.train), "test": len(task.test)}
            for task in tasks
        ],
        "split": split,
    }
    return tasks, protocol


def check_same_run(output_dir: Path, protocol: dict[str, Any], model_args: ModelArguments) -> None:
    """Refuse to resume a run made on other data (class order, split, sizes) or another backbone: the checkpoints
    record task names and training arguments, which do not show either. The dataset's path may change."""
    differences = []
    if (output_dir / "protocol.json").exists():
        recorded, current = json.loads((output_dir / "protocol.json").read_text()), json.loads(json.dumps(protocol))
        differences += [
            f"protocol.json {key}" for key in current if key != "dataset" and recorded.get(key) != current[key]
        ]
    if (output_dir / "arguments.yaml").exists():
        recorded = yaml.safe_load((output_dir / "arguments.yaml").read_text())
        differences += [
            f"{f.name}: {recorded.get(f.name)!r} recorded, {getattr(model_args, f.name)!r} now"
            for f in fields(ModelArguments)
            if f.name != "num_seeds" and recorded.get(f.name) != getattr(model_args, f.name)
        ]
    if differences:
        raise ValueError(f"cannot resume the run in {output_dir}, made differently: {'; '.join(differences)}")


def run(defaults: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Run a recipe: every seed in turn (each resumable), then the mean/std summary. Returns the summary."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .trainer import ContinualTrainer

    data, model_args, config, training = parse_arguments(defaults, argv)
    # as AcceleratorState does: without cpu=True, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` would run
    # independent copies instead of one job over gloo
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    output_dir = Path(training.output_dir)
    everything = arguments_dict(data, model_args, config, training)
    if state.is_main_process:
        print(yaml.safe_dump(everything, sort_keys=False), flush=True)

    # Everything that can refuse the run (the data, the target modules, a resume into an incompatible run) is
    # checked before anything is written: a refused run leaves the output folder as it was.
    seeds = list(range(training.seed, training.seed + model_args.num_seeds))
    trainers = []
    try:
        with state.main_process_first():  # one process fills the datasets cache, the others read it
            tasks, protocol = load_tasks(data)
        if training.resume_from_checkpoint:
            check_same_run(output_dir, protocol, model_args)
        for seed in seeds:
            torch.manual_seed(seed)
            seed_args = replace(training, seed=seed, output_dir=str(output_dir / f"seed-{seed}"))
            # a fresh config per run: get_peft_model records the base model on the one it is given
            seed_config = HyperLoraConfig(**everything["HyperLoraConfig"])
            trainers.append(ContinualTrainer(model_args.create_model(), seed_config, seed_args))
            trainers[-1].check_resume(tasks)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None

    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        flat = {key: value for group in everything.values() for key, value in group.items()}
        atomic_write_text(output_dir / "arguments.yaml", yaml.safe_dump(flat, sort_keys=False))
        atomic_write_json(output_dir / "protocol.json", protocol)
    runs = []
    while trainers:  # each run's model is released once it is done
        runs.append(trainers.pop(0).fit(tasks))

    summary = {"seeds": seeds, **summarise_runs(runs)}
    if state.is_main_process:
        atomic_write_json(output_dir / "summary.json", summary)
        atomic_write_text(output_dir / "summary.md", summary_markdown(summary, data.dataset_name, len(tasks)))
        print(summary_markdown(summary, data.dataset_name, len(tasks)))
    state.wait_for_everyone()
    return summary


def summary_markdown(summary: dict[str, Any], dataset: str, num_tasks: int) -> str:
    def cell(stat: dict[str, float | None]) -> str:
        if stat["mean"] is None or math.isnan(stat["mean"]):
            return "-"
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"

    til, cil = summary["task_incremental"], summary["class_incremental"]
    lines = [
        f"# {dataset}: {num_tasks} tasks, seeds {summary['seeds']}",
        "",
        "| metric (%) | class-incremental | task-incremental |",
        "|---|---|---|",
        *(f"| {key} | {cell(cil[key])} | {cell(til[key])} |" for key in METRIC_KEYS),
        f"| router task-id accuracy | {cell(cil['router_task_accuracy'])} | - |",
        "",
    ]
    return "\n".join(lines)
