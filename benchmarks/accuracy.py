"""Accuracy of HyperLoRA against its ablations and PEFT-LoRA baselines, side by side on the same backbone, data,
budget and seeds.

Methods (``--methods``):
- ``hyperlora``: the full method (hyperlora.trainer.ContinualTrainer);
- ablations, each one HyperLoraConfig switch: ``no_guidance`` (normalisation "none": a plain hypernetwork with
  learned, randomly initialised task embeddings), ``minmax`` (min-max instead of AHP), ``no_regulariser``
  (beta_reg 0), ``random_init`` (task embeddings start at random, guidance kept);
- ``lora_per_task``: one independent PEFT LoRA adapter and head per task (task-incremental ceiling, T adapters);
- ``lora_sequential``: one PEFT LoRA adapter fine-tuned through all tasks, a head per task (the forgetting floor);
- ``lora_ewc``: the same, with online EWC (diagonal empirical Fisher) on the adapter's parameters;
- ``joint``: one PEFT LoRA adapter and a head per task trained on all tasks at once (the upper bound; only its
  final accuracies exist).

Benchmarks (``--benchmark``): ``quickstart``, the offline six-task sequence of recipes/quickstart.py (five split-MNIST
pairs, then sklearn digits as a ten-class task from another domain) on EfficientNet-Lite0; ``long``, ten two-class
tasks (the five MNIST pairs, then five pairs of sklearn 8x8 digits), same backbone; ``imagenet_r``, the protocol of
recipes/imagenet_r.py (200 classes in ``--num_tasks`` tasks, the seeded 80/20 split, class order seed 1993) on a timm
ViT (ViT-B/16 in21k by default; ``--dataset_name`` a Hub id or a local image folder), on a GPU when there is one.
Every method reads the same budget (``--num_train_epochs``, ``--per_device_train_batch_size``, ``--learning_rate``,
``--head_learning_rate``) and targets the same modules (HyperLoRA's, for PEFT LoRA too). Arguments follow
hyperlora.cli (``--config file.yaml``; the old ``--epochs``, ``--batch_size``, ``--lr``, ``--head_lr``, ``--model``
and ``--data_path`` still work).

    python benchmarks/accuracy.py --seeds 0 1 2
    python benchmarks/accuracy.py --benchmark imagenet_r --dataset_name /data/imagenet-r --num_train_epochs 20 \\
        --per_device_train_batch_size 64

Writes accuracy.json, accuracy.md (mean and std over seeds) and accuracy.png under the output directory; with
``--append`` the runs are added to those already in accuracy.json (same benchmark), so methods can be run apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from quickstart import _split, build_backbone, build_tasks

from hyperlora import HyperLoraConfig
from hyperlora.checkpoint import atomic_write_json, atomic_write_text
from hyperlora.cli import parse
from hyperlora.data import TaskImages, image_spec, pooled_features
from hyperlora.metrics import METRIC_KEYS, continual_metrics
from hyperlora.model import default_target_modules
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments


@dataclass(frozen=True)
class Setup:
    """What every method shares: a backbone factory (a fresh pretrained copy per call, with HyperLoRA's config and
    the input size), the training budget and the device."""

    backbone: Callable[[], tuple[nn.Module, HyperLoraConfig, int | None]]
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float = 1e-2
    device: str = "cpu"

    def build(self) -> tuple[nn.Module, HyperLoraConfig, object, int]:
        """A fresh backbone on the device, its HyperLoRA config, image spec and pooled feature width."""
        backbone, config, size = self.backbone()
        spec = image_spec(backbone, size)
        backbone = backbone.to(self.device).eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, spec.size, spec.size, device=self.device)
            width = pooled_features(backbone(probe)).shape[-1]
        return backbone, config, spec, width


def _loader(task, split: str, spec, setup: Setup, shuffle: bool, seed: int):
    dataset = TaskImages(getattr(task, split), spec.transform(), task.classes)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    batch_size = setup.batch_size if shuffle else 4 * setup.batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _train_lora_task(model, head: nn.Linear, task, spec, setup: Setup, seed: int, penalty=None) -> None:
    """The same budget and optimiser as the HyperLoRA trainer: AdamW, cosine schedule, grad-norm clip 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = _loader(task, "train", spec, setup, shuffle=True, seed=seed)

    def loss_fn(features, labels, _task_ids):
        return F.cross_entropy(head(features), labels)

    _fit(model, [head], params, loader, loss_fn, setup, penalty)


