"""Accuracy of HyperLoRA against its ablations, PEFT-LoRA baselines and closed-form classifiers on the frozen
backbone, side by side on the same backbone, data, budget and seeds.

Methods (``--methods``):
- ``hyperlora``: the full method (hyperlora.trainer.ContinualTrainer);
- ablations, each one HyperLoraConfig switch: ``no_guidance`` (normalisation "none": learned, randomly initialised
  task embeddings, no H-embedding), ``minmax`` (min-max instead of AHP), ``random_init`` (task embeddings start at
  random, guidance kept), ``no_projection`` (head updates not projected away from old tasks), ``no_regulariser``
  (beta_reg 0), ``no_emb_loss`` (beta_emb 0: the H-embedding start without the guidance loss), ``shared_trunk`` (a
  task that inherits trains the hypernetwork's trunk too, instead of its free part alone); variants, ``free_pace``
  (every task's free part at a LoRA's pace, not only an inheriting one's) and ``inherit_related`` (start among
  every related old task, not only near the top-ranked one);
- ``lora_per_task``: one independent PEFT LoRA adapter and head per task (task-incremental ceiling, T adapters);
- ``lora_sequential``: one PEFT LoRA adapter fine-tuned through all tasks, a head per task (the forgetting floor);
- ``lora_ewc``: the same, with online EWC (diagonal empirical Fisher) on the adapter's parameters;
- ``joint``: one PEFT LoRA adapter and one head over every class, trained on all tasks at once (the upper bound;
  class-incremental over all classes, task-incremental with the logits of each task's own classes);
- ``frozen``: closed-form classifiers on the frozen backbone's features (hyperlora.evaluation.baselines), reported as
  four
  rows: ``frozen_probe`` (a logistic regression per task, task-incremental), ``frozen_ncm`` (SimpleCIL's cosine
  nearest class mean), ``frozen_lda`` (shared-covariance LDA over all seen classes) and ``frozen_ranpac`` (LDA on a
  random ReLU projection to ``--ranpac_dim`` dimensions), class-incremental. A method that does not beat these has
  shown nothing.

Benchmarks (``--benchmark``): ``structured`` (default), hyperlora.structured's sequence of ``--num_tasks`` (5, 10 or
20) shape tasks with headroom and known relations on EfficientNet-Lite0 at 64 px, the README quickstart's sequence
(5 tasks); ``imagenet_r``, the protocol of recipes/imagenet_r.py (200 classes in ``--num_tasks`` tasks, the seeded
80/20 split, class order seed 1993) on a timm ViT (ViT-B/16 in21k by default; ``--dataset_name`` a Hub id or a local
image folder), on a GPU when there is one. Every method reads the same budget (``--num_train_epochs``,
``--per_device_train_batch_size``, ``--learning_rate``, ``--head_learning_rate``; HyperLoRA's task embedding also
``--embedding_learning_rate``) and targets the same modules (HyperLoRA's, for PEFT LoRA too). Arguments follow
hyperlora.cli (``--config file.yaml``; the old ``--epochs``, ``--batch_size``, ``--lr``, ``--head_lr``, ``--model``
and ``--data_path`` still work).

    python benchmarks/accuracy.py --seeds 0 1 2
    python benchmarks/accuracy.py --num_tasks 20 --methods hyperlora lora_per_task lora_sequential frozen
    python benchmarks/accuracy.py --benchmark imagenet_r --dataset_name /data/imagenet-r --num_train_epochs 20 \\
        --per_device_train_batch_size 64

Writes accuracy.json, accuracy.md (mean and std over seeds; the headroom, joint minus frozen LDA) and accuracy.png
under the output directory, and for the structured sequence its relation matrix (relations.json); with ``--append``
the runs are added to those already in accuracy.json (same benchmark), so methods can be run apart, and ``--merge``
combines runs made in separate processes. Every structured report also refreshes lengths.md in the folder above it:
HyperLoRA, per-task and sequential LoRA and the frozen baselines at each number of tasks run into that folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import re
import runpy
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from hyperlora import HyperLoraConfig
from hyperlora.cli import parse
from hyperlora.data import TaskImages, image_spec, pooled_features
from hyperlora.demo import build_backbone
from hyperlora.evaluation.baselines import CLASS_INCREMENTAL, FrozenBaselines
from hyperlora.evaluation.metrics import METRIC_KEYS, continual_metrics
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.optim import cosine_schedule
from hyperlora.structured import SEQUENCES, relation_matrix, sequence, structured_tasks
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments
from hyperlora.training.step import train_mode
from hyperlora.tuner.model import default_target_modules


@dataclass(frozen=True)
class Setup:
    """What every method shares: a backbone factory (a fresh pretrained copy per call, with HyperLoRA's config and
    the input size), the training budget and the device."""

    backbone: Callable[[], tuple[nn.Module, HyperLoraConfig, int | None]]
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float = 1e-2
    embedding_lr: float | None = None  # the new task embedding's (None: lr)
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


def _train_lora_task(
    model, head: nn.Linear, task, spec, setup: Setup, seed: int, penalty=None, curve_points: int = 0
) -> list[list[float]]:
    """The same budget and optimiser as the HyperLoRA trainer: AdamW, cosine schedule, grad-norm clip 1. Returns the
    learning curve at ``curve_points`` evenly spaced steps, as the trainer's ``eval_curve_points``."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = _loader(task, "train", spec, setup, shuffle=True, seed=seed)

    def loss_fn(features, labels, _task_ids):
        return F.cross_entropy(head(features), labels)

    total = setup.epochs * len(loader)
    at = {math.ceil(total * k / curve_points) for k in range(1, curve_points + 1)} if curve_points else set()
    curve = []
    for step in _fit_steps(model, [head], params, loader, loss_fn, setup, penalty):
        if step in at:
            test = _loader(task, "test", spec, setup, shuffle=False, seed=0)
            curve.append([step, _accuracy(model, head, test, setup.device)])
            train_mode(model)
    return curve


