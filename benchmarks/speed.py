"""HyperLoRA vs PEFT's own LoRA: training step, inference, peak memory and storage, measured side by side.

Both methods wrap the same timm ViT (same seed, same weights) with the same rank, alpha and target modules, and
see the same batch. Timed repetitions are interleaved (one call of every variant per round, the order rotating
each round) and each variant's median is reported, with the ratio of medians. Peak training memory is read in a
fresh subprocess per method and run. Results go to ``<output_dir>/<name>.md`` and ``<output_dir>/<name>.json``.

    python benchmarks/speed.py                       # CPU default: ViT-Tiny/16, 64 px, batch 32, fp32
    python benchmarks/speed.py --quick               # a few repetitions, to check that it runs
    python benchmarks/speed.py --device cuda --model_name_or_path vit_base_patch16_224 --image_size 224 \\
        --dtype bf16 --name speed_gpu                # the GPU table (memory: torch.cuda.max_memory_allocated)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accuracy import code_version
from operators import extra_breakdown, operator_table, step_operator_calls
from peak_memory import describe, peak_increase
from torch import nn

from hyperlora import cli
from hyperlora.tuner.model import TIMM_VIT_TARGETS

TARGET_MODULES = TIMM_VIT_TARGETS
NUM_CLASSES = 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_GPU_NOTE = "This run is on the CPU: the ViT-B/16 224 px bf16 table is measured on a GPU (speed_gpu.md beside it)"

# Variants the builder knows; every one starts from the same seeded base model.
#   bare: the base model alone; lora: PEFT LoRA, one adapter; lora10: PEFT LoRA, 10 adapters; lora_merged: PEFT
#   LoRA's adapter merged (merge_adapter: its layers stay wrapped, as HyperLoRA's do after merge_task);
#   hyper1 / hyper10: HyperLoRA with 1 / 10 tasks registered (the last one active); hyper_merged: 10 tasks, the
#   active one merged into the weights.
VARIANTS = ("bare", "lora", "lora10", "lora_merged", "hyper1", "hyper10", "hyper_merged")


# --- models --------------------------------------------------------------------------------------------------------


def base_model(args: argparse.Namespace) -> nn.Module:
    import timm

    torch.manual_seed(args.seed)
    return timm.create_model(args.model_name_or_path, pretrained=False, num_classes=0, img_size=args.image_size)


def build(variant: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Linear]:
    """(model, task head) for one variant, on the device and in the dtype of the run."""
    from peft import LoraConfig, get_peft_model

    import hyperlora

    base = base_model(args)
    if variant == "bare":
        model = base
    elif variant in ("lora", "lora10", "lora_merged"):
        config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=TARGET_MODULES)
        model = get_peft_model(base, config, adapter_name="task0")
        for t in range(1, args.num_tasks if variant == "lora10" else 1):
            model.add_adapter(f"task{t}", config)
        model.set_adapter("task0")  # the one trained / used for single-adapter runs
    elif variant in ("hyper1", "hyper10", "hyper_merged"):
        config = hyperlora.HyperLoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=TARGET_MODULES)
        model = get_peft_model(base, config)
        for _ in range(1 if variant == "hyper1" else args.num_tasks):
            model.add_task()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    torch.manual_seed(args.seed + 1)
    head = nn.Linear(base_feature_dim(model), NUM_CLASSES)
    model.to(args.device, DTYPES[args.dtype])
    head.to(args.device, DTYPES[args.dtype])
    if variant == "hyper_merged":
        model.merge_task(model.active_task)
    elif variant == "lora_merged":
        model.merge_adapter()
    return model, head


def base_feature_dim(model: nn.Module) -> int:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.num_features


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.per_device_train_batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.per_device_train_batch_size,), generator=g)
    return x.to(args.device, DTYPES[args.dtype]), y.to(args.device)


def mixed_task_ids(args: argparse.Namespace) -> list[int]:
    """Every one of the ``num_tasks`` tasks, evenly spread over the batch, in a seeded shuffled order."""
    g = torch.Generator().manual_seed(args.seed + 3)
    ids = torch.arange(args.per_device_train_batch_size) % args.num_tasks
    return ids[torch.randperm(args.per_device_train_batch_size, generator=g)].tolist()


def train_step(model: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Forward + backward + AdamW step over the trainable parameters of model and head."""
    model.train()
    head.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=x.device.type in ("cpu", "cuda"))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(model(x)).float(), y)
        loss.backward()
        optimizer.step()

    return step