def _fit(model, heads, params, loader, loss_fn, setup: Setup, penalty=None) -> None:
    head_params = [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": setup.lr}, {"params": head_params, "lr": setup.head_lr}], weight_decay=0.0, fused=True
    )
    total = setup.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    _train_mode(model)
    for _ in range(setup.epochs):
        for batch in loader:
            pixel_values, labels, *task_ids = (t.to(setup.device) for t in batch)
            loss = loss_fn(pooled_features(model(pixel_values)), labels, task_ids[0] if task_ids else None)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, *head_params], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()


class OnlineEWC:
    """Online EWC (Schwarz et al. 2018) on the adapter: F <- F + F_t and anchors at the end of each task, penalty
    strength / 2 * sum F (theta - anchor)^2. F_t is the batch-level empirical Fisher (squared gradients of the
    mean loss per batch, averaged over batches)."""

    def __init__(self, params: list[nn.Parameter], strength: float) -> None:
        self.params, self.strength = params, strength
        self.fisher = [torch.zeros_like(p) for p in params]
        self.anchors: list[torch.Tensor] | None = None

    def penalty(self) -> torch.Tensor:
        if self.anchors is None:
            return torch.zeros(())
        terms = [(f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchors, strict=True)]
        return 0.5 * self.strength * torch.stack(terms).sum()

    def consolidate(self, model, head: nn.Linear, task, spec, setup: Setup) -> None:
        loader = _loader(task, "train", spec, setup, shuffle=False, seed=0)
        model.eval()
        for pixel_values, labels in loader:
            model.zero_grad()
            pixel_values, labels = pixel_values.to(setup.device), labels.to(setup.device)
            F.cross_entropy(head(pooled_features(model(pixel_values))), labels).backward()
            for f, p in zip(self.fisher, self.params, strict=True):
                f += p.grad.detach() ** 2 / len(loader)
        model.zero_grad()
        self.anchors = [p.detach().clone() for p in self.params]


def _train_mode(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def _accuracy(model, head, task, spec, setup: Setup) -> float:
    hits = n = 0
    for pixel_values, labels in _loader(task, "test", spec, setup, shuffle=False, seed=0):
        logits = head(pooled_features(model(pixel_values.to(setup.device))))
        hits += (logits.argmax(-1).cpu() == labels).sum().item()
        n += labels.numel()
    return hits / n


def _lora(backbone: nn.Module, config: HyperLoraConfig, device: str):
    """PEFT LoRA with HyperLoRA's rank, alpha and target modules. PEFT rebuilds a target's class for lora_A/B,
    which a padding-aware conv subclass (EfficientNet's Conv2dStaticSamePadding) cannot, so 1x1 targets become
    plain nn.Conv2d with the same weights first: exact for a 1x1 kernel, whose "same" padding is zero."""
    targets = config.target_modules or default_target_modules(backbone)
    lora_config = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=targets)
    for name, module in list(backbone.named_modules()):
        conv_subclass = isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d
        if conv_subclass and module.kernel_size == (1, 1) and check_target_module_exists(lora_config, name):
            plain = nn.Conv2d(
                module.in_channels, module.out_channels, 1, stride=module.stride, bias=module.bias is not None
            )
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, plain.to(device))
    return get_peft_model(backbone, lora_config)


