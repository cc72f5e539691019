"""ContinualTrainer: H-embedding guided training of one hypernetwork over a sequence of tasks.

Per task t (ALGORITHM.md): the frozen backbone's features of its training data, H-scores of the old tasks on them,
AHP target distances, the fitted H-embedding, training with CE + output regulariser + embedding guidance (head
updates projected away from the old tasks' directions), then the router and frozen-baseline update and an evaluation
of every task seen so far, frozen-feature baselines included. Each finished task is checkpointed atomically, and
every task reseeds from ``seed + t``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import Task, TaskImages, image_spec, pooled_features
from ..evaluation import plots
from ..evaluation.baselines import FrozenBaselines
from ..evaluation.metrics import METRIC_KEYS, continual_metrics
from ..files import (
    LATEST,
    atomic_directory,
    atomic_write_json,
    check_sha256,
    latest_checkpoint,
    publish_checkpoint,
    sha256,
)
from ..method.embedding import fit_h_embedding, target_distances
from ..method.losses import GuidanceDecoder, guidance_loss, guidance_weight, output_regulariser
from ..method.router import GaussianRouter, entropy_route
from ..method.transferability import old_task_features, transferability
from ..tuner.config import HyperLoraConfig, differing_fields

# Training arguments a resume may change: where and how a run reports, not what it computes (see check_resume).
RESUME_SAFE_ARGUMENTS = (
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "logging_steps",
    "report_to",
    "plots",
    "per_device_eval_batch_size",
    "dataloader_num_workers",
)


@dataclass
class ContinualTrainingArguments:
    """How to train each task; the method's own switches live in HyperLoraConfig.

    ``resume_from_checkpoint`` continues the run in ``output_dir`` after its last finished task. The checkpoint
    records these arguments, and a resume that changes any of them is refused, except ``output_dir``,
    ``resume_from_checkpoint``, ``overwrite_output_dir``, ``logging_steps``, ``report_to``, ``plots``,
    ``per_device_eval_batch_size`` and ``dataloader_num_workers``, which do not change the results.
    ``embedding_learning_rate`` is the new task embedding's (None: ``learning_rate``). ``eval_curve_points`` > 0
    evaluates each task's test accuracy that many times, evenly, during its training: ``learning_curves`` in
    metrics.json, from which benchmarks read how fast a task learns. A fresh run into
    an ``output_dir`` that holds checkpoints is refused unless ``overwrite_output_dir`` is set (then the old
    checkpoints are deleted when it starts).
    """

    output_dir: str = "outputs"
    num_train_epochs: int = 2
    max_steps_per_task: int | None = None
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 128
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-2
    embedding_learning_rate: float | None = None
    eval_curve_points: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # None: whatever `accelerate launch` / `accelerate config` chose
    seed: int = 0
    image_size: int | None = None
    augment: bool = False
    dataloader_num_workers: int = 0
    resume_from_checkpoint: bool = False
    overwrite_output_dir: bool = False
    report_to: str | None = None
    logging_steps: int = 20
    plots: bool = True

    def __post_init__(self) -> None:
        if self.report_to in ("", "none"):  # the command-line spelling of "no trackers"
            self.report_to = None
        if self.eval_curve_points < 0:
            raise ValueError(f"eval_curve_points must be >= 0, got {self.eval_curve_points}")
        for name in (
            "num_train_epochs",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_task is not None and self.max_steps_per_task < 1:
            raise ValueError(f"max_steps_per_task must be >= 1 or None, got {self.max_steps_per_task}")
        rates = (self.learning_rate, self.head_learning_rate, self.embedding_learning_rate or self.learning_rate)
        if not all(rate > 0 for rate in rates):
            raise ValueError("learning rates must be > 0")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or None, got {self.mixed_precision!r}")


# Checkpoint files whose SHA-256 state.json records (the adapter's adapter_config.json records its weights').
_CHECKED_FILES = ("heads.safetensors", "frozen.safetensors")
# Decoded unaugmented images kept in memory: test splits are read at every evaluation, a training split every epoch
# (without augmentation), and decoding is a fifth of a small run's time. Splits past the budget are read as they come.
IMAGE_CACHE_BYTES = 1 << 30
# The frozen-feature classifiers every run reports beside its own accuracy (hyperlora.evaluation.baselines).
FROZEN_CLASS_INCREMENTAL = ("ncm", "lda")


class _TaskStep(nn.Module):
    """Everything one training step of task t computes, in one module so that DDP sees a single forward."""

    def __init__(self, model: PeftModel, head: nn.Linear, decoder: GuidanceDecoder | None, reg_targets, config):
        super().__init__()
        self.model, self.head, self.decoder = model, head, decoder
        self.reg_targets = reg_targets  # (A*, B*) per module, or None for the first task
        self.config = config

    def forward(self, pixel_values, labels, task_id: int, reg_tasks: list[int], h_embedding, beta_emb: float):
        # one hypernetwork pass serves the forward (task t, last row) and the losses (the sampled old tasks)
        tasks = [*reg_tasks, task_id]
        out = self.model.base_model.generate(tasks)
        with self.model.base_model.use_generated(out, tasks):
            logits = self.head(pooled_features(self.model(pixel_values)))
        ce = F.cross_entropy(logits.float(), labels)
        losses = {"ce": ce}
        if reg_tasks:
            losses["reg"] = output_regulariser(out, reg_tasks, *self.reg_targets)
        if self.decoder is not None:
            losses["emb"] = guidance_loss(self.decoder, out.hidden[-1:].float(), h_embedding)
        loss = ce + self.config.beta_reg * losses.get("reg", 0.0) + beta_emb * losses.get("emb", 0.0)
        return loss, {k: v.detach() for k, v in losses.items()}


class ContinualTrainer:
    """Train a HyperLoRA model on tasks one after another; see ``fit``."""

    def __init__(
        self,
        model: nn.Module,
        config: HyperLoraConfig | None = None,
        args: ContinualTrainingArguments | None = None,
    ) -> None:
        self.args = args or ContinualTrainingArguments()
        self.accelerator = Accelerator(
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            log_with=self.args.report_to,
            project_dir=self.args.output_dir,
        )
        _check_process_group(self.accelerator.num_processes)
        if isinstance(model, PeftModel):
            model_config = model.peft_config[model.active_adapter]
            if not isinstance(model_config, HyperLoraConfig):
                raise TypeError(f"the model carries a {type(model_config).__name__}, not a HyperLoraConfig")
            if config is not None and config.to_dict() != model_config.to_dict():
                raise ValueError("config differs from the config of the HyperLoRA model passed in: pass one of them")
            _feature_extractor(model.get_base_model(), wrapped=True)
            self.model, self.config = model, model_config
        else:
            if config is None:
                raise ValueError("pass a HyperLoraConfig with a base model (or a model from get_peft_model)")
            set_seed(self.args.seed)  # the hypernetwork's initialisation is part of the run the seed fixes
            self.model, self.config = get_peft_model(_feature_extractor(model), config), config
        # Eval mode except inside _train_task: the backbone is frozen, and a forward in train mode would still
        # update its BatchNorm statistics (a model is usually passed in as built, in train mode).
        self.model.to(self.accelerator.device).eval()
        self.spec = image_spec(self.model, self.args.image_size)
        self.output_dir = Path(self.args.output_dir)
        self.heads = nn.ModuleList()
        self.baselines: FrozenBaselines | None = None
        self._frozen_test: dict[int, list[torch.Tensor]] = {}  # the frozen backbone's test features, per task
        self._decoded: dict[tuple[str, str], tuple[TaskImages, int]] = {}  # (task, split) -> cached images, bytes

    @property
    def router(self) -> GaussianRouter | None:
        """The class-incremental router: the frozen baselines' LDA, over every class seen so far."""
        return None if self.baselines is None else self.baselines.lda

    # --- public --------------------------------------------------------------------------------------------------

    def fit(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """Train every task in order (resuming after the last checkpoint if asked) and return the metrics.

        Writes under ``output_dir``: metrics.json, embeddings.json, adapter/ (PEFT), heads.safetensors,
        frozen.safetensors (router statistics and frozen probes), the plots, and checkpoints/ (one per task).
        """
        tasks = _check_tasks(tasks)
        self.check_resume(tasks)
        num_tasks = len(tasks)
        self.offsets = np.cumsum([0] + [task.num_classes for task in tasks]).tolist()
        state = self._fresh_state(tasks)
        state["training_arguments"] = self._training_record()
        if self.args.resume_from_checkpoint:
            state = self._restore(tasks, state)
        elif self.accelerator.is_main_process:  # a fresh run (check_resume allowed it): no stale run to resume
            shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.args.report_to:
            config = tracker_config({**asdict(self.args), **self.config.to_dict()})
            self.accelerator.init_trackers("hyperlora", config=config)

        bar = self._bar(total=num_tasks, initial=state["completed"], desc="tasks")
        for t in range(state["completed"], num_tasks):
            set_seed(self.args.seed + t)
            start = time.perf_counter()
            # once per task, shared by the H-score ("lda"), the router and the frozen baselines
            frozen = self._features(self._loader(tasks[t], "train"), task_id=None)
            if t > 0:
                self._forward_transfer_probe(t, tasks[t], frozen, state)
            state["timings"]["frozen_features_s"][t] = time.perf_counter() - start

            start = time.perf_counter()
            h_embedding = self._h_embedding(t, tasks, state, frozen)
            state["timings"]["h_embedding_s"][t] = time.perf_counter() - start

            start = time.perf_counter()
            state["learning_curves"][t] = self._train_task(t, tasks[t], h_embedding)
            state["timings"]["train_s"][t] = time.perf_counter() - start

            start = time.perf_counter()
            self._update_frozen(t, frozen)
            self._evaluate(t, tasks, state)
            state["timings"]["eval_s"][t] = time.perf_counter() - start
            self._decoded.pop((tasks[t].name, "train"), None)  # read no more
            state["completed"] = t + 1
            self._checkpoint(tasks, state)
            accuracy = self._report_task(t, tasks, state)
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy:.3f}")
        bar.close()
        results = self._results(tasks, state)
        if self.accelerator.is_main_process:
            self._write_outputs(tasks, state, results)
            print(summary_table(results, [task.name for task in tasks]))
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group, and a
            tracker.finish()  # recipe runs several seeds in one launch
        return results

    def check_resume(self, tasks: Sequence[Task]) -> None:
        """Refuse, writing nothing, a run that the checkpoints in ``output_dir`` contradict.

        A resume is refused when the checkpoint was written for other task names, another HyperLoraConfig, other
        training arguments (all but those in RESUME_SAFE_ARGUMENTS) or another number of processes, naming every
        difference: it would not continue the same run. A fresh run into a folder holding checkpoints is refused
        unless ``overwrite_output_dir``. Without checkpoints there is nothing to check. ``fit`` calls this first.
        """
        tasks = _check_tasks(tasks)
        root = self.output_dir / "checkpoints"
        if not self.args.resume_from_checkpoint:
            if (root / LATEST).exists() and not self.args.overwrite_output_dir:
                raise ValueError(
                    f"{self.output_dir} already holds the checkpoints of a run: pass --resume_from_checkpoint "
                    "(resume_from_checkpoint=True) to continue it, or --overwrite_output_dir "
                    "(overwrite_output_dir=True) to start a new run there"
                )
            return
        path = latest_checkpoint(root)
        if path is None:
            return
        saved = json.loads((path / "state.json").read_text())
        differences = []
        names = [task.name for task in tasks]
        if saved["task_names"] != names:
            differences.append(f"tasks: {saved['task_names']} in the checkpoint, {names} now")
        check_sha256(path, saved.get("sha256", {}), "state.json")
        saved_config = HyperLoraConfig.from_pretrained(str(path / "adapter")).to_dict()  # checks its SHA-256 too
        differences += [
            f"HyperLoraConfig.{name}: {saved_config.get(name)!r} in the checkpoint, {getattr(self.config, name)!r} now"
            for name in differing_fields(saved_config, self.config)
        ]
        saved_args = saved.get("training_arguments")
        if saved_args is None:
            warnings.warn(
                f"{path} does not record its training arguments (an older hyperlora): not compared", stacklevel=2
            )
        else:
            current = self._training_record()
            differences += [
                f"{name}: {saved_args.get(name)!r} in the checkpoint, {current.get(name)!r} now"
                for name in sorted(saved_args.keys() | current.keys())
                if name not in RESUME_SAFE_ARGUMENTS and saved_args.get(name) != current.get(name)
            ]
        if differences:
            raise ValueError(
                f"cannot resume from {path}: it was written by a different run ("
                + "; ".join(differences)
                + "). Only these training arguments may change on resume: "
                + ", ".join(RESUME_SAFE_ARGUMENTS)
            )

    def _training_record(self) -> dict[str, Any]:
        """The training arguments as a checkpoint stores them (JSON values), with the precision and the number of
        processes the run really has."""
        record = asdict(self.args) | {
            "mixed_precision": self.accelerator.mixed_precision,
            "num_processes": self.accelerator.num_processes,
        }
        return json.loads(json.dumps(record))

    # --- the H-embedding -----------------------------------------------------------------------------------------

    def _h_embedding(self, t: int, tasks: Sequence[Task], state: dict, frozen) -> torch.Tensor | None:
        """Every old task's transferability to task t, AHP target distances, and the fitted H-embedding e^_t."""
        config, dim = self.config, self.config.task_embedding_dim
        hypernet = self.model.base_model.hypernet
        if t == 0:
            embedding = fit_h_embedding(np.zeros((0, dim)), np.zeros(0), dim=dim, seed=self.args.seed).embedding
            state["h_embeddings"][0] = embedding.tolist()
            return self._add_task(embedding)
        task = tasks[t]
        generator = torch.Generator().manual_seed(self.args.seed + t)
        sample = torch.randperm(len(task.train), generator=generator)[: config.h_score_samples]
        labels = frozen[1][sample.to(frozen[1].device)].cpu()
        loader = self._loader(task, "train", indices=sample.tolist(), shard=False)

        def features_of(task_id: int | None) -> torch.Tensor:
            if task_id is None:
                return frozen[0][sample.to(frozen[0].device)]
            return self._features(loader, task_id, exact=True)[0]

        old_features = old_task_features(config.h_score_features, t, features_of, heads=self.heads, router=self.router)
        scores = transferability(
            old_features,
            labels,
            shrinkage=config.h_score_shrinkage,
            resamples=config.h_score_resamples,
            seed=self.args.seed + t,
        )
        state["h_scores"][t][:t] = scores.scores.tolist()
        old = hypernet.stacked_task_embeddings().detach().cpu().numpy()
        targets = target_distances(scores.scores, old, normalisation=config.normalisation, resampled=scores.resampled)
        if targets is None:
            return self._add_task(None)
        fitted = fit_h_embedding(old, targets.distances, steps=config.h_embedding_steps, seed=self.args.seed + t)
        state["gamma"][t] = fitted.gamma
        state["consistency_ratio"][t] = math.nan if targets.consistency_ratio is None else targets.consistency_ratio
        rank = fitted.rank_correlation
        state["h_embedding_rank_correlation"][t] = math.nan if rank is None else rank
        state["h_embeddings"][t] = fitted.embedding.tolist()
        return self._add_task(fitted.embedding)

    def _add_task(self, h_embedding: torch.Tensor | None) -> torch.Tensor | None:
        """Register task t, starting at its H-embedding unless configured (or forced by "none") to start at random."""
        init = h_embedding
        if self.config.embedding_init == "random" or init is None:
            init = torch.randn(self.config.task_embedding_dim)
        self.model.add_task(init)
        return None if h_embedding is None else torch.as_tensor(h_embedding, dtype=torch.float32)

    # --- training ------------------------------------------------------------------------------------------------

    def _train_task(self, t: int, task: Task, h_embedding: torch.Tensor | None) -> list[list[float]]:
        """Train task t; returns its learning curve, [step, test accuracy] pairs (``eval_curve_points``)."""
        config, args, accelerator = self.config, self.args, self.accelerator
        model = self.model
        hypernet = model.base_model.hypernet
        feature_dim = self._feature_dim(task)
        head = nn.Linear(feature_dim, task.num_classes).to(accelerator.device)

        reg_targets = None
        if t > 0 and config.beta_reg > 0:
            with torch.no_grad():
                recorded = model.base_model.generate(list(range(t)))
            reg_targets = ([a.detach().clone() for a in recorded.A], [b.detach().clone() for b in recorded.B])
        beta_emb = guidance_weight(t, config.beta_emb_slope)
        decoder = None
        if h_embedding is not None and beta_emb > 0:
            decoder = GuidanceDecoder(config.hypernet_hidden_dim, config.task_embedding_dim, config.decoder_hidden_dim)
            decoder.to(accelerator.device)
            h_embedding = h_embedding.to(accelerator.device)

        bases = outputs = None
        if t > 0 and config.head_projection:
            bases = hypernet.head_bases(range(t))
            outputs = hypernet.protected_outputs(bases)

        _train_mode(model)
        step_module = _TaskStep(model, head, decoder, reg_targets, config)
        embedding = hypernet.task_embeddings[t]
        groups = [
            {
                "params": [p for p in hypernet.parameters() if p.requires_grad and p is not embedding],
                "lr": args.learning_rate,
            },
            {"params": [embedding], "lr": args.embedding_learning_rate or args.learning_rate},
            {"params": list(head.parameters()), "lr": args.head_learning_rate},
        ]
        if decoder is not None:
            groups.append({"params": list(decoder.parameters()), "lr": args.learning_rate})
        # fused: one kernel over all parameters, which matters for the hypernet's few large head matrices
        fused = accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=fused)
        loader = self._loader(task, "train", augment=args.augment, shuffle=True, shard=False, seed=args.seed + t)
        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        total = steps_per_epoch * args.num_train_epochs
        if args.max_steps_per_task is not None:
            total = min(total, args.max_steps_per_task)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        step_module, optimizer, loader, scheduler = accelerator.prepare(step_module, optimizer, loader, scheduler)
        reg_generator = torch.Generator().manual_seed(self.args.seed + 7919 * (t + 1))

        bar = self._bar(total=total, desc=f"task {t} ({task.name})", leave=False)
        curve_steps = {math.ceil(total * k / args.eval_curve_points) for k in range(1, args.eval_curve_points + 1)}
        curve = []
        step = 0
        while step < total:
            for pixel_values, labels in loader:
                with accelerator.accumulate(step_module):
                    reg_tasks = []
                    if reg_targets is not None:
                        reg_tasks = torch.randperm(t, generator=reg_generator)[: config.reg_max_tasks].tolist()
                    loss, parts = step_module(pixel_values, labels, t, reg_tasks, h_embedding, beta_emb)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"task {t} ({task.name}): the loss became {loss.item()} at step {step}; lower the "
                            "learning rate or max_grad_norm. The last checkpoint was left intact."
                        )
                    accelerator.backward(loss)
                    if bases is not None and accelerator.sync_gradients:
                        hypernet.project_gradients(bases)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(step_module.parameters(), args.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]  # the hypernetwork's, for this step
                    optimizer.step()
                    if bases is not None and accelerator.sync_gradients:
                        hypernet.protect(bases, outputs)  # the old tasks' generated weights stay as they were
                    scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                if step % args.logging_steps == 0 or step == total:
                    values = {"loss": loss.item()} | {k: v.item() for k, v in parts.items()}
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    if args.report_to:
                        logs = {f"train/{k}": v for k, v in values.items()} | {"train/learning_rate": lr, "task": t}
                        accelerator.log(logs, step=_tracker_step(t, step))
                    if self._log_steps:
                        detail = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "loss")
                        self._print(
                            f"task {t} ({task.name}) step {step}/{total}: loss {values['loss']:.4f} ({detail}), "
                            f"lr {lr:.2e}"
                        )
                if step in curve_steps:
                    curve.append([step, self._task_accuracy(t, task, accelerator.unwrap_model(step_module).head)])
                if step >= total:
                    break
        bar.close()
        accelerator.wait_for_everyone()
        head = accelerator.unwrap_model(step_module).head
        head.requires_grad_(False)
        self.heads.append(head.eval())
        accelerator.free_memory(step_module, optimizer, loader, scheduler)
        model.eval()
        return curve

    def _task_accuracy(self, t: int, task: Task, head: nn.Module) -> float:
        """Task t's test accuracy now, in the middle of its training (which resumes in train mode)."""
        self.model.eval()
        hits = count = 0
        with torch.no_grad():
            for pixel_values, labels in self._loader(task, "test"):
                predicted = head(self._forward(pixel_values, t)).argmax(-1)
                predicted, labels = self.accelerator.gather_for_metrics((predicted, labels))
                hits, count = hits + (predicted == labels).sum().item(), count + labels.numel()
        _train_mode(self.model)
        return hits / count

    # --- routing and evaluation ----------------------------------------------------------------------------------

    def _update_frozen(self, t: int, frozen) -> None:
        """Add task t's frozen training features to the router and the frozen-feature baselines."""
        features, labels = frozen
        if self.baselines is None:
            self.baselines = FrozenBaselines(features.shape[1], shrinkage=self.config.router_shrinkage)
        self.baselines.add_task(t, features.double().cpu(), labels.cpu() + self.offsets[t])

    def _evaluate(self, t: int, tasks: Sequence[Task], state: dict) -> None:
        """Row t of the task-IL and class-IL accuracy matrices, the router's task-id accuracy, the frozen baselines on
        the same images, and the FWT probe."""
        correct_all, routed_all, count_all = 0, 0, 0
        frozen_all = dict.fromkeys(FROZEN_CLASS_INCREMENTAL, 0)
        device = self.accelerator.device
        for j in range(t + 1):
            loader = self._loader(tasks[j], "test")
            hits_til, hits_cil, hits_route, hits_probe, n = 0, 0, 0, 0, 0
            with torch.no_grad():
                for b, (pixel_values, labels) in enumerate(loader):
                    frozen = self._frozen_test_batch(j, b, pixel_values)
                    features = self._forward(pixel_values, j)
                    local = self.heads[j](features).argmax(-1)
                    routed_task, predicted = self._class_incremental(pixel_values, frozen, t, j, features)
                    probe = self.baselines.probe_predict(j, frozen).to(device)
                    guesses = self.baselines.predict(frozen)
                    baseline = [guesses[name].to(device) for name in FROZEN_CLASS_INCREMENTAL]
                    local, labels, routed_task, predicted, probe, *baseline = self.accelerator.gather_for_metrics(
                        (local, labels, routed_task, predicted, probe, *baseline)
                    )
                    hits_til += (local == labels).sum().item()
                    hits_cil += (predicted == labels + self.offsets[j]).sum().item()
                    hits_route += (routed_task == j).sum().item()
                    hits_probe += (probe == labels + self.offsets[j]).sum().item()
                    for name, guess in zip(FROZEN_CLASS_INCREMENTAL, baseline, strict=True):
                        frozen_all[name] += (guess == labels + self.offsets[j]).sum().item()
                    n += labels.numel()
            state["evaluated_samples"][j] = n
            state["task_il"][t][j] = hits_til / n
            state["class_il"][t][j] = hits_cil / n
            state["frozen_linear_probe"][j] = hits_probe / n
            correct_all, routed_all, count_all = correct_all + hits_cil, routed_all + hits_route, count_all + n
        state["seen_class_accuracy"][t] = correct_all / count_all
        state["router_task_accuracy"][t] = routed_all / count_all
        for name, hits in frozen_all.items():
            state["frozen_class_il"][name][t] = hits / count_all

    def _class_incremental(
        self, pixel_values: torch.Tensor, frozen: torch.Tensor, t: int, j: int, features_j: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each sample to a task, then let that task's adapter and head name the (global) class. The batch comes
        from task j's test set and ``features_j`` are its features under j's adapter: only samples routed elsewhere
        need another forward."""
        if self.config.router == "gaussian":
            _, routed = self.router.predict(frozen.double().cpu())
            routed = routed.to(pixel_values.device)
        else:
            logits = [self.heads[i](features_j if i == j else self._forward(pixel_values, i)) for i in range(t + 1)]
            routed = entropy_route(logits)
        features = features_j.clone()
        elsewhere = routed != j
        if elsewhere.any():
            features[elsewhere] = self._forward(pixel_values[elsewhere], routed[elsewhere])
        predicted = torch.empty_like(routed)
        for task_id in routed.unique().tolist():
            mask = routed == task_id
            predicted[mask] = self.heads[task_id](features[mask]).argmax(-1) + self.offsets[task_id]
        return routed, predicted

    def _forward_transfer_probe(self, t: int, task: Task, frozen, state: dict) -> None:
        """FWT's R[t-1][t] and b_t, before task t trains: nearest-class-mean accuracy on task t of the features under
        task t-1's adapter (the model after task t-1) and of the untrained backbone. The frozen training features
        are the ones every task computes anyway, and the frozen test features land in the evaluation's cache."""
        self.model.eval()
        k = min(len(task.train), self.config.h_score_samples)
        train = {
            "fwt_baseline": (frozen[0][:k], frozen[1][:k]),
            "fwt_start": self._features(self._loader(task, "train", indices=range(k)), t - 1),
        }
        test = {"fwt_baseline": [], "fwt_start": [], "labels": []}
        with torch.no_grad():
            for b, (pixel_values, labels) in enumerate(self._loader(task, "test")):
                frozen_b = self._frozen_test_batch(t, b, pixel_values)
                batch = self.accelerator.gather_for_metrics((frozen_b, self._forward(pixel_values, t - 1), labels))
                for key, value in zip(test, batch, strict=True):
                    test[key].append(value)
        test_labels = torch.cat(test["labels"])
        for key, (features, labels) in train.items():
            means = torch.stack([features[labels == c].mean(0) for c in range(task.num_classes)])
            predicted = torch.cdist(torch.cat(test[key]).float(), means.float()).argmin(-1)
            state[key][t] = (predicted == test_labels).float().mean().item()

    def _frozen_test_batch(self, t: int, b: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's features of batch b of task t's test loader (this process's share), computed the
        first time the batch is seen: the backbone never changes, and every later evaluation reads them again."""
        cached = self._frozen_test.setdefault(t, [])
        if b == len(cached):
            cached.append(self._forward(pixel_values, None))
        return cached[b]

    def _report_task(self, t: int, tasks: Sequence[Task], state: dict) -> float:
        """Task t's results to the trackers and as a log line; returns its task-IL accuracy over the seen tasks."""
        accuracy = float(np.mean(state["task_il"][t][: t + 1]))
        seen, routed = state["seen_class_accuracy"][t], state["router_task_accuracy"][t]
        if self.args.report_to:
            values = {"task_il_accuracy": accuracy, "class_il_accuracy": seen, "router_task_accuracy": routed}
            logs = {f"eval/{k}": v for k, v in values.items()} | {"task": t}
            self.accelerator.log(logs, step=_tracker_step(t + 1, 0))
        timings = {k.removesuffix("_s").replace("_", "-"): v[t] for k, v in state["timings"].items()}
        self._print(
            f"task {t} ({tasks[t].name}) done, {t + 1} of {len(tasks)}: task-IL accuracy {accuracy:.4f} over the "
            f"seen tasks, class-IL {seen:.4f}, router {routed:.4f}; "
            + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        )
        return accuracy

    # --- helpers -------------------------------------------------------------------------------------------------

    @property
    def _log_steps(self) -> bool:
        """Step log lines when no progress bar shows them: stderr not a terminal (tqdm is off) or stdout sent to a
        file (SLURM, ``> log``)."""
        return not (sys.stdout.isatty() and sys.stderr.isatty())

    def _print(self, line: str) -> None:
        """A log line on stdout, from the main process only, flushed at once (a SLURM log is read while it runs)."""
        if self.accelerator.is_main_process:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def _forward(self, pixel_values: torch.Tensor, task_ids, exact: bool = False) -> torch.Tensor:
        """Pooled features under the given tasks' adapters; the frozen backbone's (``task_ids=None``) and ``exact``
        ones in full precision: statistics and H-scores must not see mixed precision's rounding."""
        if task_ids is None:
            with self.model.disable_adapter():
                return pooled_features(self.model(pixel_values)).float()
        with self.accelerator.autocast() if not exact else torch.autocast(pixel_values.device.type, enabled=False):
            return pooled_features(self.model(pixel_values, task_ids=task_ids)).float()

    def _features(self, loader, task_id: int | None, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a whole loader under one task's adapter (None: the frozen backbone), gathered."""
        self.model.eval()
        features, labels = [], []
        with torch.no_grad():
            for pixel_values, batch_labels in loader:
                batch = self._forward(pixel_values, task_id, exact)
                if not isinstance(loader, _OnDevice):
                    batch, batch_labels = self.accelerator.gather_for_metrics((batch, batch_labels))
                features.append(batch)
                labels.append(batch_labels)
        return torch.cat(features), torch.cat(labels)

    def _feature_dim(self, task: Task) -> int:
        pixel_values, _ = next(iter(self._loader(task, "test", shard=False)))
        with torch.no_grad():
            return self._forward(pixel_values[:1].to(self.accelerator.device), None).shape[1]

    def _images(self, task: Task, split: str, augment: bool) -> TaskImages:
        """The split as model inputs; unaugmented, it is kept decoded while it fits ``IMAGE_CACHE_BYTES``."""
        if augment or self.args.dataloader_num_workers > 0:  # workers would fill copies of the cache
            return TaskImages(getattr(task, split), self.spec.transform(augment), task.classes)
        if (task.name, split) in self._decoded:
            return self._decoded[task.name, split][0]
        dataset = getattr(task, split)
        size = len(dataset) * 3 * self.spec.size**2 * 4
        cache = sum(size for _, size in self._decoded.values()) + size <= IMAGE_CACHE_BYTES
        images = TaskImages(dataset, self.spec.transform(), task.classes, cache=cache)
        if cache:
            self._decoded[task.name, split] = images, size
        return images

    def _loader(self, task: Task, split: str, *, indices=None, augment=False, shuffle=False, shard=True, seed=0):
        dataset = self._images(task, split, augment)
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, list(indices))
        batch_size = (
            self.args.per_device_train_batch_size
            if split == "train" and shuffle
            else self.args.per_device_eval_batch_size
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
        )
        if shard:
            return self.accelerator.prepare_data_loader(loader)
        if not shuffle:
            return _OnDevice(loader, self.accelerator.device)
        return loader

    def _bar(self, **kwargs) -> tqdm:
        quiet = not self.accelerator.is_local_main_process or not sys.stderr.isatty()
        return tqdm(disable=quiet, dynamic_ncols=True, **kwargs)

    # --- state, checkpoints, outputs -----------------------------------------------------------------------------

    @staticmethod
    def _fresh_state(tasks: Sequence[Task]) -> dict:
        num_tasks = len(tasks)

        def matrix():
            return [[math.nan] * num_tasks for _ in range(num_tasks)]

        def row():
            return [math.nan] * num_tasks

        return {
            "completed": 0,
            "task_names": [task.name for task in tasks],
            "task_il": matrix(),
            "class_il": matrix(),
            "h_scores": matrix(),
            "h_embeddings": [None] * num_tasks,
            "learning_curves": [[] for _ in range(num_tasks)],
            "gamma": row(),
            "consistency_ratio": row(),
            "h_embedding_rank_correlation": row(),
            "frozen_linear_probe": row(),
            "frozen_class_il": {name: row() for name in FROZEN_CLASS_INCREMENTAL},
            "fwt_start": row(),
            "fwt_baseline": row(),
            "seen_class_accuracy": row(),
            "router_task_accuracy": row(),
            "evaluated_samples": [0] * num_tasks,
            "timings": {"frozen_features_s": row(), "h_embedding_s": row(), "train_s": row(), "eval_s": row()},
        }

    def _checkpoint(self, tasks: Sequence[Task], state: dict) -> None:
        root = self.output_dir / "checkpoints"
        name = f"task-{state['completed'] - 1:03d}"
        if self.accelerator.is_main_process:
            with atomic_directory(root / name) as tmp:
                self._save_artifacts(tmp)
                digests = {file: sha256(tmp / file) for file in _CHECKED_FILES}  # the adapter records its own
                atomic_write_json(tmp / "state.json", state | {"sha256": digests})
            publish_checkpoint(root, name)
        self.accelerator.wait_for_everyone()

    def _save_artifacts(self, directory: Path) -> None:
        self.model.save_pretrained(directory / "adapter")
        heads = {
            f"{j}.{k}": v.detach().cpu().contiguous()
            for j, h in enumerate(self.heads)
            for k, v in h.state_dict().items()
        }
        save_file(heads, directory / "heads.safetensors")
        save_file(self.baselines.state_dict(), directory / "frozen.safetensors")

    def _restore(self, tasks: Sequence[Task], state: dict) -> dict:
        path = latest_checkpoint(self.output_dir / "checkpoints")
        if path is None:
            return state
        saved = json.loads((path / "state.json").read_text())
        saved.pop("sha256", None)  # check_resume checked the files
        saved["training_arguments"] = state["training_arguments"]  # check_resume accepted the differences
        weights = load_peft_weights(str(path / "adapter"), device=str(self.accelerator.device))
        set_peft_model_state_dict(self.model, weights)
        self.model.base_model.set_task(self.model.base_model.num_tasks - 1)
        heads = load_file(path / "heads.safetensors")
        for j in range(saved["completed"]):
            weight, bias = heads[f"{j}.weight"], heads[f"{j}.bias"]
            head = nn.Linear(weight.shape[1], weight.shape[0]).to(self.accelerator.device)
            head.load_state_dict({"weight": weight, "bias": bias})
            self.heads.append(head.eval().requires_grad_(False))
        frozen_state = load_file(path / "frozen.safetensors")
        self.baselines = FrozenBaselines(frozen_state["lda.outer"].shape[0], shrinkage=self.config.router_shrinkage)
        self.baselines.load_state_dict(frozen_state)
        _nan_from_json(saved)
        return saved

    def _results(self, tasks: Sequence[Task], state: dict) -> dict[str, Any]:
        # Accuracies of seen tasks only: the FWT probe's nearest-class-mean accuracy of task t+1 (which checkpoints of
        # older versions kept at R[t][t+1]) is no head's accuracy; FWT reads it from fwt_start.
        til = [[v if j <= i else math.nan for j, v in enumerate(row)] for i, row in enumerate(state["task_il"])]
        cil = np.array(state["class_il"], dtype=float)
        baseline = state["fwt_baseline"] if len(tasks) > 1 else None
        results = continual_metrics(til, baseline=baseline, start=state["fwt_start"])
        results["accuracy_matrix"] = til
        class_il = continual_metrics(np.where(np.tril(np.ones_like(cil)) > 0, cil, np.nan))
        class_il["fwt"] = None  # a class-incremental model has no head for a task it has not seen
        class_il["accuracy_matrix"] = state["class_il"]
        class_il["seen_class_accuracy"] = state["seen_class_accuracy"]
        class_il["final_accuracy"] = state["seen_class_accuracy"][-1]
        class_il["router_task_accuracy"] = state["router_task_accuracy"]
        class_il["router"] = self.config.router
        results["class_incremental"] = class_il
        probes = state["frozen_linear_probe"]
        results["frozen_baselines"] = {
            "linear_probe": float(np.nanmean(probes)),
            **{name: state["frozen_class_il"][name][-1] for name in FROZEN_CLASS_INCREMENTAL},
            "linear_probe_per_task": probes,
            **{f"{name}_per_step": state["frozen_class_il"][name] for name in FROZEN_CLASS_INCREMENTAL},
        }
        results.update(
            task_names=state["task_names"],
            h_scores=state["h_scores"],
            h_score_features=self.config.h_score_features,
            consistency_ratio=state["consistency_ratio"],
            gamma=state["gamma"],
            h_embedding_rank_correlation=state["h_embedding_rank_correlation"],
            learning_curves=state["learning_curves"],
            fwt_start=state["fwt_start"],
            fwt_baseline=state["fwt_baseline"],
            evaluated_samples=state["evaluated_samples"],
            timings=state["timings"],
            num_tasks=len(tasks),
        )
        return results

    def _write_outputs(self, tasks: Sequence[Task], state: dict, results: dict) -> None:
        out = self.output_dir
        atomic_write_json(out / "metrics.json", results)
        embeddings = self.model.base_model.hypernet.stacked_task_embeddings().detach().cpu()
        atomic_write_json(
            out / "embeddings.json",
            {
                "task_names": state["task_names"],
                "embeddings": embeddings.tolist(),
                "h_embeddings": state["h_embeddings"],
                "h_scores": state["h_scores"],
                "consistency_ratio": state["consistency_ratio"],
                "gamma": state["gamma"],
                "h_embedding_rank_correlation": state["h_embedding_rank_correlation"],
            },
        )
        with atomic_directory(out / "final") as tmp:
            self._save_artifacts(tmp)
        if self.args.plots:
            names = state["task_names"]
            plots.plot_accuracy_matrix(
                results["accuracy_matrix"],
                out / "accuracy_matrix.png",
                title="Task-incremental accuracy",
                task_names=names,
            )
            plots.plot_accuracy_matrix(
                state["class_il"],
                out / "accuracy_matrix_class_incremental.png",
                title="Class-incremental accuracy",
                task_names=names,
            )
            plots.plot_h_scores(state["h_scores"], out / "h_scores.png", task_names=names)
            plots.plot_embeddings(embeddings.numpy(), out / "embeddings.png", task_names=names)


def _train_mode(model: nn.Module) -> None:
    """Train mode, except that batch-norm layers keep using (and not updating) their running statistics: the
    backbone is frozen, statistics included, or old tasks and the router would drift."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class _OnDevice:
    """An unsharded loader whose batches land on the accelerator's device (every process reads all of it)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for pixel_values, labels in self.loader:
            yield pixel_values.to(self.device), labels.to(self.device)


def _feature_extractor(model: nn.Module, wrapped: bool = False) -> nn.Module:
    """The model whose forward returns features. Of a transformers model with a task head (ViTForImageClassification)
    that is its base model (ViTModel): every task gets a head of its own. A timm classifier returns logits: refused."""
    base = getattr(model, "base_model", model)  # transformers' base model: the model without its task head
    if getattr(model, "base_model_prefix", None) and base is not model:
        if wrapped:
            raise TypeError(
                f"the HyperLoRA model wraps a {type(model).__name__}, whose forward returns its task head's logits, "
                f"not features: wrap its base model instead (get_peft_model(model.{model.base_model_prefix}, "
                "config)), or pass the unwrapped model and a HyperLoraConfig"
            )
        return base
    if getattr(model, "num_classes", 0) and hasattr(model, "reset_classifier"):
        raise TypeError(
            f"this timm model has a {model.num_classes}-class classifier, so it returns logits, not features: "
            "create it with num_classes=0 (or call model.reset_classifier(0))"
        )
    return model


def _check_process_group(num_processes: int) -> None:
    """Refuse a launch whose processes did not form one process group: each would run the whole job alone, all
    writing the same checkpoint files."""
    requested = int(os.environ.get("WORLD_SIZE", "1")) or 1
    if requested == 1 and os.environ.get("ACCELERATE_USE_CPU") == "True":
        requested = _simple_launcher_processes()
    if requested > num_processes:
        raise ValueError(
            f"the launcher asked for {requested} processes, but they did not form a process group ({num_processes} "
            "here): on a machine without GPUs, `accelerate launch --multi_gpu` starts independent runs unless "
            "ACCELERATE_USE_CPU=1 is set, and `--cpu` starts one process. Run instead: "
            f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {requested} ..."
        )


def _simple_launcher_processes() -> int:
    """--num_processes of an `accelerate launch --cpu` that started this process (Linux), else 1: that launcher starts
    a single process and passes it no trace of the number it was asked for but its own command line."""
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return 1
    # `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`, then options, then the script
    start = next((i for i, a in enumerate(launcher) if a == "launch" or a.endswith(("-launch", ".launch"))), None)
    if start is None or sys.argv[0] not in launcher[start:]:
        return 1
    options = launcher[start + 1 : launcher.index(sys.argv[0], start)]  # not the script's own arguments
    for i, option in enumerate(options):
        name, _, value = option.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (options[i + 1] if i + 1 < len(options) else "")
            return int(value) if value.isdigit() else 1
    return 1


def _tracker_step(t: int, step: int) -> int:
    """One increasing step count over the whole run, the same after a resume."""
    return t * 100_000 + step


def tracker_config(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten a config to what every tracker accepts (TensorBoard's hparams refuse None and lists): nested dicts
    become ``outer/inner`` keys, lists and sets comma-separated strings, enums their value, anything else its str."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, dict):
            flat |= tracker_config(value, prefix=f"{name}/")
        elif isinstance(value, set | frozenset):
            flat[name] = ",".join(sorted(map(str, value)))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(map(str, value))
        elif type(value) in (bool, int, float, str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _check_tasks(tasks: Sequence[Task]) -> list[Task]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("fit() needs at least one task")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"tasks must be hyperlora.data.Task objects, got {type(task).__name__}")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tasks


def _nan_from_json(state: dict) -> None:
    """JSON stored NaN as null: turn the nulls of the numeric tables back into NaN."""
    for key in ("task_il", "class_il", "h_scores"):
        state[key] = [[math.nan if v is None else v for v in row] for row in state[key]]
    rows = ("gamma", "consistency_ratio", "h_embedding_rank_correlation", "frozen_linear_probe", "fwt_start")
    for key in (*rows, "fwt_baseline", "seen_class_accuracy", "router_task_accuracy"):
        state[key] = [math.nan if v is None else v for v in state[key]]
    for group in ("timings", "frozen_class_il"):
        for key, row in state[group].items():
            state[group][key] = [math.nan if v is None else v for v in row]


def summary_table(results: dict[str, Any], task_names: Sequence[str]) -> str:
    """A few lines a person reads at a glance: per-task final accuracy and the headline metrics."""

    def pct(value) -> str:
        return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:6.2f}"

    final_til = results["accuracy_matrix"][-1]
    final_cil = results["class_incremental"]["accuracy_matrix"][-1]
    width = max(8, *(len(name) for name in task_names))
    lines = [f"{'task':<{width}}  task-IL  class-IL", f"{'-' * width}  -------  --------"]
    lines += [
        f"{name:<{width}}  {pct(a)}   {pct(b)}" for name, a, b in zip(task_names, final_til, final_cil, strict=True)
    ]
    lines.append("")
    lines.append(f"{'metric':<26}  task-IL  class-IL")
    for key in METRIC_KEYS:
        lines.append(f"{key:<26}  {pct(results.get(key))}   {pct(results['class_incremental'].get(key))}")
    lines.append(
        f"{'router task-id accuracy':<26}           {pct(results['class_incremental']['router_task_accuracy'][-1])}"
    )
    frozen = results["frozen_baselines"]
    lines.append(f"{'frozen linear probe / LDA':<26}  {pct(frozen['linear_probe'])}   {pct(frozen['lda'])}")
    return "\n".join(lines)