def infer(model: nn.Module, x: torch.Tensor, **kwargs) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x, **kwargs)

    return run


# --- timing --------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _busy_seconds() -> float | None:
    """CPU seconds spent by the whole machine (every core, every process) since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class BackgroundLoad:
    """How many cores other processes kept busy while a block ran: machine busy time minus this process's own."""

    def __enter__(self) -> BackgroundLoad:
        self.busy, self.own, self.wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy is None or self.busy is None:
            self.cores = None
        else:
            self.cores = max(0.0, (busy - self.busy) - (own - self.own)) / (wall - self.wall)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def interleaved(calls: dict[str, Callable[[], None]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call: every round runs each call once, the order rotating from round to round."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median_ms": 1e3 * statistics.median(samples),
        "p25_ms": 1e3 * q[0],
        "p75_ms": 1e3 * q[2],
        "n": len(samples),
    }


# --- peak memory (one fresh subprocess per method and run) --------------------------------------------------------


def memory_worker(variant: str, args: argparse.Namespace) -> dict:
    """Peak memory of ``args.memory_steps`` training steps above the state right after model construction."""
    model, head = build(variant, args)
    x, y = batch(args)
    return peak_increase(train_step(model, head, x, y), args.memory_steps, args.device)


def measure_memory(variants: list[str], args: argparse.Namespace, argv: list[str]) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {v: [] for v in variants}
    hows = set()
    for _ in range(args.memory_runs):
        for variant in variants:  # interleaved runs, like the timings
            out = subprocess.run(
                [sys.executable, __file__, *argv, "--_memory_worker", variant],
                check=True,
                capture_output=True,
                text=True,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(record["peak_increase_bytes"])
            hows.add(record["how"])
    results["_how"] = sorted(hows)
    return results


# --- storage -------------------------------------------------------------------------------------------------------


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def storage(models: dict[str, tuple[nn.Module, nn.Linear]], args: argparse.Namespace) -> dict:
    """What save_pretrained stores (peft's get_peft_model_state_dict), split into per-task and shared bytes."""
    from peft import get_peft_model_state_dict

    lora, head = models["lora"]
    hyper, _ = models["hyper10"]
    head_bytes = tensor_bytes(head.state_dict().values())
    lora_adapter = tensor_bytes(get_peft_model_state_dict(lora, adapter_name="task0").values())
    hyper_state = get_peft_model_state_dict(hyper)
    task_keys = [k for k in hyper_state if re.search(r"task_embeddings\.\d+$", k)]
    embedding_bytes = tensor_bytes(hyper_state[k] for k in task_keys) // len(task_keys)
    shared = tensor_bytes(v for k, v in hyper_state.items() if k not in task_keys)

    def trainable(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    n = args.num_tasks
    lora_task = lora_adapter + head_bytes
    hyper_task = embedding_bytes + head_bytes
    break_even = shared / (lora_task - hyper_task) if lora_task > hyper_task else float("inf")
    return {
        "head_bytes": head_bytes,
        "lora": {
            "trainable_params": trainable(lora) + sum(p.numel() for p in head.parameters()),
            "adapter_bytes_per_task": lora_adapter,
            "per_task_bytes": lora_task,
            "shared_bytes": 0,
            f"total_bytes_{n}_tasks": n * lora_task,
        },
        "hyperlora": {
            "trainable_params": trainable(models["hyper1"][0]) + sum(p.numel() for p in head.parameters()),
            "task_embedding_bytes": embedding_bytes,
            "per_task_bytes": hyper_task,
            "shared_bytes": shared,
            f"total_bytes_{n}_tasks": shared + n * hyper_task,
        },
        "break_even_tasks": break_even,
    }


# --- report --------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(args: argparse.Namespace) -> dict:
    import peft
    import timm

    info = {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "timm": timm.__version__,
        "hyperlora_commit": code_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def ratio_row(name, hyper, ref, ref_name, unit, target) -> dict:
    ratio = hyper / ref
    return {
        "measurement": name,
        "hyperlora": hyper,
        "reference": ref,
        "reference_name": ref_name,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "result": "info" if target is None else ("pass" if ratio <= target else "FAIL"),
    }


def fmt_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "bytes":
        return fmt_bytes(value)
    return f"{value:,.0f}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [
        "# HyperLoRA vs PEFT LoRA: speed and memory",
        "",
        f"Generated by `{' '.join(['python benchmarks/speed.py', *result['argv']])}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores available, torch threads {m['torch_threads']}",
    ]
    if "gpu" in m:
        lines.append(f"- GPU: {m['gpu']}")
    lines += [
        f"- {m['platform']}, Python {m['python']}",
        f"- torch {m['torch']}, peft {m['peft']}, timm {m['timm']}, hyperlora at commit {m['hyperlora_commit']}",
        f"- date: {m['date']}",
    ]
    load = result["background_load_cores"]
    if all(v is not None for v in load.values()):
        lines.append(
            "- other processes on the machine kept on average "
            f"{load['training']:.2f} cores busy during the timed training rounds, {load['inference']:.2f} during "
            f"inference, {load['memory']:.2f} during the memory runs (/proc/stat busy time minus this run's own)"
        )
    lines += [
        "",
        "## Setup",
        "",
        f"- model: `{cfg['model']}` (timm, random init), {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['dtype']}, device {cfg['device']}; a {NUM_CLASSES}-class linear task head on the pooled features",
        f"- both methods: r={cfg['r']}, alpha={cfg['alpha']}, target modules {', '.join(TARGET_MODULES)}; "
        "HyperLoRA with its default hypernetwork (task/module embeddings 32, trunk 2 layers of 64)",
        f"- timings: {cfg['warmup']} warm-up rounds, then {cfg['train_repeats']} (training) / "
        f"{cfg['infer_repeats']} (inference) interleaved rounds, one call of each variant per round in a rotating "
        "order; medians, ratio = HyperLoRA median / reference median",
        "- training step: forward + cross-entropy + backward + AdamW (fused) step over every trainable parameter "
        "(model and head); HyperLoRA '10 tasks' has 10 task embeddings registered and trains the last "
        "(PEFT LoRA keeps one adapter: it would need 10 adapters to hold 10 tasks)",
        "- inference: eval mode under torch.no_grad(); per-sample task ids mix all "
        f"{cfg['num_tasks']} tasks in the batch",
        f"- peak memory: {result['memory_method']}; {cfg['memory_steps']} training steps per run, median of "
        f"{cfg['memory_runs']} runs per method",
        "",
        "## Results",
        "",
        "| Measurement | HyperLoRA | Reference | Ratio | Target | Result |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ref = fmt_value(row["reference"], row["unit"]) + f" ({row['reference_name']})"
        target = "-" if row["target"] is None else f"<= {row['target']:.2f}"
        lines.append(
            f"| {row['measurement']} | {fmt_value(row['hyperlora'], row['unit'])} | {ref} | {row['ratio']:.3f} | "
            f"{target} | {row['result']} |"
        )
    s = result["storage"]
    n = cfg["num_tasks"]
    lines += [
        "",
        "## Parameters and storage",
        "",
        "Bytes are what `save_pretrained` writes for the adapter (peft's `get_peft_model_state_dict`) plus the task "
        f"head ({fmt_bytes(s['head_bytes'])}), in {cfg['dtype']}.",
        "",
        "| | PEFT LoRA | HyperLoRA |",
        "|---|---|---|",
        f"| trainable parameters (adapter + head) | {s['lora']['trainable_params']:,} | "
        f"{s['hyperlora']['trainable_params']:,} |",
        f"| stored per task | {fmt_bytes(s['lora']['per_task_bytes'])} (adapter "
        f"{fmt_bytes(s['lora']['adapter_bytes_per_task'])} + head) | {fmt_bytes(s['hyperlora']['per_task_bytes'])} "
        f"(task embedding {fmt_bytes(s['hyperlora']['task_embedding_bytes'])} + head) |",
        f"| stored once (shared) | {fmt_bytes(s['lora']['shared_bytes'])} | "
        f"{fmt_bytes(s['hyperlora']['shared_bytes'])} (hypernetwork + module embeddings) |",
        f"| total for {n} tasks | {fmt_bytes(s['lora'][f'total_bytes_{n}_tasks'])} | "
        f"{fmt_bytes(s['hyperlora'][f'total_bytes_{n}_tasks'])} |",
        "",
        f"HyperLoRA stores less than LoRA from about {s['break_even_tasks']:.1f} tasks on.",
        "",
        "## Every timed variant",
        "",
        "| Group | Variant | Median | p25 | p75 | n |",
        "|---|---|---|---|---|---|",
    ]
    for group, variants in result["timings"].items():
        for name, t in variants.items():
            lines.append(
                f"| {group} | {name} | {t['median_ms']:.2f} ms | {t['p25_ms']:.2f} ms | {t['p75_ms']:.2f} ms | "
                f"{t['n']} |"
            )
    lines += ["", "## Peak memory runs", "", "| Variant | Peak increase per run |", "|---|---|"]
    for name, runs in result["memory_runs"].items():
        lines.append(f"| {name} | {', '.join(fmt_bytes(b) for b in runs)} |")
    if not cfg["device"].startswith("cuda"):
        lines += [
            "",
            "## GPU",
            "",
            NO_GPU_NOTE + ", with:",
            "",
            "```bash",
            "python benchmarks/speed.py --device cuda --model_name_or_path vit_base_patch16_224 --image_size 224 "
            "--dtype bf16 --name speed_gpu",
            "```",
        ]
    lines += [
        "",
        "## Operator calls per training step",
        "",
        "Kernel-dispatching ATen operator calls of one training step on the CPU (torch.profiler; a device-"
        "independent proxy for a GPU's kernel launches: views and allocations do not count, a multi-tensor "
        "operator counts once), ViT-B/16 with 12 and 6 blocks (48 and 24 adapted modules), HyperLoRA's trainer step on "
        "its 6th task (regulariser, guidance, protected heads) against PEFT LoRA's with the same clip and AdamW "
        "(benchmarks/operators.py):",
        "",
        *operator_table({int(depth): c for depth, c in result["operator_calls"].items()}),
    ]
    parts = result["operator_breakdown"]
    lines += [
        "",
        f"Where the {parts['extra']} extra calls at 12 blocks go: without the output regulariser and the "
        f"embedding guidance the step makes {parts['without_losses']} extra calls, against its hypernetwork "
        f"pass's {parts['hypernet_pass']}; the regulariser adds {parts['regulariser']} and the guidance "
        f"{parts['guidance']}. None of them depends on the number of adapted modules.",
    ]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model_name_or_path", "--model", default="vit_tiny_patch16_224", help="a timm model name")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--per_device_train_batch_size", "--batch_size", type=int, default=32, help="the batch of every measurement"
    )
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora_alpha", "--alpha", type=float, default=16)
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 60 training, 150 inference)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5)")
    parser.add_argument("--memory_runs", type=int, default=None, help="subprocess runs per method (default 3)")
    parser.add_argument("--memory_steps", type=int, default=3, help="training steps per memory run")
    parser.add_argument("--quick", action="store_true", help="a few repetitions, to check that the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="speed", help="output file stem: <name>.md and <name>.json")
    parser.add_argument("--_memory_worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    args = cli.parse(parser, argv)
    if args.quick:
        args.train_repeats = args.infer_repeats = args.repeats or 3
        args.warmup = 1 if args.warmup is None else args.warmup
        args.memory_runs = args.memory_runs or 1
    else:
        args.train_repeats = args.repeats or 60
        args.infer_repeats = args.repeats or 150
        args.warmup = 5 if args.warmup is None else args.warmup
        args.memory_runs = args.memory_runs or 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return None

    started = time.perf_counter()
    child_argv = [a for a in argv if a != "--quick"] + ["--memory_runs", "1"]  # the worker reads model options only
    print("peak memory (fresh subprocesses) ...", flush=True)
    with BackgroundLoad() as mem_load:
        mem = measure_memory(["lora", "hyper1", "hyper10"], args, child_argv)
    mem_how = mem.pop("_how")

    x, y = batch(args)
    notes = []
    models = {v: build(v, args) for v in ("lora", "hyper1", "hyper10")}

    print("training steps ...", flush=True)
    with BackgroundLoad() as train_load:
        train = interleaved(
            {
                "PEFT LoRA (1 adapter)": train_step(*models["lora"], x, y),
                "HyperLoRA, 1 task": train_step(*models["hyper1"], x, y),
                "HyperLoRA, 10 tasks": train_step(*models["hyper10"], x, y),
            },
            args.warmup,
            args.train_repeats,
            args.device,
        )
    # Training moved those weights: inference and the parameter counts use fresh copies.
    del models
    models = {v: build(v, args) for v in VARIANTS}

    print("inference ...", flush=True)
    ids = mixed_task_ids(args)
    calls = {
        "bare base model": infer(models["bare"][0], x),
        "HyperLoRA merged": infer(models["hyper_merged"][0], x),
        "PEFT LoRA merged": infer(models["lora_merged"][0], x),
        "PEFT LoRA unmerged (1 adapter)": infer(models["lora"][0], x),
        "HyperLoRA unmerged, one task": infer(models["hyper10"][0], x),
        "HyperLoRA per-sample task ids": infer(models["hyper10"][0], x, task_ids=torch.tensor(ids, device=args.device)),
    }
    lora_mixed = infer(models["lora10"][0], x, adapter_names=[f"task{t}" for t in ids])
    try:
        lora_mixed()
        calls["PEFT LoRA mixed batch (adapter_names, 10 adapters)"] = lora_mixed
    except Exception as error:  # reported, not fatal: a reference row only
        notes.append(f"PEFT LoRA mixed-batch inference (adapter_names) failed: {type(error).__name__}: {error}")
    with BackgroundLoad() as infer_load:
        inference = interleaved(calls, args.warmup, args.infer_repeats, args.device)

    timings = {
        "training step": {k: summary(v) for k, v in train.items()},
        "inference": {k: summary(v) for k, v in inference.items()},
    }
    tr, inf = timings["training step"], timings["inference"]

    def med(group: dict, key: str) -> float:
        return group[key]["median_ms"]

    rows = [
        ratio_row(
            "training step, 1 task",
            med(tr, "HyperLoRA, 1 task"),
            med(tr, "PEFT LoRA (1 adapter)"),
            "PEFT LoRA",
            "ms",
            1.10,
        ),
        ratio_row(
            f"training step, {args.num_tasks} tasks registered",
            med(tr, "HyperLoRA, 10 tasks"),
            med(tr, "PEFT LoRA (1 adapter)"),
            "PEFT LoRA, 1 adapter",
            "ms",
            1.10,
        ),
        ratio_row(
            "inference, merged task",
            med(inf, "HyperLoRA merged"),
            med(inf, "bare base model"),
            "bare base model",
            "ms",
            1.01,
        ),
        ratio_row(
            "inference, merged task, for reference",
            med(inf, "HyperLoRA merged"),
            med(inf, "PEFT LoRA merged"),
            "PEFT LoRA merged",
            "ms",
            None,
        ),
        ratio_row(
            "inference, unmerged, one task per batch",
            med(inf, "HyperLoRA unmerged, one task"),
            med(inf, "PEFT LoRA unmerged (1 adapter)"),
            "PEFT LoRA unmerged",
            "ms",
            1.10,
        ),
        ratio_row(
            f"inference, one task per sample ({args.num_tasks} tasks mixed)",
            med(inf, "HyperLoRA per-sample task ids"),
            med(inf, "PEFT LoRA unmerged (1 adapter)"),
            "PEFT LoRA unmerged, 1 adapter",
            "ms",
            1.30,
        ),
    ]
    mixed_key = "PEFT LoRA mixed batch (adapter_names, 10 adapters)"
    if mixed_key in inf:
        rows.append(
            ratio_row(
                f"inference, one task per sample ({args.num_tasks} tasks mixed), for reference",
                med(inf, "HyperLoRA per-sample task ids"),
                med(inf, mixed_key),
                f"PEFT LoRA adapter_names, {args.num_tasks} adapters",
                "ms",
                None,
            )
        )
    mem_median = {k: statistics.median(v) for k, v in mem.items()}
    rows += [
        ratio_row(
            "peak memory, training step, 1 task",
            mem_median["hyper1"],
            mem_median["lora"],
            "PEFT LoRA",
            "bytes",
            1.10,
        ),
        ratio_row(
            f"peak memory, training step, {args.num_tasks} tasks registered",
            mem_median["hyper10"],
            mem_median["lora"],
            "PEFT LoRA, 1 adapter",
            "bytes",
            1.10,
        ),
    ]
    store = storage(models, args)
    n = args.num_tasks
    rows += [
        ratio_row(
            "trainable parameters (adapter + head)",
            store["hyperlora"]["trainable_params"],
            store["lora"]["trainable_params"],
            "PEFT LoRA",
            "count",
            None,
        ),
        ratio_row(
            "bytes stored per task",
            store["hyperlora"]["per_task_bytes"],
            store["lora"]["per_task_bytes"],
            "PEFT LoRA",
            "bytes",
            None,
        ),
        ratio_row(
            f"bytes stored, {n} tasks (shared + per task)",
            store["hyperlora"][f"total_bytes_{n}_tasks"],
            store["lora"][f"total_bytes_{n}_tasks"],
            "PEFT LoRA",
            "bytes",
            None,
        ),
    ]

    print("operator calls ...", flush=True)
    operator_calls = {str(depth): step_operator_calls(depth=depth) for depth in (12, 6)}
    operator_breakdown = extra_breakdown(operator_calls["12"], depth=12)  # the same model as that count
    result = {
        "argv": argv,
        "machine": machine(args),
        "config": {
            "model": args.model_name_or_path,
            "image_size": args.image_size,
            "batch_size": args.per_device_train_batch_size,
            "dtype": args.dtype,
            "device": args.device,
            "r": args.r,
            "alpha": args.lora_alpha,
            "target_modules": TARGET_MODULES,
            "num_tasks": args.num_tasks,
            "warmup": args.warmup,
            "train_repeats": args.train_repeats,
            "infer_repeats": args.infer_repeats,
            "memory_runs": args.memory_runs,
            "memory_steps": args.memory_steps,
            "quick": args.quick,
        },
        "rows": rows,
        "timings": timings,
        "memory_method": describe(mem_how),
        "background_load_cores": {
            "memory": mem_load.cores,
            "training": train_load.cores,
            "inference": infer_load.cores,
        },
        "memory_runs": mem,
        "storage": store,
        "operator_calls": operator_calls,
        "operator_breakdown": operator_breakdown,
        "gpu_table": None if args.device.startswith("cuda") else NO_GPU_NOTE,
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"wrote {out / args.name}.md and .json in {result['wall_seconds']} s")
    return result


if __name__ == "__main__":
    main()