def run_lora(tasks, seed: int, mode: str, setup: Setup, ewc_strength: float = 0.0) -> dict:
    """Accuracy matrix of per-task, sequential or EWC LoRA; per-task adapters never change once trained."""
    num_tasks = len(tasks)
    R = np.full((num_tasks, num_tasks), np.nan)
    heads, adapters, times = [], [], []
    torch.manual_seed(seed)
    backbone, config, spec, width = setup.build()
    model = None if mode == "per_task" else _lora(backbone, config, setup.device)
    ewc = OnlineEWC([p for p in model.parameters() if p.requires_grad], ewc_strength) if mode == "ewc" else None
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + t)
        start = time.perf_counter()
        if mode == "per_task":
            model = _lora(setup.build()[0], config, setup.device)
            adapters.append(model)
        head = nn.Linear(width, task.num_classes).to(setup.device)
        _train_lora_task(model, head, task, spec, setup, seed + t, penalty=ewc.penalty if ewc else None)
        if ewc is not None:
            ewc.consolidate(model, head, task, spec, setup)
        head.requires_grad_(False)
        heads.append(head)
        times.append(time.perf_counter() - start)
        for j in range(t + 1):
            R[t, j] = _accuracy(adapters[j] if mode == "per_task" else model, heads[j], tasks[j], spec, setup)
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    return {
        "accuracy_matrix": R,
        "train_s": times,
        "bytes_per_task": lora_bytes if mode == "per_task" else 0,
        "shared_bytes": 0 if mode == "per_task" else lora_bytes,
    }


class _Tagged(torch.utils.data.Dataset):
    """A task's images with the task's index as a third item, so that one loader can mix tasks."""

    def __init__(self, images: TaskImages, task_id: int) -> None:
        self.images, self.task_id = images, task_id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (*self.images[i], self.task_id)


def run_joint(tasks, seed: int, setup: Setup) -> dict:
    """One LoRA adapter and a head per task, trained on every task's data at once for the same number of epochs:
    the upper bound a continual learner approaches. Only the final row of the accuracy matrix exists."""
    torch.manual_seed(seed)
    backbone, config, spec, width = setup.build()
    model = _lora(backbone, config, setup.device)
    heads = nn.ModuleList(nn.Linear(width, task.num_classes) for task in tasks).to(setup.device)
    union = torch.utils.data.ConcatDataset(
        [_Tagged(TaskImages(task.train, spec.transform(), task.classes), t) for t, task in enumerate(tasks)]
    )
    loader = torch.utils.data.DataLoader(
        union, batch_size=setup.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )

    def loss_fn(features, labels, task_ids):
        losses = [
            F.cross_entropy(heads[t](features[task_ids == t]), labels[task_ids == t], reduction="sum")
            for t in task_ids.unique().tolist()
        ]
        return torch.stack(losses).sum() / labels.numel()

    start = time.perf_counter()
    _fit(model, list(heads), [p for p in model.parameters() if p.requires_grad], loader, loss_fn, setup)
    R = np.full((len(tasks), len(tasks)), np.nan)
    R[-1] = [_accuracy(model, heads[j], tasks[j], spec, setup) for j in range(len(tasks))]
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    return {
        "accuracy_matrix": R,
        "train_s": [time.perf_counter() - start],
        "bytes_per_task": 0,
        "shared_bytes": lora_bytes,
    }


ABLATIONS = {
    "hyperlora": {},
    "no_guidance": {"normalisation": "none"},
    "minmax": {"normalisation": "minmax"},
    "no_regulariser": {"beta_reg": 0.0},
    "random_init": {"embedding_init": "random"},
}


def run_hyperlora(tasks, seed: int, output_dir: Path, overrides: dict, setup: Setup) -> dict:
    torch.manual_seed(seed)
    backbone, config, size = setup.backbone()
    config = dataclasses.replace(config, **overrides)
    args = ContinualTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=setup.epochs,
        per_device_train_batch_size=setup.batch_size,
        per_device_eval_batch_size=4 * setup.batch_size,
        learning_rate=setup.lr,
        head_learning_rate=setup.head_lr,
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


