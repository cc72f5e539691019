"""How HyperLoRA's costs grow with the number of tasks, 1 to 50, in the embedded default's setting.

The quickstart's backbone and config (EfficientNet-Lite0 at 64 px, HyperLoRA on its late pointwise convolutions,
library defaults), its batch of 32 and its budget per task (8 epochs of 800 images: 200 steps). For T tasks
registered, training the last one:

- one training step as the trainer takes it: cross-entropy, the output regulariser over at most ``reg_max_tasks``
  sampled old tasks, the embedding guidance, AdamW and the head projection onto the old tasks' null space;
- the peak memory of those steps;
- the H-embedding of task T as the trainer computes it (hyperlora.method.transferability with ``h_score_features``,
  bootstrap resamples, AHP, the fit), on ``--samples`` images (those that read the old tasks' models on
  ``h_score_adapted_samples`` of them, through the adapted blocks, screened beyond ``h_score_finalists`` old tasks);
  the frozen features it reads, and the frozen prefix of its sample, come from the pass the router needs anyway,
  timed apart;
- the H-embedding's time as a share of the task's training time (200 steps);
- the bytes of what the trainer holds for the old tasks and of everything stored.

Each T runs in a fresh process, so the memory of one does not hide in the allocator for the next. Random images:
only time and memory are measured.

    python benchmarks/scale.py --tasks 1 2 5 10 20 50
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accuracy import code_version
from peak_memory import describe, peak_increase
from peft import get_peft_model
from torch import nn

from hyperlora.cli import parse
from hyperlora.demo import DEFAULTS, QuickstartArguments, build_backbone
from hyperlora.evaluation.baselines import FrozenBaselines
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.method.embedding import guided_embedding
from hyperlora.method.transferability import H_SCORE_FEATURES, SampleReads, sample_size
from hyperlora.optim import cosine_schedule
from hyperlora.trainer import ContinualTrainingArguments
from hyperlora.training.prefix import FrozenPrefix
from hyperlora.training.step import TaskStep, create_optimizer, train_mode, training_step

CLASSES = 4  # per task, as in the structured sequence


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def steps_per_task(args: argparse.Namespace) -> int:
    images = CLASSES * QuickstartArguments.train_per_class
    return DEFAULTS["num_train_epochs"] * math.ceil(images / args.per_device_train_batch_size)


def measure(num_tasks: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone, config, size = build_backbone("efficientnet")
    if args.h_score_features:
        config = dataclasses.replace(config, h_score_features=args.h_score_features)
    model = get_peft_model(backbone, config)
    for _ in range(num_tasks):
        model.add_task()
    hypernet = model.base_model.hypernet
    t = num_tasks - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.per_device_train_batch_size, 3, size, size, generator=g)
    y = torch.randint(0, CLASSES, (args.per_device_train_batch_size,), generator=g)
    width = feature_dim(model, size)

    # what is stored, counted before the step splits the heads into fixed and free parts for training
    shared = tensor_bytes(p for n, p in hypernet.named_parameters() if not n.startswith("task_embeddings"))

    # the trainer's own step: regulariser, guidance and head projection included
    accelerator = Accelerator(cpu=True)
    task_step = TaskStep(model, nn.Linear(width, CLASSES), t, config, torch.randn(config.task_embedding_dim))
    training = ContinualTrainingArguments(learning_rate=1e-4)
    optimizer = create_optimizer(task_step, training)
    step_module, optimizer, scheduler = accelerator.prepare(task_step, optimizer, cosine_schedule(optimizer, 10**6))

    def step() -> None:
        training_step(accelerator, step_module, optimizer, scheduler, x, y, training.max_grad_norm)

    train_mode(model)
    memory = peak_increase(step, args.warmup, "cpu")  # the warm-up steps, measured
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    # the H-embedding of task t, as the trainer computes it
    model.eval()
    images = torch.randn(args.samples, 3, size, size, generator=g)
    labels = torch.arange(args.samples) % CLASSES
    # the frozen pass the router needs, as the trainer takes it: the H-score's sample first, in its two parts,
    # keeping their frozen prefix for the old tasks' reads (none for "lda", which reads no old task's model)
    n = sample_size(config.h_score_features, args.samples, config.h_score_adapted_samples)
    screen = config.h_score_screen_samples
    parts = [images[:screen], images[screen:n]] if config.h_score_features != "lda" else []
    prefix = FrozenPrefix(model)
    start = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        first = [prefix((part, 0), lambda x=x: model(x)) for part, x in enumerate(parts)]
        frozen = torch.cat([*first, model(images[sum(len(x) for x in parts) :])])
    frozen_s = time.perf_counter() - start
    baselines = FrozenBaselines(width)  # the old tasks' class statistics, as the router holds them
    for i in range(t):
        baselines.lda.update(frozen + torch.randn_like(frozen), labels + CLASSES * i, i)
    heads = [nn.Linear(width, CLASSES) for _ in range(t)]

    def read(part, task_id):
        with torch.no_grad():
            return prefix((part, 0), lambda: model(parts[part], task_ids=task_id))

    features_of = SampleReads(read, frozen[:n], screen)

    start = time.perf_counter()
    if t:
        embeddings = hypernet.stacked_task_embeddings().detach()[:t].numpy()
        guided_embedding(embeddings, features_of, labels[:n], config, heads=heads, router=baselines.lda)
    h_embedding_s = time.perf_counter() - start
    train_s = steps_per_task(args) * statistics.median(times)

    return {
        "num_tasks": num_tasks,
        "h_score_features": config.h_score_features,
        "h_score_images": n,
        "train_step_ms": 1e3 * statistics.median(times),
        "peak_train_memory_bytes": memory["peak_increase_bytes"],
        "memory_how": memory["how"],
        "frozen_features_s": frozen_s,
        "h_embedding_s": h_embedding_s,
        "h_embedding_share": h_embedding_s / train_s,
        "old_task_state_bytes": tensor_bytes(hypernet.task_embeddings)
        + tensor_bytes(tensor for tensor in (task_step.old_outputs, task_step.kappa) if tensor is not None)
        + tensor_bytes(tensor for fixed in hypernet.fixed.values() for tensor in fixed[:3]),
        "stored_bytes": shared
        + tensor_bytes(hypernet.task_embeddings)
        + num_tasks * tensor_bytes(task_step.head.parameters()),
    }


def feature_dim(model, size: int) -> int:
    with torch.no_grad(), model.disable_adapter():
        return model(torch.zeros(1, 3, size, size)).shape[-1]


def write_report(out: Path, rows: list[dict], args: argparse.Namespace) -> str:
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, code {code_version()}"
    features = rows[0]["h_score_features"]
    command_tail = f" --h_score_features {args.h_score_features}" if args.h_score_features else ""
    atomic_write_json(out / "scale.json", {"machine": machine, "arguments": vars(args), "rows": rows})
    lines = [
        "# Cost against the number of tasks",
        "",
        f"Machine: {machine}; {datetime.date.today().isoformat()}. Command: `python benchmarks/scale.py --tasks "
        f"{' '.join(map(str, args.tasks))}{command_tail}`. The quickstart's setting: EfficientNet-Lite0 at 64 px, its "
        f"HyperLoRA config, batch {args.per_device_train_batch_size}, {steps_per_task(args)} steps per task; the "
        f'H-embedding with `h_score_features="{features}"` on {rows[0]["h_score_images"]} of {args.samples} images; '
        "training the last of T tasks.",
        "",
        "| tasks | training step (ms) | peak training memory (MiB) | frozen features (s) | H-embedding (s) "
        "| H-embedding / task training | old-task state held (KiB) | stored, all tasks (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['num_tasks']} | {r['train_step_ms']:.1f} | {r['peak_train_memory_bytes'] / 2**20:.1f} | "
            f"{r['frozen_features_s']:.2f} | {r['h_embedding_s']:.2f} | {100 * r['h_embedding_share']:.2f}% | "
            f"{r['old_task_state_bytes'] / 1024:.1f} | {r['stored_bytes'] / 2**20:.2f} |"
            for r in rows
        ),
        "",
        "The regulariser samples at most `reg_max_tasks` (8) old tasks per step, so its cost stops growing after 9 "
        "tasks; the head projection's grows with the old tasks' directions, up to 3/4 of the hypernetwork's width. "
        'With `h_score_features="head"` (the default) the old tasks read the sample through their adapted blocks '
        "only: the blocks before the first adapted module ran once, in the frozen pass the router needs (timed apart: "
        "hyperlora.training.prefix), and beyond `h_score_finalists` (8) old tasks every one is screened on "
        "`h_score_screen_samples` (32) images and only the best 8 read on the rest, so that it grows by 32 images per "
        'old task, not 128. `"lda"` reads no old task\'s model: its cost is the bootstrap and the fit.',
        "",
        f"Peak training memory: {describe(sorted({r['memory_how'] for r in rows}))}; over the {args.warmup} "
        "warm-up steps.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(out / "scale.md", text)
    _plot(out / "scale.png", rows)
    return text


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [r["num_tasks"] for r in rows]
    panels = [
        ("train_step_ms", "training step (ms)", 1.0),
        ("peak_train_memory_bytes", "peak training memory (MiB)", 1 / 2**20),
        ("h_embedding_share", "H-embedding / task training (%)", 100.0),
        ("old_task_state_bytes", "old-task state held (KiB)", 1 / 1024),
        ("stored_bytes", "stored, all tasks (MiB)", 1 / 2**20),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.4))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        ax.plot(tasks, [scale * r[key] for r in rows], marker="o")
        ax.set_xlabel("number of tasks")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    plt.close(fig)
    Path(tmp.name).replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 2, 5, 10, 21, 50])
    parser.add_argument("--per_device_train_batch_size", "--batch_size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=800, help="images per H-score: a structured task's 800")
    parser.add_argument(
        "--h_score_features", choices=H_SCORE_FEATURES, default=None, help="the H-score's estimator (None: default)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "scale"))
    return parse(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for num_tasks in args.tasks:
            rows.append(pool.submit(measure, num_tasks, args).result())
            print(rows[-1], flush=True)
    print(write_report(out, rows, args))


if __name__ == "__main__":
    main()
