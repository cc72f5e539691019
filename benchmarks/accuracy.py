"""Accuracy of HyperLoRA against PEFT-LoRA baselines, side by side on the same backbone, data, budget and seeds.

Methods (``--methods``):
- ``hyperlora``: the full method (hyperlora.trainer.ContinualTrainer);
- ``lora_per_task``: one independent PEFT LoRA adapter and head per task (task-incremental ceiling, T adapters stored);
- ``lora_sequential``: one PEFT LoRA adapter fine-tuned through all tasks, a head per task (the forgetting floor).

Benchmark ``quickstart``: the offline six-task sequence of recipes/quickstart.py on EfficientNet-Lite0.

    python benchmarks/accuracy.py --seeds 0 1 2 --output_dir benchmarks/results/accuracy

Writes accuracy.json and accuracy.md (mean and std over seeds) under the output directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from quickstart import build_backbone, build_tasks

from hyperlora.data import TaskImages, image_spec, pooled_features
from hyperlora.metrics import METRIC_KEYS, continual_metrics
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments

EPOCHS, BATCH, LR, HEAD_LR = 2, 32, 1e-3, 1e-2


def _loader(task, split: str, spec, shuffle: bool, seed: int):
    dataset = TaskImages(getattr(task, split), spec.transform(), task.classes)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH if shuffle else 128, shuffle=shuffle, generator=generator
    )


def _train_lora_task(model, head: nn.Linear, task, spec, seed: int) -> None:
    """The same budget and optimiser as the HyperLoRA trainer: AdamW, cosine schedule, grad-norm clip 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": LR}, {"params": head.parameters(), "lr": HEAD_LR}], weight_decay=0.0
    )
    loader = _loader(task, "train", spec, shuffle=True, seed=seed)
    total = EPOCHS * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    _train_mode(model)
    for _ in range(EPOCHS):
        for pixel_values, labels in loader:
            loss = F.cross_entropy(head(pooled_features(model(pixel_values))), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, *head.parameters()], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()


def _train_mode(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def _accuracy(model, head, task, spec) -> float:
    hits = n = 0
    for pixel_values, labels in _loader(task, "test", spec, shuffle=False, seed=0):
        hits += (head(pooled_features(model(pixel_values))).argmax(-1) == labels).sum().item()
        n += labels.numel()
    return hits / n


TARGETS = r"net\._blocks\.1[0-5]\._(expand|project)_conv|net\._conv_head"  # as recipes/quickstart.py


def _lora(backbone: nn.Module):
    """PEFT LoRA on the same 1x1 convs. PEFT rebuilds a target's class for lora_A/B, which EfficientNet's
    Conv2dStaticSamePadding cannot (it needs an image size), so those convs become plain nn.Conv2d with the same
    weights first: exact for a 1x1 kernel, whose "same" padding is zero."""
    for name, module in list(backbone.named_modules()):
        if re.fullmatch(TARGETS, name) and type(module) is not nn.Conv2d:
            plain = nn.Conv2d(
                module.in_channels, module.out_channels, 1, stride=module.stride, bias=module.bias is not None
            )
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, plain)
    return get_peft_model(backbone, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))


def run_lora(tasks, seed: int, per_task: bool) -> dict:
    """Accuracy matrix of per-task or sequential LoRA; per-task adapters never change once trained."""
    num_tasks = len(tasks)
    R = np.full((num_tasks, num_tasks), np.nan)
    heads, adapters, times = [], [], []
    torch.manual_seed(seed)
    backbone, _, size = build_backbone("efficientnet")
    spec = image_spec(backbone, size)
    model = None if per_task else _lora(backbone)
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + t)
        start = time.perf_counter()
        if per_task:
            torch.manual_seed(seed + t)
            model = _lora(build_backbone("efficientnet")[0])
            adapters.append(model)
        head = nn.Linear(1280, task.num_classes)
        _train_lora_task(model, head, task, spec, seed + t)
        head.requires_grad_(False)
        heads.append(head)
        times.append(time.perf_counter() - start)
        for j in range(t + 1):
            R[t, j] = _accuracy(adapters[j] if per_task else model, heads[j], tasks[j], spec)
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    return {"accuracy_matrix": R, "train_s": times, "bytes_per_task": lora_bytes if per_task else 0}