def build_benchmark(cli: argparse.Namespace, seed: int) -> tuple[list, Setup]:
    """The task sequence and what the methods share: ``seed`` draws the offline benchmarks' images; ImageNet-R's
    split and class order are the recipe's (fixed seeds), as in the published protocol."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where accelerate puts the HyperLoRA trainer too
    if cli.benchmark == "imagenet_r":
        setup = Setup(lambda: (imagenet_r_backbone(cli), HyperLoraConfig(), None), **budget_of(cli), device=device)
        return imagenet_r_tasks(cli), setup
    return offline_tasks(cli.benchmark, seed), Setup(
        lambda: build_backbone("efficientnet"), **budget_of(cli), device=device
    )


def budget_of(cli: argparse.Namespace) -> dict:
    """The budget as accuracy.json records it (and Setup reads it)."""
    return {
        "epochs": cli.num_train_epochs,
        "batch_size": cli.per_device_train_batch_size,
        "lr": cli.learning_rate,
        "head_lr": cli.head_learning_rate,
    }


def imagenet_r_tasks(cli: argparse.Namespace) -> list:
    from common import DataArguments, load_tasks
    from imagenet_r import DEFAULTS

    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    data = DataArguments(
        **{key: value for key, value in DEFAULTS.items() if key in data_fields}
        | {"num_tasks": cli.num_tasks, "max_train_per_class": cli.max_train_per_class}
        | ({"dataset_name": cli.dataset_name} if cli.dataset_name else {})
        | {"cache_dir": cli.cache_dir}
    )
    return load_tasks(data)[0]


def imagenet_r_backbone(cli: argparse.Namespace) -> nn.Module:
    from common import ModelArguments

    return ModelArguments(
        model_name_or_path=cli.model_name_or_path, pretrained=cli.pretrained, model_kwargs=cli.model_kwargs
    ).create_model()


def offline_tasks(name: str, seed: int) -> list:
    if name == "quickstart":
        return build_tasks(seed)
    if name == "long":  # five MNIST pairs, then five pairs of sklearn digits: ten two-class tasks, two domains
        from sklearn.datasets import load_digits

        mnist = build_tasks(seed)[:5]
        digits = load_digits()
        images, labels = (digits.images * (255.0 / 16.0)).round(), digits.target
        rng = np.random.default_rng(seed + 1)
        pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
        return mnist + [
            _split(f"digits-{a}{b}", images[np.isin(labels, (a, b))], labels[np.isin(labels, (a, b))], rng, 250)
            for a, b in pairs
        ]
    raise SystemExit(f"unknown benchmark {name!r}: quickstart or long")


def method_metrics(method: str, result: dict) -> dict:
    """One run's row: task-IL metrics from its accuracy matrix, class-IL and router where the method has them."""
    matrix = np.array(result["accuracy_matrix"], dtype=float)
    if method == "joint":
        metrics = {key: None for key in METRIC_KEYS} | {"faa": float(matrix[-1].mean())}
    else:
        metrics = continual_metrics(matrix, baseline=result.get("fwt_baseline"))
    class_il = result.get("class_incremental")
    metrics.update(
        class_il_faa=class_il["faa"] if class_il else None,
        router_accuracy=class_il["router_task_accuracy"][-1] if class_il else None,
        train_s_per_task=float(np.mean(_timings(result))),
        bytes_per_task=result["bytes_per_task"],
        shared_bytes=result.get("shared_bytes", 0),
        accuracy_matrix=np.where(np.isnan(matrix), None, matrix).tolist(),
    )
    return metrics


def _timings(result: dict) -> list[float]:
    if "timings" in result:  # ContinualTrainer: H-embedding + training + evaluation per task
        return [sum(parts) for parts in zip(*result["timings"].values(), strict=True)]
    return result["train_s"]


