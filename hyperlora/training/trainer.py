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
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel, get_peft_model
from torch import nn

from ..data import Task, image_spec
from ..evaluation.baselines import FrozenBaselines
from ..method.embedding import fit_h_embedding, guided_embedding
from ..method.router import GaussianRouter
from ..method.transferability import SampleReads, sample_size
from ..optim import cosine_schedule
from ..tuner import HyperLoraConfig
from .arguments import ContinualTrainingArguments
from .callbacks import TrainerCallback
from .checkpointing import check_resume, load_checkpoint, save_checkpoint
from .evaluation import Evaluator
from .features import FeatureReader
from .launch import check_process_group, feature_extractor
from .prefix import FrozenPrefix
from .reporting import Progress, run_results, summary_table, tracker_config, write_outputs
from .state import RunState
from .step import TaskStep, create_optimizer, train_mode, training_step

GUIDANCE_POINTS = 10  # guidance loss and gradient logged this many times per task (and at its first step)


class ContinualTrainer:
    """Train a HyperLoRA model on tasks one after another; see ``fit``. ``callbacks`` run between tasks
    (``TrainerCallback``)."""

    def __init__(
        self,
        model: nn.Module,
        config: HyperLoraConfig | None = None,
        args: ContinualTrainingArguments | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.args = args or ContinualTrainingArguments()
        self.callbacks = list(callbacks)
        self.accelerator = Accelerator(
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            log_with=self.args.report_to,
            project_dir=self.args.output_dir,
        )
        check_process_group(self.accelerator.num_processes)
        if isinstance(model, PeftModel):
            model_config = model.peft_config[model.active_adapter]
            if not isinstance(model_config, HyperLoraConfig):
                raise TypeError(f"the model carries a {type(model_config).__name__}, not a HyperLoraConfig")
            if config is not None and config.to_dict() != model_config.to_dict():
                raise ValueError("config differs from the config of the HyperLoRA model passed in: pass one of them")
            feature_extractor(model.get_base_model(), wrapped=True)
            self.model, self.config = model, model_config
        else:
            if config is None:
                raise ValueError("pass a HyperLoraConfig with a base model (or a model from get_peft_model)")
            set_seed(self.args.seed)  # the hypernetwork's initialisation is part of the run the seed fixes
            self.model, self.config = get_peft_model(feature_extractor(model), config), config
        # Eval mode except while a task trains: the backbone is frozen, and a forward in train mode would still
        # update its BatchNorm statistics (a model is usually passed in as built, in train mode).
        self.model.to(self.accelerator.device).eval()
        self.output_dir = Path(self.args.output_dir)
        self.reader = FeatureReader(
            self.model, self.accelerator, self.args, image_spec(self.model, self.args.image_size)
        )
        self.progress = Progress(self.accelerator, self.args.report_to)
        self.heads = nn.ModuleList()
        self.baselines: FrozenBaselines | None = None

    @property
    def router(self) -> GaussianRouter | None:
        """The class-incremental router: the frozen baselines' LDA, over every class seen so far."""
        return None if self.baselines is None else self.baselines.lda

    def fit(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """Train every task in order (resuming after the last checkpoint if asked) and return the metrics.

        Writes under ``output_dir``: metrics.json, embeddings.json, adapter/ (PEFT), heads.safetensors,
        frozen.safetensors (router statistics and frozen probes), the plots, and checkpoints/ (one per task).
        """
        tasks = _check_tasks(tasks)
        self.check_resume(tasks)
        offsets = np.cumsum([0] + [task.num_classes for task in tasks]).tolist()
        self.evaluator = Evaluator(self.reader, self.heads, self.config, offsets)
        state = RunState.fresh([task.name for task in tasks])
        if self.args.resume_from_checkpoint:
            state = self._restore(state)
        elif self.accelerator.is_main_process:  # a fresh run (check_resume allowed it): no stale run to resume
            shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
        state.training_arguments = self._training_record()  # check_resume accepted any difference
        self.accelerator.wait_for_everyone()
        if self.args.report_to:
            self.accelerator.init_trackers(
                "hyperlora", config=tracker_config(asdict(self.args) | self.config.to_dict())
            )

        bar = self.progress.bar(total=len(tasks), initial=state.completed, desc="tasks")
        for t in range(state.completed, len(tasks)):
            for callback in self.callbacks:
                callback.on_task_begin(self, t, state)
            set_seed(self.args.seed + t)
            timings = state.timings
            start = time.perf_counter()
            # once per task, shared by the H-score, the router and the frozen baselines; the H-score's sample first,
            # unsharded, where the old tasks' models will read it: its frozen prefix is kept for their reads
            sample = self._h_score_sample(t, tasks[t])
            if sample is not None and self.config.h_score_features != "lda":
                frozen = self.reader.frozen_features(tasks[t], sample.parts, sample.prefix)
            else:
                frozen = self.reader.frozen_features(tasks[t])
            if t > 0:
                self.evaluator.forward_transfer_probe(t, tasks[t], frozen, state, seed=self.args.seed + t)
            timings["frozen_features_s"][t], start = time.perf_counter() - start, time.perf_counter()
            h_embedding = self._h_embedding(t, tasks[t], state, frozen, sample)
            timings["h_embedding_s"][t], start = time.perf_counter() - start, time.perf_counter()
            state.learning_curves[t] = self._train_task(t, tasks[t], h_embedding, state)
            timings["train_s"][t], start = time.perf_counter() - start, time.perf_counter()
            self._update_frozen(t, frozen, offsets[t])
            self.evaluator.evaluate(t, tasks, state, self.baselines)
            timings["eval_s"][t] = time.perf_counter() - start
            self.reader.release(tasks[t], "train")
            state.completed = t + 1
            if self.accelerator.is_main_process:
                save_checkpoint(self.output_dir, state, self.model, self.heads, self.baselines)
            self.accelerator.wait_for_everyone()
            accuracy = self.progress.task_done(t, tasks, state)
            for callback in self.callbacks:
                callback.on_task_end(self, t, state)
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy:.3f}")
        bar.close()
        results = run_results(state, self.config)
        if self.accelerator.is_main_process:
            write_outputs(self.output_dir, state, results, self.model, self.heads, self.baselines, self.args.plots)
            print(summary_table(results, state.task_names))
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group, and a
            tracker.finish()  # recipe runs several seeds in one launch
        return results

    def check_resume(self, tasks: Sequence[Task]) -> None:
        """Refuse, writing nothing, a run that the checkpoints in ``output_dir`` contradict (see
        ``hyperlora.training.checkpointing.check_resume``)."""
        names = [task.name for task in _check_tasks(tasks)]
        check_resume(self.output_dir, self.args, self.config, names, self._training_record())

    def _training_record(self) -> dict[str, Any]:
        """The training arguments as a checkpoint stores them (JSON values), with the precision and the number of
        processes the run really has."""
        record = asdict(self.args) | {
            "mixed_precision": self.accelerator.mixed_precision,
            "num_processes": self.accelerator.num_processes,
        }
        return json.loads(json.dumps(record))

    def _restore(self, state: RunState) -> RunState:
        restored = load_checkpoint(self.output_dir, self.model, self.accelerator.device, self.config)
        if restored is None:
            return state
        state, heads, self.baselines = restored
        self.heads.extend(heads)
        return state

    # --- one task ------------------------------------------------------------------------------------------------

    def _h_score_sample(self, t: int, task: Task) -> _HScoreSample | None:
        """Task t's images that the H-scores read (none for the first task), in two parts: the screen every old task
        is read on, and the rest (``screen_old_tasks``)."""
        if t == 0:
            return None
        config = self.config
        generator = torch.Generator().manual_seed(self.args.seed + t)
        samples = sample_size(config.h_score_features, config.h_score_samples, config.h_score_adapted_samples)
        indices = torch.randperm(len(task.train), generator=generator)[:samples].tolist()
        screen = config.h_score_screen_samples
        parts = [part for part in (indices[:screen], indices[screen:]) if part]
        return _HScoreSample(indices, parts, FrozenPrefix(self.model))

    def _h_embedding(
        self, t: int, task: Task, state: RunState, frozen, sample: _HScoreSample | None
    ) -> torch.Tensor | None:
        """Every old task's transferability to task t, AHP target distances, and the fitted H-embedding e^_t."""
        config = self.config
        if sample is None:
            embedding = fit_h_embedding(
                np.zeros((0, config.task_embedding_dim)),
                np.zeros(0),
                dim=config.task_embedding_dim,
                seed=self.args.seed,
            ).embedding
            state.h_embeddings[0] = embedding.tolist()
            return self._add_task(embedding)
        rows = torch.as_tensor(sample.indices, device=frozen[0].device)
        labels = frozen[1][rows].cpu()
        loaders = [self.reader.loader(task, "train", indices=part, shard=False) for part in sample.parts]

        def read(part: int, task_id: int) -> torch.Tensor:
            return self.reader.features(loaders[part], task_id, exact=True, prefix=sample.prefix.part(part))[0]

        features_of = SampleReads(read, frozen[0][rows], len(sample.parts[0]))
        old = self.model.base_model.hypernet.stacked_task_embeddings().detach().cpu().numpy()
        guided = guided_embedding(
            old, features_of, labels, config, seed=self.args.seed + t, heads=self.heads, router=self.router
        )
        state.h_scores[t][:t] = guided.scores.tolist()
        if guided.reference is not None:
            state.h_score_reference[t][:t] = guided.reference.tolist()
            state.h_score_beats_reference[t][:t] = guided.beats_reference.tolist()
            state.h_score_related[t][:t] = guided.related.astype(float).tolist()
        if guided.embedding is None:
            return self._add_task(None)
        state.gamma[t] = guided.gamma
        state.consistency_ratio[t] = _nan_if_none(guided.consistency_ratio)
        state.h_embedding_rank_correlation[t] = _nan_if_none(guided.rank_correlation)
        state.h_embeddings[t] = guided.embedding.tolist()
        return self._add_task(guided.embedding)

    def _add_task(self, h_embedding: torch.Tensor | None) -> torch.Tensor | None:
        """Register the new task, starting at its H-embedding unless configured (or forced by "none") to start at
        random."""
        init = h_embedding
        if self.config.embedding_init == "random" or init is None:
            init = torch.randn(self.config.task_embedding_dim)
        self.model.add_task(init)
        return None if h_embedding is None else torch.as_tensor(h_embedding, dtype=torch.float32)

    def _train_task(self, t: int, task: Task, h_embedding: torch.Tensor | None, state: RunState) -> list[list[float]]:
        """Train task t; returns its learning curve, [step, test accuracy] pairs (``eval_curve_points``)."""
        args, accelerator = self.args, self.accelerator
        head = nn.Linear(self.reader.feature_dim(task), task.num_classes).to(accelerator.device)
        inherits = (
            h_embedding is not None
            and self.config.embedding_init == "h_embedding"
            and 1.0 in state.h_score_related[t][:t]
        )
        task_step = TaskStep(self.model, head, t, self.config, h_embedding, seed=args.seed, inherits=inherits)
        train_mode(self.model)
        optimizer = create_optimizer(task_step, args)
        loader = self.reader.loader(task, "train", augment=args.augment, shuffle=True, shard=False, seed=args.seed + t)
        total = math.ceil(len(loader) / args.gradient_accumulation_steps) * args.num_train_epochs
        if args.max_steps_per_task is not None:
            total = min(total, args.max_steps_per_task)
        step_module, optimizer, loader, scheduler = accelerator.prepare(
            task_step, optimizer, loader, cosine_schedule(optimizer, total)
        )

        try:
            curve = self._steps(t, task, head, total, step_module, optimizer, loader, scheduler, state)
        finally:
            task_step.release()
        accelerator.wait_for_everyone()
        head.requires_grad_(False)
        self.heads.append(head.eval())
        accelerator.free_memory(step_module, optimizer, loader, scheduler)
        self.model.eval()
        return curve

    def _steps(self, t: int, task: Task, head: nn.Linear, total: int, step_module, optimizer, loader, scheduler, state):
        """Task t's ``total`` optimizer steps, logged; returns the learning curve."""
        args, accelerator = self.args, self.accelerator
        bar = self.progress.bar(total=total, desc=f"task {t} ({task.name})", leave=False)
        curve_steps = {math.ceil(total * k / args.eval_curve_points) for k in range(1, args.eval_curve_points + 1)}
        # the guidance's loss and gradient at the first step and every tenth of the task
        guidance_steps = {1} | {math.ceil(total * k / GUIDANCE_POINTS) for k in range(1, GUIDANCE_POINTS + 1)}
        task_step = accelerator.unwrap_model(step_module)
        curve = []
        step = 0
        while step < total:
            for pixel_values, labels in loader:
                lr = optimizer.param_groups[0]["lr"]  # the hypernetwork's, for this step
                try:
                    loss, parts = training_step(
                        accelerator, step_module, optimizer, scheduler, pixel_values, labels, args.max_grad_norm
                    )
                except FloatingPointError as error:
                    raise FloatingPointError(
                        f"task {t} ({task.name}): {error} at step {step}; lower the learning rate or max_grad_norm. "
                        "The last checkpoint was left intact."
                    ) from None
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                if step % args.logging_steps == 0 or step == total:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    values = {"loss": loss.item()} | {k: v.item() for k, v in parts.items()}
                    self.progress.log_step(t, task, step, total, values, lr)
                if step in curve_steps:
                    curve.append([step, self.evaluator.task_accuracy(t, task, head)])
                if step in guidance_steps and (probe := task_step.guidance_probe()) is not None:
                    state.guidance[t].append([step, *probe])
                for callback in self.callbacks:
                    callback.on_step_end(self, t, step, state)
                if step >= total:
                    break
        bar.close()
        return curve

    def _update_frozen(self, t: int, frozen, offset: int) -> None:
        """Add task t's frozen training features to the router and the frozen-feature baselines."""
        features, labels = frozen
        if self.baselines is None:
            self.baselines = FrozenBaselines(features.shape[1], shrinkage=self.config.router_shrinkage)
        self.baselines.add_task(t, features.double().cpu(), labels.cpu() + offset)


class _HScoreSample(NamedTuple):
    indices: list[int]  # of the task's training images
    parts: list[list[int]]  # the indices in two parts: the screen and the rest
    prefix: FrozenPrefix  # their frozen prefix, kept from the frozen pass for the old tasks' reads


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


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
