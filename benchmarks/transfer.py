"""Forward transfer of plain PEFT LoRA on a structured sequence: what a related old task's adapter is worth to a new
task, measured before any continual method is tuned on the sequence.

Every task gets one PEFT LoRA trained from scratch at the sequence's own budget: ``--train_per_class`` images per
class for the first task, ``--later_train_per_class`` for the later ones (later tasks bringing few images, as they
often do). Each later task that has a related old task (``relation_matrix`` == 1; the most recent one) is trained
once more, starting from that old task's trained adapter, with a fresh head and the same budget. Its transfer is the
difference of the two runs' accuracies on the task's *validation* images, in points; the test images are not read.
The same budget and optimizer as accuracy.py's ``lora_per_task`` (AdamW, cosine schedule, grad-norm clip 1).

    python benchmarks/transfer.py --sequence domain --seeds 0 1 2
    python benchmarks/transfer.py --sequence split --merge a.json b.json  # seeds run in separate processes

Writes transfer-<sequence>-<factors>-<tasks>.json and .md under ``--output_dir`` (benchmarks/results/guidance by
default): per seed and later task, both accuracies and the transfer; the mean over tasks and seeds, with its std
over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import Setup, _accuracy, _loader, _lora, _train_lora_task, this_machine
from torch import nn

from hyperlora.cli import parse
from hyperlora.demo import build_backbone
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.structured import FACTORS, SEQUENCES, SPLIT_FACTOR, relation_matrix, sequence, structured_tasks


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    """One row per later task with a related old task: its validation accuracy from scratch and from that task."""
    factors = tuple(args.factors)
    tasks = structured_tasks(
        args.num_tasks,
        seed=seed,
        train_per_class=args.train_per_class,
        later_train_per_class=args.later_train_per_class,
        test_per_class=1,  # never read: choices are made on validation images
        validation_per_class=args.validation_per_class,
        factors=factors,
        kind=args.sequence,
    )
    relations = relation_matrix(sequence(args.num_tasks, factors, args.sequence))
    setup = Setup(
        lambda: build_backbone("efficientnet"),
        epochs=args.num_train_epochs,
        batch_size=args.per_device_train_batch_size,
        lr=args.learning_rate,
        head_lr=args.head_learning_rate,
    )
    _, config, spec, width = setup.build()
    adapters, rows = [], []

    def train(model, task, t: int) -> float:
        head = nn.Linear(width, task.num_classes)
        torch.manual_seed(seed + t)
        _train_lora_task(model, head, task, spec, setup, seed + t)
        with torch.no_grad():
            return _accuracy(model, head, _loader(task, "validation", spec, setup, False, 0), setup.device)

    for t, task in enumerate(tasks):
        start = time.perf_counter()
        torch.manual_seed(seed + t)
        model = _lora(setup.build()[0], config, setup.device)
        scratch = train(model, task, t)
        adapters.append(model)
        sources = [i for i in range(t) if relations[i, t] == 1]
        if sources:
            source = sources[-1]
            inherited = train(copy.deepcopy(adapters[source]), task, t)
            rows.append(
                {
                    "task": t,
                    "name": task.name,
                    "source": source,
                    "scratch": scratch,
                    "from_source": inherited,
                    "transfer": 100 * (inherited - scratch),
                }
            )
        print(
            f"seed {seed} task {t} {task.name}: scratch {100 * scratch:.2f}"
            + (f", from task {rows[-1]['source']} {100 * rows[-1]['from_source']:.2f}" if sources else "")
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return rows


def summary(runs: dict[int, list[dict]]) -> dict:
    per_seed = [np.mean([row["transfer"] for row in rows]) for rows in runs.values() if rows]
    return {
        "mean": float(np.mean(per_seed)) if per_seed else None,
        "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        "seeds": len(per_seed),
    }


def report(kind: str, args: argparse.Namespace, runs: dict[int, list[dict]], commands: list[str], machine: str) -> str:
    total = summary(runs)
    lines = [
        f"# Forward transfer of PEFT LoRA on the {kind} sequence ({args.num_tasks} tasks)",
        "",
        f"Command: {'; '.join(f'`{command}`' for command in commands)}. Machine: {machine}. Budget: "
        f"{args.num_train_epochs} epochs, {args.train_per_class} training images per class for the first task and "
        f"{args.later_train_per_class} for later ones, learning rate {args.learning_rate} (heads "
        f"{args.head_learning_rate}), batch {args.per_device_train_batch_size}. Accuracy on "
        f"{args.validation_per_class} validation images per class, %.",
        "",
        "| seed | task | started from | scratch | from the old task's LoRA | transfer (points) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, rows in runs.items():
        for row in rows:
            lines.append(
                f"| {seed} | {row['name']} | task {row['source']} | {100 * row['scratch']:.2f} | "
                f"{100 * row['from_source']:.2f} | {row['transfer']:+.2f} |"
            )
    if total["mean"] is not None:
        lines += [
            "",
            f"Mean transfer over later tasks: {total['mean']:+.2f} ± {total['std']:.2f} points (std over "
            f"{total['seeds']} seeds).",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequence", choices=SEQUENCES, default="domain")
    parser.add_argument("--num_tasks", type=int, default=5)
    parser.add_argument(
        "--factors", nargs="+", choices=FACTORS, default=list(FACTORS[:3]), help="asked in turn; domain: the first"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_per_class", type=int, default=200, help="the first task's training images")
    parser.add_argument("--later_train_per_class", type=int, default=50, help="each later task's")
    parser.add_argument("--validation_per_class", type=int, default=100)
    parser.add_argument("--num_train_epochs", type=int, default=8)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--head_learning_rate", type=float, default=1e-2)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "guidance"))
    parser.add_argument("--merge", nargs="+", help="only combine these transfer JSON files (seeds run apart)")
    return parse(parser, argv)


def setting(args: argparse.Namespace) -> dict:
    """What two runs must share to be merged."""
    keys = ("sequence", "num_tasks", "factors", "train_per_class", "later_train_per_class", "validation_per_class",
            "num_train_epochs", "per_device_train_batch_size", "learning_rate", "head_learning_rate")  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    asked = {"domain": args.factors[0], "split": SPLIT_FACTOR}.get(args.sequence, "-".join(args.factors))
    name = f"transfer-{args.sequence}-{asked}-{args.num_tasks}"
    runs, commands, machines = {}, [], []
    for source in args.merge or []:
        previous = json.loads(Path(source).read_text())
        if previous["setting"] != setting(args):
            raise SystemExit(f"{source} was run with {previous['setting']}, not {setting(args)}")
        runs |= {int(seed): rows for seed, rows in previous["runs"].items()}
        commands += previous["commands"]
        machines += [previous["machine"]] if previous["machine"] not in machines else []
    if not args.merge:
        runs = {seed: run_seed(seed, args) for seed in args.seeds}
        commands, machines = [" ".join(["python benchmarks/transfer.py", *argv])], [this_machine()]
    runs = dict(sorted(runs.items()))
    result = {"setting": setting(args), "commands": commands, "machine": "; ".join(machines), "runs": runs} | {
        "forward_transfer_lora": summary(runs)
    }
    atomic_write_json(out / f"{name}.json", result)
    text = report(args.sequence, args, runs, commands, result["machine"])
    atomic_write_text(out / f"{name}.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()
