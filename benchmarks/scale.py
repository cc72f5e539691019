"""How HyperLoRA's costs grow with the number of tasks, 1 to 50, on a small ViT.

For T tasks registered (training the last one): the time of one training step with the full loss (cross-entropy,
the output regulariser over a sampled subset of at most ``reg_max_tasks`` old tasks, and the embedding guidance),
the peak memory of those training steps, the time of the H-embedding (T-1 H-scores on ``h_score_samples`` images,
AHP and the embedding fit), the bytes of what the trainer holds for the old tasks (embeddings and the regulariser's
recorded A*, B*), and the bytes stored. Each T is measured in a fresh process, so the memory of one does not hide
in the allocator for the next.

    python benchmarks/scale.py --tasks 1 2 5 10 20 50
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from peak_memory import describe, peak_increase
from peft import get_peft_model
from torch import nn

from hyperlora import HyperLoraConfig
from hyperlora.checkpoint import atomic_write_json, atomic_write_text
from hyperlora.cli import parse
from hyperlora.embedding import fit_h_embedding, target_distances
from hyperlora.losses import GuidanceDecoder, guidance_loss, output_regulariser
from hyperlora.transferability import h_score


def build(num_tasks: int, args: argparse.Namespace):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=args.image_size, patch_size=8, depth=4
    )
    config = HyperLoraConfig(r=8, lora_alpha=16, h_score_samples=args.samples)
    model = get_peft_model(vit, config)
    for _ in range(num_tasks):
        model.add_task()
    return model, config


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(num_tasks: int, args: argparse.Namespace) -> dict:
    model, config = build(num_tasks, args)
    tuner = model.base_model
    t = num_tasks - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.per_device_train_batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.per_device_train_batch_size,), generator=g)
    head = nn.Linear(vit_dim(model), 10)
    decoder = GuidanceDecoder(config.hypernet_hidden_dim, config.task_embedding_dim, config.decoder_hidden_dim)
    h_target = torch.randn(config.task_embedding_dim)

    with torch.no_grad():
        recorded = tuner.generate(list(range(t))) if t else None
    targets = ([a.clone() for a in recorded.A], [b.clone() for b in recorded.B]) if recorded else None
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    sampler = torch.Generator().manual_seed(1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(model(x)), y)
        reg_tasks = torch.randperm(t, generator=sampler)[: config.reg_max_tasks].tolist() if t else []
        out = tuner.generate([*reg_tasks, t])
        if reg_tasks:
            loss = loss + config.beta_reg * output_regulariser(out, reg_tasks, *targets)
        loss = loss + guidance_loss(decoder, out.hidden[-1:], h_target)
        loss.backward()
        optimizer.step()

    model.train()
    memory = peak_increase(step, args.warmup, "cpu")  # the warm-up steps, measured
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    # the H-embedding of task t: features of the new data under each old task's adapter, H-scores, AHP, the fit
    model.eval()
    images = torch.randn(args.samples, 3, args.image_size, args.image_size, generator=g)
    labels = torch.arange(args.samples) % 10
    start = time.perf_counter()
    scores = []
    with torch.no_grad():
        for i in range(t):
            scores.append(h_score(model(images, task_ids=i), labels))
    old = tuner.hypernet.stacked_task_embeddings().detach()[:t].numpy()
    if t:
        distances = target_distances(np.asarray(scores), old, normalisation=config.normalisation)
        fit_h_embedding(old, distances, steps=config.h_embedding_steps, seed=0)
    h_embedding_s = time.perf_counter() - start

    hypernet = tuner.hypernet
    shared = tensor_bytes(p for n, p in hypernet.named_parameters() if not n.startswith("task_embeddings"))
    return {
        "num_tasks": num_tasks,
        "train_step_ms": 1e3 * statistics.median(times),
        "peak_train_memory_bytes": memory["peak_increase_bytes"],
        "memory_how": memory["how"],
        "h_embedding_s": h_embedding_s,
        "old_task_state_bytes": tensor_bytes(hypernet.task_embeddings)
        + (tensor_bytes([*targets[0], *targets[1]]) if targets else 0),
        "stored_bytes": shared + tensor_bytes(hypernet.task_embeddings) + num_tasks * tensor_bytes(head.parameters()),
    }


def vit_dim(model) -> int:
    return model.get_base_model().num_features


def write_report(out: Path, rows: list[dict], args: argparse.Namespace) -> str:
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    atomic_write_json(out / "scale.json", {"machine": machine, "arguments": vars(args), "rows": rows})
    lines = [
        "# Cost against the number of tasks",
        "",
        f"Machine: {machine}; {datetime.date.today().isoformat()}. Command: `python benchmarks/scale.py --tasks "
        f"{' '.join(map(str, args.tasks))}`. A 4-block ViT-Tiny at {args.image_size} px, "
        f"batch {args.per_device_train_batch_size}, r=8, the H-embedding on {args.samples} images; "
        "training the last of T tasks.",
        "",
        "| tasks | training step (ms) | peak training memory (MiB) | H-embedding (s) | old-task state held (KiB) "
        "| stored, all tasks (MiB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['num_tasks']} | {r['train_step_ms']:.1f} | {r['peak_train_memory_bytes'] / 2**20:.1f} | "
            f"{r['h_embedding_s']:.2f} | "
            f"{r['old_task_state_bytes'] / 1024:.1f} | {r['stored_bytes'] / 2**20:.2f} |"
            for r in rows
        ),
        "",
        "The regulariser samples at most `reg_max_tasks` (8) old tasks per step, so the step time stops growing after "
        "9 tasks; the H-embedding runs one forward pass per old task, so it grows linearly.",
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
        ("h_embedding_s", "H-embedding (s)", 1.0),
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
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--per_device_train_batch_size", "--batch_size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256, help="images per H-score")
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
