"""A benchmark recipe end to end on generated data, to check and time the GPU path a user's first run takes.

The structured tasks (hyperlora.structured) are written as an image folder with train/ and test/, then
``recipes/imagenet_r.py`` runs on it: by default ViT-B/16 (random init: no weights offline) at 224 px in bf16
autocast, one seed. Accuracy here says nothing about the method (random-init backbone, two epochs); what the trial
reports is that the run finishes, its per-task time and the peak GPU memory. Writes ``<name>.md`` and the run's
metrics.json under ``--output_dir``.

    python benchmarks/recipe_trial.py
    python benchmarks/recipe_trial.py --model_name_or_path vit_tiny_patch16_224 --image_size 32 --mixed_precision no \\
        --quick                                      # a CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import runpy
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyperlora.cli import parse
from hyperlora.files import atomic_write_text
from hyperlora.structured import structured_tasks
from hyperlora.training.recipe import run

IMAGENET_R = Path(__file__).resolve().parents[1] / "recipes" / "imagenet_r.py"


def write_folder(root: Path, args: argparse.Namespace) -> Path:
    """The structured tasks as ``root/{train,test}/<class>/<i>.png``, one folder per class across all tasks."""
    tasks = structured_tasks(
        args.num_tasks,
        seed=args.seed,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        image_size=args.image_size,
        kind="conflict",  # the committed trial's sequence
    )
    for task in tasks:
        for split in ("train", "test"):
            dataset = getattr(task, split)
            for i, (image, label) in enumerate(zip(dataset["image"], dataset["label"], strict=True)):
                folder = root / split / f"{task.name}-{label:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i:05d}.png")
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_tasks", type=int, default=5)
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--test_per_class", type=int, default=25)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--model_name_or_path", default="vit_base_patch16_224", help="a timm model, random init")
    parser.add_argument("--model_kwargs", default=None, help="extra timm.create_model arguments as JSON")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--num_train_epochs", type=int, default=2)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps per task, to check that it runs")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "recipe_trial"))
    parser.add_argument("--name", default="recipe_trial", help="output file stem: <name>.md, <name>_metrics.json")
    return parse(parser, argv, aliases={"num_epochs": "num_train_epochs"})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = write_folder(Path(tmp) / "structured", args)
        generate_s = time.perf_counter() - start
        run_dir = Path(tmp) / "run"
        recipe = ["--dataset_name", str(folder), "--model_name_or_path", args.model_name_or_path, "--no_pretrained"]
        recipe += ["--num_tasks", str(args.num_tasks), "--num_train_epochs", str(args.num_train_epochs)]
        recipe += ["--mixed_precision", args.mixed_precision, "--seed", str(args.seed), "--num_seeds", "1"]
        recipe += ["--per_device_train_batch_size", str(args.per_device_train_batch_size), "--report_to", "none"]
        recipe += ["--output_dir", str(run_dir), "--dataloader_num_workers", "4" if cuda else "0"]
        model_kwargs = {"img_size": args.image_size} | json.loads(args.model_kwargs or "{}")
        recipe += ["--model_kwargs", json.dumps(model_kwargs)]
        if args.quick:
            recipe += ["--max_steps_per_task", "3"]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(runpy.run_path(str(IMAGENET_R))["DEFAULTS"], recipe)
        run_s = time.perf_counter() - start
        metrics = json.loads((run_dir / "seed-0" / "metrics.json").read_text())
        protocol = json.loads((run_dir / "protocol.json").read_text())

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{args.name}_metrics.json", json.dumps(metrics, indent=2))
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "- (CPU)"
    per_task = metrics["timings"]["train_s"]
    command = "python benchmarks/recipe_trial.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Recipe trial: recipes/imagenet_r.py on generated structured tasks ({args.mixed_precision})",
        "",
        f"Command: `{command.strip()}`. Device: {device}; torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- data: {args.num_tasks} structured tasks x 4 classes, {args.train_per_class} train / "
        f"{args.test_per_class} test images per class at {args.image_size} px, written as an image folder "
        f"(train/ and test/; protocol.json read train_split={protocol['split'].get('train_split')!r}, "
        f"test_split={protocol['split'].get('test_split')!r}) in {generate_s:.1f} s",
        f"- model: `{args.model_name_or_path}`, random init, {args.num_train_epochs} epochs per task, one seed",
        f"- the recipe ran to the end in {run_s:.1f} s (data loading, H-embeddings, training, evaluation, checkpoints)",
        f"- training time per task (s): {', '.join(f'{t:.1f}' for t in per_task)}",
        f"- peak GPU memory (torch.cuda.max_memory_allocated): {peak}",
        f"- task-IL FAA {100 * metrics['faa']:.2f}, class-IL final accuracy "
        f"{100 * metrics['class_incremental']['final_accuracy']:.2f} (random-init backbone: a check that learning "
        "happens, not a result)",
        "",
    ]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
