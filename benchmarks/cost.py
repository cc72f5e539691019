"""What a task costs end to end: ContinualTrainer with HyperLoRA's defaults against one PEFT LoRA per task.

One process, one sequence, interleaved step by step: a ``TrainerCallback`` trains a fresh PEFT LoRA adapter and head
on HyperLoRA's current task with the same optimizer (AdamW, the same learning rates, cosine schedule, grad-norm clip),
epochs and batch, from the same decoded images, taking one LoRA step after each of HyperLoRA's steps, and evaluates
every seen task with its own adapter, as HyperLoRA's evaluation does. Both methods' steps thus meet the same machine
state: a machine that slows down or speeds up, even for seconds, weighs on both alike. HyperLoRA's training time is
the trainer's ``train_s`` less the LoRA steps run inside it. The setting is the embedded default's: the quickstart's
backbone (EfficientNet-Lite0 at 64 px), structured tasks and budget.

Reported at each length in ``--tasks`` (the last task of a sequence of that length; one run of the longest
sequence serves all): ``ratio_train`` = HyperLoRA's training time / LoRA's, ``ratio_total`` = HyperLoRA's whole
task (frozen features + H-embedding + training + evaluation) / LoRA's (training + evaluation). Writes cost.json and
cost.md under ``--output_dir``.

    python benchmarks/cost.py                         # 20 tasks, reported at 1, 5 and 20
    python benchmarks/cost.py --tasks 1 2 --quick     # a few steps per task, to check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from accuracy import Setup, _accuracy, _fit_steps, _lora
from speed import machine
from torch import nn

from hyperlora.cli import parse
from hyperlora.data import TaskImages, image_spec, pooled_features
from hyperlora.demo import DEFAULTS, QuickstartArguments, build_backbone
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.structured import structured_tasks
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments
from hyperlora.training import TrainerCallback

HYPERLORA_STAGES = ("frozen_features_s", "h_embedding_s", "train_s", "eval_s")


class PerTaskLora(TrainerCallback):
    """Beside each HyperLoRA task, the same task with its own PEFT LoRA adapter, timed: built when the task begins,
    one step after each of HyperLoRA's steps (any left over when HyperLoRA's task ends), then evaluated."""

    def __init__(self, args: ContinualTrainingArguments, tasks) -> None:
        self.args, self.tasks = args, tasks
        self.setup = Setup(
            backbone=lambda: build_backbone("efficientnet"),
            epochs=args.num_train_epochs,
            batch_size=args.per_device_train_batch_size,
            lr=args.learning_rate,
            head_lr=args.head_learning_rate,
        )
        self.adapters: list[tuple[nn.Module, nn.Linear]] = []
        self.test_sets: list[TaskImages] = []
        # train_s: LoRA's training; inside_s: the part of it run inside HyperLoRA's training (within its train_s)
        self.timings: dict[str, list[float]] = {"train_s": [], "eval_s": [], "inside_s": []}
        self._training = None  # the task's training: (its step generator, model, head)

    def on_task_begin(self, trainer: ContinualTrainer, t: int, state) -> None:
        torch.manual_seed(self.args.seed + t)
        task = self.tasks[t]
        backbone, config, size = build_backbone("efficientnet")
        spec = image_spec(backbone, size)
        # read as the trainer reads them: decoded once, when first needed (in the timed training and evaluation)
        train = TaskImages(task.train, spec.transform(), task.classes, cache=True)
        self.test_sets.append(TaskImages(task.test, spec.transform(), task.classes, cache=True))
        start = time.perf_counter()
        model = _lora(backbone, config, "cpu")
        with torch.no_grad():
            width = pooled_features(model(torch.zeros(1, 3, spec.size, spec.size))).shape[-1]
        head = nn.Linear(width, task.num_classes)
        loader = torch.utils.data.DataLoader(
            train,
            batch_size=self.setup.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.args.seed + t),
        )
        setup = self.setup
        if self.args.max_steps_per_task is not None:  # --quick: as many steps as the trainer takes
            loader = [batch for _, batch in zip(range(self.args.max_steps_per_task), loader, strict=False)]
            setup = replace(setup, epochs=1)

        def loss_fn(features, labels, _task_ids):
            return nn.functional.cross_entropy(head(features), labels)

        steps = _fit_steps(model, [head], [p for p in model.parameters() if p.requires_grad], loader, loss_fn, setup)
        self._training = steps, model, head
        self.timings["train_s"].append(time.perf_counter() - start)
        self.timings["inside_s"].append(0.0)

    def on_step_end(self, trainer: ContinualTrainer, t: int, step: int, state) -> None:
        start = time.perf_counter()
        next(self._training[0], None)
        elapsed = time.perf_counter() - start
        self.timings["train_s"][t] += elapsed
        self.timings["inside_s"][t] += elapsed

    def on_task_end(self, trainer: ContinualTrainer, t: int, state) -> None:
        steps, model, head = self._training
        start = time.perf_counter()
        for _ in steps:
            pass
        self.adapters.append((model, head.requires_grad_(False)))
        self.timings["train_s"][t] += time.perf_counter() - start
        start = time.perf_counter()
        for (adapter, adapter_head), test in zip(self.adapters, self.test_sets, strict=True):
            loader = torch.utils.data.DataLoader(test, batch_size=self.args.per_device_eval_batch_size)
            _accuracy(adapter, adapter_head, loader, "cpu")
        self.timings["eval_s"].append(time.perf_counter() - start)
        print(
            f"task {t}: HyperLoRA train {state.timings['train_s'][t] - self.timings['inside_s'][t]:.1f} s, "
            f"LoRA train {self.timings['train_s'][-1]:.1f} s",
            flush=True,
        )


def warm_up(task, args: ContinualTrainingArguments) -> None:
    """A few untimed LoRA steps first, so that neither method's first task pays the kernels' one-time setup."""
    backbone, config, size = build_backbone("efficientnet")
    spec = image_spec(backbone, size)
    model = _lora(backbone, config, "cpu")
    images = TaskImages(task.train, spec.transform(), task.classes)
    pixel_values, labels = next(iter(torch.utils.data.DataLoader(images, batch_size=args.per_device_train_batch_size)))
    head = nn.Linear(pooled_features(model(pixel_values[:1])).shape[-1], task.num_classes)
    for _ in range(3):
        nn.functional.cross_entropy(head(pooled_features(model(pixel_values))), labels).backward()


def measure(args: argparse.Namespace) -> dict:
    tasks = structured_tasks(
        max(args.tasks),
        seed=args.seed,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        kind="conflict",  # the committed results' sequence (its colours do not change what a step costs)
    )
    with tempfile.TemporaryDirectory() as tmp:
        training = ContinualTrainingArguments(
            output_dir=tmp,
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            max_steps_per_task=3 if args.quick else None,
            plots=False,
        )
        lora = PerTaskLora(training, tasks)
        warm_up(tasks[0], training)
        torch.manual_seed(args.seed)
        backbone, config, size = build_backbone("efficientnet")
        training = replace(training, image_size=size)
        trainer = ContinualTrainer(backbone, config, training, callbacks=[lora])
        metrics = trainer.fit(tasks)
    hyper = metrics["timings"]
    # the trainer's train_s holds the LoRA steps taken between HyperLoRA's: HyperLoRA's own training is the rest
    hyper["train_s"] = [h - inside for h, inside in zip(hyper["train_s"], lora.timings["inside_s"], strict=True)]
    rows = []
    for length in args.tasks:
        t = length - 1
        hyper_total = sum(hyper[stage][t] for stage in HYPERLORA_STAGES)
        lora_total = lora.timings["train_s"][t] + lora.timings["eval_s"][t]
        rows.append(
            {
                "tasks": length,
                **{f"hyperlora_{stage}": hyper[stage][t] for stage in HYPERLORA_STAGES},
                "lora_train_s": lora.timings["train_s"][t],
                "lora_eval_s": lora.timings["eval_s"][t],
                "ratio_train": hyper["train_s"][t] / lora.timings["train_s"][t],
                "ratio_total": hyper_total / lora_total,
            }
        )
    return {"rows": rows, "hyperlora_faa": metrics["faa"], "hyperlora_timings": hyper, "lora_timings": lora.timings}


def write_report(out: Path, result: dict, args: argparse.Namespace, argv: list[str]) -> str:
    info = machine(argparse.Namespace(device="cpu"))
    rows = result["rows"]
    payload = {
        "tasks": [r["tasks"] for r in rows],
        "ratio_train": [r["ratio_train"] for r in rows],
        "ratio_total": [r["ratio_total"] for r in rows],
        "rows": rows,
        "machine": info,
        "command": "python benchmarks/cost.py " + " ".join(argv),
        "arguments": vars(args),
        "hyperlora_timings": result["hyperlora_timings"],
        "lora_timings": result["lora_timings"],
    }
    atomic_write_json(out / "cost.json", payload)
    lines = [
        "# What a task costs: HyperLoRA against one PEFT LoRA per task",
        "",
        f"Command: `{payload['command'].strip()}`. Machine: {info['cpu']}, {info['torch_threads']} torch threads; "
        f"torch {info['torch']}, peft {info['peft']}; hyperlora at commit {info['hyperlora_commit']}; {info['date']}.",
        "",
        "The embedded default's setting (EfficientNet-Lite0 at 64 px, structured tasks of "
        f"{4 * args.train_per_class} training images, {args.num_train_epochs} epochs, batch "
        f"{args.per_device_train_batch_size}), one process, one LoRA step after each of HyperLoRA's steps "
        "(HyperLoRA's training time excludes them). Seconds for the last task of a sequence of that length.",
        "",
        "| tasks | HyperLoRA: frozen features | H-embedding | training | evaluation | total | LoRA: training | "
        "evaluation | total | training ratio | total ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hyper_total = sum(r[f"hyperlora_{stage}"] for stage in HYPERLORA_STAGES)
        lines.append(
            f"| {r['tasks']} | {r['hyperlora_frozen_features_s']:.1f} | {r['hyperlora_h_embedding_s']:.2f} | "
            f"{r['hyperlora_train_s']:.1f} | {r['hyperlora_eval_s']:.1f} | {hyper_total:.1f} | "
            f"{r['lora_train_s']:.1f} | {r['lora_eval_s']:.1f} | {r['lora_train_s'] + r['lora_eval_s']:.1f} | "
            f"{r['ratio_train']:.2f} | {r['ratio_total']:.2f} |"
        )
    train = result["hyperlora_timings"]["train_s"]
    lines += [
        "",
        f"Over every task of the run, the training ratio has median "
        f"{statistics.median(h / lo for h, lo in zip(train, result['lora_timings']['train_s'], strict=True)):.2f}. "
        "HyperLoRA's evaluation covers what LoRA's does (every seen task with its own adapter) plus the class-"
        "incremental routing and the frozen-feature baselines; its frozen features also serve the router and the "
        "forward-transfer probe.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(out / "cost.md", text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 5, 20], help="sequence lengths to report")
    parser.add_argument("--num_train_epochs", type=int, default=DEFAULTS["num_train_epochs"])
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--train_per_class", type=int, default=QuickstartArguments.train_per_class)
    parser.add_argument("--test_per_class", type=int, default=QuickstartArguments.test_per_class)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 steps per task, to check that it runs")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "cost"))
    args = parse(parser, argv, aliases={"num_epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size"})
    if min(args.tasks) < 1:
        parser.error("--tasks must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(out, measure(args), args, argv))


if __name__ == "__main__":
    main()