def run_hyperlora(tasks, seed: int, output_dir: Path) -> dict:
    torch.manual_seed(seed)
    backbone, config, size = build_backbone("efficientnet")
    args = ContinualTrainingArguments(
        output_dir=str(output_dir),
        num_epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=LR,
        head_learning_rate=HEAD_LR,
        seed=seed,
        image_size=size,
        plots=False,
    )
    trainer = ContinualTrainer(backbone, config, args)
    results = trainer.fit(tasks)
    results["bytes_per_task"] = config.task_embedding_dim * 4
    results["shared_bytes"] = hypernet_bytes(trainer.model)
    return results


def hypernet_bytes(model) -> int:
    """What HyperLoRA stores once for all tasks: the hypernetwork without its task embeddings, in float32."""
    hypernet = model.base_model.hypernet
    return 4 * sum(p.numel() for n, p in hypernet.named_parameters() if not n.startswith("task_embeddings"))


def _row(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def write_report(out: Path, runs: dict[str, list[dict]], seeds: list[int]) -> str:
    """Rewrite accuracy.json and accuracy.md from the runs so far: a cut-off sweep keeps what it measured."""
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    summary = {
        "benchmark": "quickstart (5 split-MNIST tasks + sklearn digits, EfficientNet-Lite0, 64 px)",
        "budget": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "head_lr": HEAD_LR},
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "runs": runs,
    }
    (out / "accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = [k for k in METRIC_KEYS if k != "fwt"]
    lines = [
        f"# Task-incremental accuracy on the quickstart benchmark ({len(seeds)} seeds, mean ± std, %)",
        "",
        f"Machine: {machine}; {summary['date']}. Command: `python benchmarks/accuracy.py --seeds "
        f"{' '.join(map(str, seeds))}`.",
        "",
        "| method | " + " | ".join(keys) + " | bytes stored per task (besides the head) | bytes shared by all tasks |",
        "|---|" + "---|" * (len(keys) + 2),
    ]
    for method, results in runs.items():
        if not results:
            continue
        cells = [_row([r[k] for r in results]) for k in keys]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {results[0]['bytes_per_task']:,} | {results[0]['shared_bytes']:,} |"
        )
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["hyperlora", "lora_per_task", "lora_sequential"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="benchmarks/results/accuracy")
    cli = parser.parse_args(argv)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {method: [] for method in cli.methods}
    for seed in cli.seeds:
        tasks = build_tasks(seed)
        for method in cli.methods:
            start = time.perf_counter()
            if method == "hyperlora":
                result = run_hyperlora(tasks, seed, Path(tempfile.mkdtemp(prefix=f"{method}-seed{seed}-")))
                matrix = np.array(result["accuracy_matrix"], dtype=float)
            elif method in ("lora_per_task", "lora_sequential"):
                result = run_lora(tasks, seed, per_task=method == "lora_per_task")
                matrix = result["accuracy_matrix"]
            else:
                raise SystemExit(f"unknown method {method!r}")
            metrics = continual_metrics(matrix)
            metrics.update(
                seed=seed,
                wall_s=time.perf_counter() - start,
                bytes_per_task=result["bytes_per_task"],
                shared_bytes=result.get("shared_bytes", 0),
                accuracy_matrix=np.where(np.isnan(matrix), None, matrix).tolist(),
            )
            runs[method].append(metrics)
            write_report(out, runs, cli.seeds)
            print(
                f"{method:16s} seed {seed}: FAA {100 * metrics['faa']:.2f}  forgetting "
                f"{100 * (metrics['forgetting'] or 0):.2f}  ({metrics['wall_s']:.0f} s)",
                flush=True,
            )

    print(write_report(out, runs, cli.seeds))


if __name__ == "__main__":
    main()