def _cell(values, scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{scale * np.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


COLUMNS = [
    ("faa", "FAA"),
    ("daa", "DAA"),
    ("avg_incremental_accuracy", "A-bar"),
    ("forgetting", "forgetting"),
    ("bwt", "BWT"),
    ("fwt", "FWT"),
    ("class_il_faa", "class-IL FAA"),
    ("router_accuracy", "router task-id acc."),
]


def this_machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(out: Path, benchmark: str, runs: dict[str, list[dict]], budget: dict, machine: str) -> str:
    """Rewrite accuracy.json, .md and .png from the runs so far: a cut-off sweep keeps what it measured."""
    summary = {
        "benchmark": benchmark,
        "budget": budget,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "runs": runs,
    }
    atomic_write_json(out / "accuracy.json", summary)
    seeds = sorted({r["seed"] for results in runs.values() for r in results})
    lines = [
        f"# {benchmark}: accuracy (%, mean ± std over seeds {seeds})",
        "",
        f"Machine: {machine}; {summary['date']}. Command: `python benchmarks/accuracy.py --benchmark {benchmark} "
        f"--seeds {' '.join(map(str, seeds))} --methods {' '.join(runs)}`. Task-incremental unless marked class-IL.",
        "",
        "| method | seeds | "
        + " | ".join(title for _, title in COLUMNS)
        + " | s / task | bytes per task | bytes shared |",
        "|---|---|" + "---|" * (len(COLUMNS) + 3),
    ]
    for method, results in runs.items():
        if not results:
            continue
        cells = [_cell([r[key] for r in results]) for key, _ in COLUMNS]
        wall = _cell([r["train_s_per_task"] for r in results], scale=1.0, digits=0)
        lines.append(
            f"| {method} | {len(results)} | {' | '.join(cells)} | {wall} | {results[0]['bytes_per_task']:,} | "
            f"{results[0]['shared_bytes']:,} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "accuracy.md", text)
    _plot(out / "accuracy.png", benchmark, runs)
    return text


def _plot(path: Path, benchmark: str, runs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, results in runs.items() if results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(methods) + 1.6), sharey=True)
    panels = [("faa", "final average accuracy (%)"), ("forgetting", "forgetting (%)")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        means, stds = [], []
        for m in methods:
            values = [r[key] for r in runs[m] if r[key] is not None]
            means.append(100 * np.mean(values) if values else np.nan)
            stds.append(100 * np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.barh(
            methods, means, xerr=stds, color=["C7" if m.startswith("lora_") or m == "joint" else "C0" for m in methods]
        )
        ax.set_xlabel(title)
        ax.invert_yaxis()
    axes[0].set_xlim(left=max(0.0, np.nanmin([100 * np.mean([r["faa"] for r in runs[m]]) for m in methods]) - 10))
    fig.suptitle(f"{benchmark}: mean ± std over seeds")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    Path(tmp.name).replace(path)


def run_method(method: str, tasks, seed: int, setup: Setup, ewc_strength: float) -> dict:
    if method in ABLATIONS:
        with tempfile.TemporaryDirectory(prefix=f"{method}-seed{seed}-") as tmp:
            return run_hyperlora(tasks, seed, Path(tmp), ABLATIONS[method], setup)
    if method in ("lora_per_task", "lora_sequential", "lora_ewc"):
        return run_lora(tasks, seed, method.removeprefix("lora_"), setup, ewc_strength=ewc_strength)
    if method == "joint":
        return run_joint(tasks, seed, setup)
    raise SystemExit(f"unknown method {method!r}")


METHODS = [*ABLATIONS, "lora_per_task", "lora_sequential", "lora_ewc", "joint"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--benchmark", choices=["quickstart", "long", "imagenet_r"], default="quickstart")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ewc_strength", type=float, default=1e4)
    budget = parser.add_argument_group("the budget every method gets")
    budget.add_argument("--num_train_epochs", "--epochs", type=int, default=2, help="epochs per task")
    budget.add_argument("--per_device_train_batch_size", "--batch_size", type=int, default=32, help="batch size")
    budget.add_argument("--learning_rate", "--lr", type=float, default=1e-3, help="adapter / hypernetwork")
    budget.add_argument("--head_learning_rate", "--head_lr", type=float, default=1e-2, help="the task heads")
    imagenet_r = parser.add_argument_group("--benchmark imagenet_r (recipes/imagenet_r.py's protocol)")
    imagenet_r.add_argument(
        "--dataset_name", "--data_path", default=None, help="a Hub id or a local image folder; None: the recipe's"
    )
    imagenet_r.add_argument("--cache_dir", default=None, help="where datasets caches; None: HF_HOME's")
    imagenet_r.add_argument("--num_tasks", type=int, default=10)
    imagenet_r.add_argument("--max_train_per_class", type=int, default=None)
    imagenet_r.add_argument(
        "--model_name_or_path", "--model", default="vit_base_patch16_224.augreg_in21k", help="a timm model name"
    )
    imagenet_r.add_argument("--pretrained", action="store_true", default=True, help="its pretrained weights")
    imagenet_r.add_argument("--model_kwargs", default=None, help="extra timm.create_model arguments as JSON")
    parser.add_argument("--output_dir", default=None, help="None: benchmarks/results/accuracy/<benchmark>")
    parser.add_argument("--append", action="store_true", help="add to the runs already in accuracy.json")
    parser.add_argument(
        "--merge", nargs="+", help="only combine these accuracy.json files (runs made apart) into one report"
    )
    return parse(parser, argv)


def main(argv=None) -> None:
    cli = parse_args(argv)
    out = Path(cli.output_dir or Path(__file__).parent / "results" / "accuracy" / cli.benchmark)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {}
    budget = budget_of(cli)
    machines = [] if cli.merge else [this_machine()]
    sources = list(cli.merge or []) + (
        [out / "accuracy.json"] if cli.append and (out / "accuracy.json").exists() else []
    )
    for source in sources:
        previous = json.loads(Path(source).read_text())
        if previous["benchmark"] != cli.benchmark:
            raise SystemExit(f"{source} holds {previous['benchmark']!r}, not {cli.benchmark!r}")
        if previous["budget"] != budget:
            raise SystemExit(f"{source} was run with the budget {previous['budget']}, not {budget}")
        machines += [m for m in previous["machine"].split("; ") if m not in machines]
        for method, results in previous["runs"].items():
            seeds = {r["seed"] for r in results}
            runs[method] = [r for r in runs.get(method, []) if r["seed"] not in seeds] + results
    if cli.merge:
        runs = {m: sorted(r, key=lambda x: x["seed"]) for m, r in runs.items()}
        print(write_report(out, cli.benchmark, runs, budget, "; ".join(machines)))
        return
    for seed in cli.seeds:
        tasks, setup = build_benchmark(cli, seed)
        for method in cli.methods:
            start = time.perf_counter()
            metrics = method_metrics(method, run_method(method, tasks, seed, setup, cli.ewc_strength))
            metrics.update(seed=seed, wall_s=time.perf_counter() - start)
            if method == "lora_ewc":
                metrics["ewc_strength"] = cli.ewc_strength
            runs[method] = [r for r in runs.get(method, []) if r["seed"] != seed] + [metrics]
            write_report(out, cli.benchmark, runs, budget, "; ".join(machines))
            print(
                f"{method:16s} seed {seed}: FAA {100 * metrics['faa']:.2f}  forgetting "
                f"{100 * (metrics['forgetting'] or 0):.2f}  ({metrics['wall_s']:.0f} s)",
                flush=True,
            )
    print(write_report(out, cli.benchmark, runs, budget, "; ".join(machines)))


if __name__ == "__main__":
    main()