def _fit(model, heads, params, loader, loss_fn, setup: Setup, penalty=None) -> None:
    for _ in _fit_steps(model, heads, params, loader, loss_fn, setup, penalty):
        pass


def _fit_steps(model, heads, params, loader, loss_fn, setup: Setup, penalty=None) -> Iterator[int]:
    """``_fit`` one step at a time: yields the number of steps taken after each (a benchmark can pause it)."""
    head_params = [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": setup.lr}, {"params": head_params, "lr": setup.head_lr}], weight_decay=0.0, fused=True
    )
    total = setup.epochs * len(loader)
    scheduler = cosine_schedule(optimizer, total)
    train_mode(model)
    steps = 0
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
            steps += 1
            yield steps
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


@torch.no_grad()
@torch.no_grad()
def _accuracy(model, head, loader, device: str) -> float:
    hits = n = 0
    for pixel_values, labels in loader:
        logits = head(pooled_features(model(pixel_values.to(device))))
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


def run_lora(tasks, seed: int, mode: str, setup: Setup, ewc_strength: float = 0.0, curve_points: int = 0) -> dict:
    """Accuracy matrix of per-task, sequential or EWC LoRA; per-task adapters never change once trained."""
    num_tasks = len(tasks)
    R = np.full((num_tasks, num_tasks), np.nan)
    heads, adapters, times, curves = [], [], [], []
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
        penalty = ewc.penalty if ewc else None
        curves.append(_train_lora_task(model, head, task, spec, setup, seed + t, penalty, curve_points))
        if ewc is not None:
            ewc.consolidate(model, head, task, spec, setup)
        head.requires_grad_(False)
        heads.append(head)
        times.append(time.perf_counter() - start)
        for j in range(t + 1):
            test = _loader(tasks[j], "test", spec, setup, shuffle=False, seed=0)
            R[t, j] = _accuracy(adapters[j] if mode == "per_task" else model, heads[j], test, setup.device)
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    return {
        "accuracy_matrix": R,
        "learning_curves": curves if curve_points else None,
        "train_s": times,
        "bytes_per_task": head_bytes(tasks, width) + (lora_bytes if mode == "per_task" else 0),
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
    """One LoRA adapter and one head over every class, trained on all tasks' data at once for the same number of
    epochs: the upper bound a continual learner approaches. Class-incremental accuracy is over all classes;
    task-incremental accuracy reads only the task's own classes' logits. Only the final row of the accuracy matrix
    exists."""
    torch.manual_seed(seed)
    backbone, config, spec, width = setup.build()
    model = _lora(backbone, config, setup.device)
    offsets = np.cumsum([0] + [task.num_classes for task in tasks])
    head = nn.Linear(width, int(offsets[-1])).to(setup.device)
    union = torch.utils.data.ConcatDataset(
        [_Tagged(TaskImages(task.train, spec.transform(), task.classes), t) for t, task in enumerate(tasks)]
    )
    loader = torch.utils.data.DataLoader(
        union, batch_size=setup.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    shift = torch.as_tensor(offsets[:-1], device=setup.device)

    def loss_fn(features, labels, task_ids):
        return F.cross_entropy(head(features), labels + shift[task_ids])

    start = time.perf_counter()
    _fit(model, [head], [p for p in model.parameters() if p.requires_grad], loader, loss_fn, setup)
    R = np.full((len(tasks), len(tasks)), np.nan)
    correct = total = 0
    with torch.no_grad():
        for j, task in enumerate(tasks):
            hits_task = hits_all = n = 0
            for pixel_values, labels in _loader(task, "test", spec, setup, shuffle=False, seed=0):
                logits = head(pooled_features(model(pixel_values.to(setup.device)))).cpu()
                hits_all += (logits.argmax(-1) == labels + offsets[j]).sum().item()
                hits_task += (logits[:, offsets[j] : offsets[j + 1]].argmax(-1) == labels).sum().item()
                n += labels.numel()
            R[-1, j] = hits_task / n
            correct, total = correct + hits_all, total + n
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    return {
        "accuracy_matrix": R,
        "class_incremental": {"final_accuracy": correct / total},
        "train_s": [time.perf_counter() - start],
        "bytes_per_task": 0,
        "shared_bytes": lora_bytes,
    }


@torch.no_grad()
def _frozen_features(backbone, task, split: str, spec, setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for pixel_values, local in _loader(task, split, spec, setup, shuffle=False, seed=0):
        features.append(pooled_features(backbone(pixel_values.to(setup.device))).double().cpu())
        labels.append(torch.as_tensor(task.classes)[local])
    return torch.cat(features), torch.cat(labels)


def run_frozen(tasks, seed: int, setup: Setup, ranpac_dim: int) -> dict[str, dict]:
    """The frozen-feature classifiers, fitted task after task like the continual learners
    (hyperlora.evaluation.baselines): one result per classifier, on exactly the features every other method starts
    from."""
    backbone, _, spec, width = setup.build()
    start = time.perf_counter()
    baselines = FrozenBaselines(width, shrinkage=0.1, ranpac_dim=ranpac_dim, seed=seed)
    num_tasks = len(tasks)
    probe = np.full((num_tasks, num_tasks), np.nan)
    seen = {name: [] for name in CLASS_INCREMENTAL}
    tests = []
    for t, task in enumerate(tasks):
        baselines.add_task(t, *_frozen_features(backbone, task, "train", spec, setup))
        tests.append(_frozen_features(backbone, task, "test", spec, setup))
        accuracy = (baselines.probe_predict(t, tests[t][0]) == tests[t][1]).double().mean().item()
        probe[t:, t] = accuracy  # a probe never changes once fitted
        features, labels = torch.cat([f for f, _ in tests]), torch.cat([y for _, y in tests])
        for name, predicted in baselines.predict(features).items():
            seen[name].append((predicted == labels).double().mean().item())
    wall = time.perf_counter() - start
    results = {
        "frozen_probe": {
            "accuracy_matrix": probe,
            "train_s": [wall / num_tasks],
            "bytes_per_task": head_bytes(tasks, width),
        }
    }
    for name, accuracies in seen.items():
        results[f"frozen_{name}"] = {
            "accuracy_matrix": None,
            "class_incremental": {"final_accuracy": accuracies[-1], "seen_class_accuracy": accuracies},
            "train_s": [wall / num_tasks],
            "bytes_per_task": 0,
        }
    return results


ABLATIONS = {
    "hyperlora": {},
    "no_guidance": {"normalisation": "none"},
    "minmax": {"normalisation": "minmax"},
    "random_init": {"embedding_init": "random"},
    "no_projection": {"head_projection": False},
    "no_regulariser": {"beta_reg": 0.0},
    "no_emb_loss": {"beta_emb_slope": 0.0},  # the H-embedding start without the guidance loss: does L_emb act?
    "free_pace": {"free_pace": True},
    "shared_trunk": {"inherit_in_free_part": False},  # a task that inherits trains the trunk too
    "inherit_related": {"inherit_from": "related"},  # start among every related old task, not the top-ranked one
}


def run_hyperlora(tasks, seed: int, output_dir: Path, overrides: dict, setup: Setup, curve_points: int = 0) -> dict:
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
        embedding_learning_rate=setup.embedding_lr,
        seed=seed,
        image_size=size,
        plots=False,
        eval_curve_points=curve_points,
    )
    trainer = ContinualTrainer(backbone, config, args)
    results = trainer.fit(tasks)
    width = trainer.heads[0].in_features
    results["bytes_per_task"] = config.task_embedding_dim * 4 + head_bytes(tasks, width)
    results["shared_bytes"] = hypernet_bytes(trainer.model)
    return results


def head_bytes(tasks, width: int) -> int:
    """What a task's own linear head (weights and bias, float32) stores, averaged over the tasks: part of every
    task-incremental method's cost per task."""
    return sum(4 * (width + 1) * task.num_classes for task in tasks) // len(tasks)


def hypernet_bytes(model) -> int:
    """What HyperLoRA stores once for all tasks: the hypernetwork without its task embeddings, in float32."""
    hypernet = model.base_model.hypernet
    return 4 * sum(p.numel() for n, p in hypernet.named_parameters() if not n.startswith("task_embeddings"))


def build_benchmark(cli: argparse.Namespace, seed: int) -> tuple[list, Setup]:
    """The task sequence and what the methods share: ``seed`` draws the structured sequence's images; ImageNet-R's
    split and class order are the recipe's (fixed seeds), as in the published protocol."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where accelerate puts the HyperLoRA trainer too
    if cli.benchmark == "imagenet_r":
        setup = Setup(lambda: (imagenet_r_backbone(cli), HyperLoraConfig(), None), **budget_of(cli), device=device)
        return imagenet_r_tasks(cli), setup
    tasks = structured_tasks(
        cli.num_tasks,
        seed=seed,
        train_per_class=cli.train_per_class,
        test_per_class=cli.test_per_class,
        later_train_per_class=cli.later_train_per_class,
        kind=cli.sequence,
        validation_per_class=cli.test_per_class if cli.evaluate_on == "validation" else 0,
    )
    if cli.evaluate_on == "validation":  # choosing a setting: every method reads validation images, never the test's
        tasks = [dataclasses.replace(task, test=task.validation, validation=None) for task in tasks]
    return tasks, Setup(lambda: build_backbone("efficientnet"), **budget_of(cli), device=device)


def budget_of(cli: argparse.Namespace) -> dict:
    """The budget as accuracy.json records it (and Setup reads it)."""
    return {
        "epochs": cli.num_train_epochs,
        "batch_size": cli.per_device_train_batch_size,
        "lr": cli.learning_rate,
        "head_lr": cli.head_learning_rate,
        # only when set, so that runs from before the option merge with runs that leave it at its default
        **({"embedding_lr": cli.embedding_learning_rate} if cli.embedding_learning_rate is not None else {}),
    }


def data_of(cli: argparse.Namespace) -> dict:
    """What else two runs must share to be merged: the structured sequence's kind and size (the kind and the later
    tasks' size only where they are not the conflict sequence and the first task's size, as in every run before
    those options)."""
    kind = {} if cli.sequence == "conflict" else {"sequence": cli.sequence}
    later = {} if cli.later_train_per_class is None else {"later_train_per_class": cli.later_train_per_class}
    evaluated = {} if cli.evaluate_on == "test" else {"evaluate_on": cli.evaluate_on}
    return kind | {"train_per_class": cli.train_per_class, "test_per_class": cli.test_per_class} | later | evaluated


def imagenet_r_tasks(cli: argparse.Namespace) -> list:
    from hyperlora.training.recipe import DataArguments, load_tasks

    DEFAULTS = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "imagenet_r.py"))["DEFAULTS"]

    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    data = DataArguments(
        **{key: value for key, value in DEFAULTS.items() if key in data_fields}
        | {"num_tasks": cli.num_tasks, "max_train_per_class": cli.max_train_per_class}
        | ({"dataset_name": cli.dataset_name} if cli.dataset_name else {})
        | {"cache_dir": cli.cache_dir}
    )
    return load_tasks(data)[0]


def imagenet_r_backbone(cli: argparse.Namespace) -> nn.Module:
    from hyperlora.training.recipe import ModelArguments

    return ModelArguments(
        model_name_or_path=cli.model_name_or_path, pretrained=cli.pretrained, model_kwargs=cli.model_kwargs
    ).create_model()


def method_metrics(method: str, result: dict) -> dict:
    """One run's row: task-IL metrics from its accuracy matrix (where the method has task heads), the accuracy over
    every seen class's test images (class-IL) and the router's task-id accuracy where the method has them."""
    matrix = None if result["accuracy_matrix"] is None else np.array(result["accuracy_matrix"], dtype=float)
    if matrix is None:
        metrics = dict.fromkeys(METRIC_KEYS)
    elif method == "joint":
        metrics = dict.fromkeys(METRIC_KEYS) | {"faa": float(matrix[-1].mean())}
    else:
        metrics = continual_metrics(matrix, baseline=result.get("fwt_baseline"), start=result.get("fwt_start"))
    class_il = result.get("class_incremental")
    routed = class_il.get("router_task_accuracy") if class_il else None
    metrics.update(
        class_il_faa=class_il["final_accuracy"] if class_il else None,
        router_accuracy=routed[-1] if routed else None,
        train_s_per_task=float(np.mean(_timings(result))),
        bytes_per_task=result["bytes_per_task"],
        shared_bytes=result.get("shared_bytes", 0),
        accuracy_matrix=None if matrix is None else np.where(np.isnan(matrix), None, matrix).tolist(),
    )
    if result.get("learning_curves"):
        metrics["steps_to_95"] = steps_to_95(result["learning_curves"])
    if any(result.get("guidance") or []):  # per task [step, L_emb, norm of its gradient]: does the guidance act?
        metrics["guidance"] = result["guidance"]
    beats = result.get("h_score_beats_reference")
    if beats is not None and np.isfinite(np.array(beats, dtype=float)).any():  # which old tasks counted as related
        metrics["h_score_beats_reference"] = beats
        metrics["h_score_related"] = result.get("h_score_related")
    if "frozen_baselines" in result:  # the trainer's own frozen probe and LDA, on the same run's features
        metrics["frozen_baselines"] = {k: v for k, v in result["frozen_baselines"].items() if not k.endswith("task")}
    return metrics


def steps_to_95(curves: list[list[list[float]]]) -> float | None:
    """How fast later tasks learn: the training step at which a task (after the first) first reaches 95% of its
    final test accuracy, averaged over those tasks (learning curves from ``--eval_curve_points``: a resolution of
    the task's steps / points)."""
    steps = []
    for curve in curves[1:]:
        if curve:
            final = curve[-1][1]
            steps.append(next(step for step, accuracy in curve if accuracy >= 0.95 * final))
    return float(np.mean(steps)) if steps else None


def _timings(result: dict) -> list[float]:
    if "timings" in result:  # ContinualTrainer: frozen features + H-embedding + training + evaluation per task
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
    ("steps_to_95", "steps to 95% (later tasks)"),
]
CELL_SCALE = {"steps_to_95": (1.0, 0)}  # (scale, digits) where a column is not a share shown in %


def this_machine() -> str:
    """The machine and the code a run was made with (merged reports list every distinct one)."""
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, torch {torch.__version__}{gpu}, code {code_version()}"


def code_version() -> str:
    """The checkout's commit, with "+changes" when files differ from it ("unknown" outside a git checkout)."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, cwd=here)
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def headroom(runs: dict[str, list[dict]]) -> str | None:
    """What the sequence leaves to fine-tuning: joint training's class-IL accuracy minus the frozen LDA's."""
    joint, lda = _mean(runs.get("joint", []), "class_il_faa"), _mean(runs.get("frozen_lda", []), "class_il_faa")
    if joint is None or lda is None:
        return None
    return (
        f"Headroom: joint fine-tuning reaches {100 * joint:.2f}% over all classes, the frozen LDA {100 * lda:.2f}%: "
        f"{100 * (joint - lda):+.2f} points."
    )


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
    methods = [m for m in ROWS if runs.get(m)] + [m for m in runs if m not in ROWS and runs[m]]
    lines = [
        f"# {benchmark}: accuracy (%, mean ± std over seeds {seeds})",
        "",
        f"Machine: {machine}; {summary['date']}. Command: `python benchmarks/accuracy.py --benchmark "
        f"{benchmark.split('-')[0]} {_task_flag(benchmark)}{_data_flags(budget)}--seeds {' '.join(map(str, seeds))}`. "
        f"Budget: {budget}. "
        "Task-incremental unless marked class-IL; class-IL FAA is the accuracy over every class's test images.",
        "",
        "| method | seeds | "
        + " | ".join(title for _, title in COLUMNS)
        + " | s / task | bytes per task | bytes shared |",
        "|---|---|" + "---|" * (len(COLUMNS) + 3),
    ]
    for method in methods:
        results = runs[method]
        cells = [_cell([r.get(key) for r in results], *CELL_SCALE.get(key, ())) for key, _ in COLUMNS]
        wall = _cell([r["train_s_per_task"] for r in results], scale=1.0, digits=0)
        lines.append(
            f"| {method} | {len(results)} | {' | '.join(cells)} | {wall} | {results[0]['bytes_per_task']:,} | "
            f"{results[0]['shared_bytes']:,} |"
        )
    if (line := headroom(runs)) is not None:
        lines += ["", line]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "accuracy.md", text)
    _plot(out / "accuracy.png", benchmark, {m: runs[m] for m in methods})
    return text


def _data_flags(budget: dict) -> str:
    """The structured options a run was made with where they are not the defaults (``data_of``)."""
    keys = ("sequence", "later_train_per_class", "evaluate_on")
    return "".join(f"--{key} {budget[key]} " for key in keys if key in budget)


def _task_flag(benchmark: str) -> str:
    return f"--num_tasks {benchmark.split('-')[1]} " if "-" in benchmark else ""


LENGTH_METHODS = ("hyperlora", "lora_per_task", "lora_sequential", "frozen_probe", "frozen_lda", "frozen_ranpac")


def write_lengths_table(root: Path) -> str | None:
    """HyperLoRA, per-task and sequential LoRA and the frozen baselines at every number of structured tasks measured
    so far (structured-N/accuracy.json; variants such as structured-5-embedding-lr are not lengths): does HyperLoRA's
    advantage grow with the number of tasks?"""
    paths = [
        path for path in root.glob("structured-*/accuracy.json") if re.fullmatch(r"structured-\d+", path.parent.name)
    ]
    reports = sorted(
        (json.loads(path.read_text()) for path in paths),
        key=lambda report: int(report["benchmark"].split("-")[1]),
    )
    if not reports:
        return None
    lines = [
        "# The structured sequence at every length: FAA (task-IL) / accuracy over all classes (class-IL), %",
        "",
        "| tasks | seeds | budget per task | " + " | ".join(LENGTH_METHODS) + " |",
        "|---|---|---|" + "---|" * len(LENGTH_METHODS),
    ]
    for report in reports:
        runs = report["runs"]
        seeds = sorted({r["seed"] for results in runs.values() for r in results})
        cells = []
        for method in LENGTH_METHODS:
            results = runs.get(method, [])
            til, cil = _mean(results, "faa"), _mean(results, "class_il_faa")
            cells.append(" / ".join("-" if v is None else f"{100 * v:.2f}" for v in (til, cil)))
        budget = report["budget"]
        per_task = f"{budget['epochs']} epochs x {budget.get('train_per_class', '-')} images per class"
        lines.append(f"| {report['benchmark'].split('-')[1]} | {seeds} | {per_task} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(root / "lengths.md", text)
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
        ax.barh(methods, means, xerr=stds, color=[_colour(m) for m in methods])
        ax.set_xlabel(title)
        ax.invert_yaxis()
    lowest = [100 * v for m in methods if (v := _mean(runs[m], "faa")) is not None]
    axes[0].set_xlim(left=max(0.0, min(lowest) - 10) if lowest else 0.0)
    fig.suptitle(f"{benchmark}: mean ± std over seeds")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    Path(tmp.name).replace(path)


def _colour(method: str) -> str:
    """HyperLoRA and its ablations in blue, the other trained baselines in grey, the frozen ones in orange."""
    if method.startswith("frozen_"):
        return "C1"
    return "C7" if method.startswith("lora_") or method == "joint" else "C0"


def run_method(method: str, tasks, seed: int, setup: Setup, cli: argparse.Namespace) -> dict[str, dict]:
    """The results of one method (several rows for ``frozen``), by row name."""
    if method in ABLATIONS:
        with tempfile.TemporaryDirectory(prefix=f"{method}-seed{seed}-") as tmp:
            overrides = ABLATIONS[method]
            return {method: run_hyperlora(tasks, seed, Path(tmp), overrides, setup, cli.eval_curve_points)}
    if method in ("lora_per_task", "lora_sequential", "lora_ewc"):
        mode = method.removeprefix("lora_")
        return {method: run_lora(tasks, seed, mode, setup, cli.ewc_strength, cli.eval_curve_points)}
    if method == "joint":
        return {method: run_joint(tasks, seed, setup)}
    if method == "frozen":
        return run_frozen(tasks, seed, setup, cli.ranpac_dim)
    raise SystemExit(f"unknown method {method!r}")


METHODS = [*ABLATIONS, "lora_per_task", "lora_sequential", "lora_ewc", "joint", "frozen"]
# Report rows, in table order: ``frozen`` gives four.
ROWS = [*METHODS[:-1], *(f"frozen_{name}" for name in ("probe", *CLASS_INCREMENTAL))]
DEFAULT_TASKS = {"structured": 5, "imagenet_r": 10}


# Per benchmark: the budget a method gets unless the command line says otherwise. The structured sequence's learning
# rate is where one PEFT LoRA per task, the task-incremental ceiling, does best: FAA 84.2 / 90.8 / 75.7 (diverged on
# a task) at 1e-3 / 2e-3 / 4e-3 (seed 0).
BUDGETS = {
    "structured": {"num_train_epochs": 8, "learning_rate": 2e-3},
    "imagenet_r": {"num_train_epochs": 2, "learning_rate": 1e-3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--benchmark", choices=list(DEFAULT_TASKS), default="structured")
    parser.add_argument("--num_tasks", type=int, default=None, help="None: 5 (structured), 10 (imagenet_r)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ewc_strength", type=float, default=1e4)
    parser.add_argument("--ranpac_dim", type=int, default=5000, help="frozen_ranpac's random projection width")
    parser.add_argument(
        "--eval_curve_points", type=int, default=0, help="test evaluations during each HyperLoRA task: steps to 95%%"
    )
    budget = parser.add_argument_group("the budget every method gets (None: the benchmark's, see BUDGETS)")
    budget.add_argument("--num_train_epochs", "--epochs", type=int, default=None, help="epochs per task")
    budget.add_argument("--per_device_train_batch_size", "--batch_size", type=int, default=32, help="batch size")
    budget.add_argument("--learning_rate", "--lr", type=float, default=None, help="adapter / hypernetwork")
    budget.add_argument("--head_learning_rate", "--head_lr", type=float, default=1e-2, help="the task heads")
    budget.add_argument(
        "--embedding_learning_rate", type=float, default=None, help="HyperLoRA's new task embedding (None: lr)"
    )
    structured = parser.add_argument_group("--benchmark structured (hyperlora.structured)")
    structured.add_argument(
        "--sequence",
        choices=SEQUENCES,
        default="conflict",
        help="which structured sequence (hyperlora.structured.SEQUENCES); conflict: the committed tables'",
    )
    structured.add_argument("--train_per_class", type=int, default=200, help="training images per class")
    structured.add_argument(
        "--later_train_per_class", type=int, default=None, help="each task's after the first (None: the same)"
    )
    structured.add_argument("--test_per_class", type=int, default=100, help="test images per class")
    structured.add_argument(
        "--evaluate_on",
        choices=["test", "validation"],
        default="test",
        help="validation: report on a validation split of --test_per_class images per class instead (to choose "
        "settings; the test images are never read)",
    )
    imagenet_r = parser.add_argument_group("--benchmark imagenet_r (recipes/imagenet_r.py's protocol)")
    imagenet_r.add_argument(
        "--dataset_name", "--data_path", default=None, help="a Hub id or a local image folder; None: the recipe's"
    )
    imagenet_r.add_argument("--cache_dir", default=None, help="where datasets caches; None: HF_HOME's")
    imagenet_r.add_argument("--max_train_per_class", type=int, default=None)
    imagenet_r.add_argument(
        "--model_name_or_path", "--model", default="vit_base_patch16_224.augreg_in21k", help="a timm model name"
    )
    imagenet_r.add_argument("--pretrained", action="store_true", default=True, help="its pretrained weights")
    imagenet_r.add_argument("--model_kwargs", default=None, help="extra timm.create_model arguments as JSON")
    parser.add_argument("--output_dir", default=None, help="None: benchmarks/results/accuracy/<benchmark>-<tasks>")
    parser.add_argument("--append", action="store_true", help="add to the runs already in accuracy.json")
    parser.add_argument(
        "--merge", nargs="+", help="only combine these accuracy.json files (runs made apart) into one report"
    )
    cli = parse(parser, argv)
    cli.num_tasks = cli.num_tasks or DEFAULT_TASKS[cli.benchmark]
    for key, value in BUDGETS[cli.benchmark].items():
        if getattr(cli, key) is None:
            setattr(cli, key, value)
    return cli


def main(argv=None) -> None:
    cli = parse_args(argv)
    name = f"{cli.benchmark}-{cli.num_tasks}"
    folder = name if cli.benchmark != "structured" or cli.sequence == "conflict" else f"{name}-{cli.sequence}"
    out = Path(cli.output_dir or Path(__file__).parent / "results" / "accuracy" / folder)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {}
    budget = budget_of(cli) | (data_of(cli) if cli.benchmark == "structured" else {})
    machines = [] if cli.merge else [this_machine()]
    sources = list(cli.merge or []) + (
        [out / "accuracy.json"] if cli.append and (out / "accuracy.json").exists() else []
    )
    for source in sources:
        previous = json.loads(Path(source).read_text())
        if previous["benchmark"] != name:
            raise SystemExit(f"{source} holds {previous['benchmark']!r}, not {name!r}")
        if previous["budget"] != budget:
            raise SystemExit(f"{source} was run with the budget {previous['budget']}, not {budget}")
        machines += [m for m in previous["machine"].split("; ") if m not in machines]
        for method, results in previous["runs"].items():
            seeds = {r["seed"] for r in results}
            runs[method] = [r for r in runs.get(method, []) if r["seed"] not in seeds] + results
    if cli.benchmark == "structured":  # the known relations, for relations.py and for the reader
        specs = sequence(cli.num_tasks, kind=cli.sequence)
        relations = {"tasks": [spec.name for spec in specs], "relation": relation_matrix(specs).tolist()}
        atomic_write_json(out / "relations.json", relations)

    def report() -> str:
        text = write_report(out, name, runs, budget, "; ".join(machines))
        if cli.benchmark == "structured":  # beside the other lengths run into the same folder
            write_lengths_table(out.parent)
        return text

    if cli.merge:
        runs = {m: sorted(r, key=lambda x: x["seed"]) for m, r in runs.items()}
        print(report())
        return
    for seed in cli.seeds:
        tasks, setup = build_benchmark(cli, seed)
        for method in cli.methods:
            start = time.perf_counter()
            for row, result in run_method(method, tasks, seed, setup, cli).items():
                metrics = method_metrics(row, result)
                metrics.update(seed=seed, wall_s=time.perf_counter() - start)
                if method == "lora_ewc":
                    metrics["ewc_strength"] = cli.ewc_strength
                runs[row] = [r for r in runs.get(row, []) if r["seed"] != seed] + [metrics]
                faa, class_il, forgetting = (_percent(metrics[k]) for k in ("faa", "class_il_faa", "forgetting"))
                print(
                    f"{row:16s} seed {seed}: FAA {faa}  class-IL {class_il}  forgetting {forgetting}  "
                    f"({metrics['wall_s']:.0f} s)",
                    flush=True,
                )
            report()
    print(report())


def _percent(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}"


if __name__ == "__main__":
    main()
