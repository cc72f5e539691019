"""What a run tells: progress bars on a terminal and flushed log lines elsewhere, tracker logs, metrics.json and
embeddings.json, the final artifacts and plots, and the summary table printed at the end."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from ..data import Task
from ..evaluation import plots
from ..evaluation.baselines import FrozenBaselines
from ..evaluation.metrics import METRIC_KEYS, continual_metrics
from ..files import atomic_directory, atomic_write_json
from ..tuner import HyperLoraConfig
from .checkpointing import save_artifacts
from .state import FROZEN_CLASS_INCREMENTAL, RunState


class Progress:
    """Progress of a run, shown by the main process: bars on a terminal, log lines otherwise."""

    def __init__(self, accelerator: Accelerator, report_to: str | None) -> None:
        self.accelerator, self.report_to = accelerator, report_to

    @property
    def log_steps(self) -> bool:
        """Step log lines when no progress bar shows them: stderr not a terminal (tqdm is off) or stdout sent to a
        file (SLURM, ``> log``)."""
        return not (sys.stdout.isatty() and sys.stderr.isatty())

    def print(self, line: str) -> None:
        """A log line on stdout, from the main process only, flushed at once (a SLURM log is read while it runs)."""
        if self.accelerator.is_main_process:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def bar(self, **kwargs) -> tqdm:
        quiet = not self.accelerator.is_local_main_process or not sys.stderr.isatty()
        return tqdm(disable=quiet, dynamic_ncols=True, **kwargs)

    def log_step(self, t: int, task: Task, step: int, total: int, values: dict[str, float], lr: float) -> None:
        """A training step's loss and its parts, to the trackers and (without a progress bar) as a log line."""
        if self.report_to:
            logs = {f"train/{k}": v for k, v in values.items()} | {"train/learning_rate": lr, "task": t}
            self.accelerator.log(logs, step=tracker_step(t, step))
        if self.log_steps:
            detail = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "loss")
            self.print(f"task {t} ({task.name}) step {step}/{total}: loss {values['loss']:.4f} ({detail}), lr {lr:.2e}")

    def task_done(self, t: int, tasks: Sequence[Task], state: RunState) -> float:
        """Task t's results to the trackers and as a log line; returns its task-IL accuracy over the seen tasks."""
        accuracy = float(np.mean(state.task_il[t][: t + 1]))
        seen, routed = state.seen_class_accuracy[t], state.router_task_accuracy[t]
        if self.report_to:
            values = {"task_il_accuracy": accuracy, "class_il_accuracy": seen, "router_task_accuracy": routed}
            logs = {f"eval/{k}": v for k, v in values.items()} | {"task": t}
            self.accelerator.log(logs, step=tracker_step(t + 1, 0))
        timings = {k.removesuffix("_s").replace("_", "-"): v[t] for k, v in state.timings.items()}
        self.print(
            f"task {t} ({tasks[t].name}) done, {t + 1} of {len(tasks)}: task-IL accuracy {accuracy:.4f} over the "
            f"seen tasks, class-IL {seen:.4f}, router {routed:.4f}; "
            + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        )
        return accuracy


def run_results(state: RunState, config: HyperLoraConfig) -> dict[str, Any]:
    # Accuracies of seen tasks only: the FWT probe's nearest-class-mean accuracy of task t+1 (which checkpoints of
    # older versions kept at R[t][t+1]) is no head's accuracy; FWT reads it from fwt_start.
    til = [[v if j <= i else math.nan for j, v in enumerate(row)] for i, row in enumerate(state.task_il)]
    cil = np.array(state.class_il, dtype=float)
    baseline = state.fwt_baseline if len(state.task_names) > 1 else None
    results = continual_metrics(til, baseline=baseline, start=state.fwt_start)
    results["accuracy_matrix"] = til
    class_il = continual_metrics(np.where(np.tril(np.ones_like(cil)) > 0, cil, np.nan))
    class_il["fwt"] = None  # a class-incremental model has no head for a task it has not seen
    class_il["accuracy_matrix"] = state.class_il
    class_il["seen_class_accuracy"] = state.seen_class_accuracy
    class_il["final_accuracy"] = state.seen_class_accuracy[-1]
    class_il["router_task_accuracy"] = state.router_task_accuracy
    class_il["router"] = config.router
    results["class_incremental"] = class_il
    probes = state.frozen_linear_probe
    results["frozen_baselines"] = {
        "linear_probe": float(np.nanmean(probes)),
        **{name: state.frozen_class_il[name][-1] for name in FROZEN_CLASS_INCREMENTAL},
        "linear_probe_per_task": probes,
        **{f"{name}_per_step": state.frozen_class_il[name] for name in FROZEN_CLASS_INCREMENTAL},
    }
    results.update(
        task_names=state.task_names,
        h_scores=state.h_scores,
        h_score_reference=state.h_score_reference,
        h_score_beats_reference=state.h_score_beats_reference,
        h_score_related=state.h_score_related,
        h_score_features=config.h_score_features,
        consistency_ratio=state.consistency_ratio,
        gamma=state.gamma,
        h_embedding_rank_correlation=state.h_embedding_rank_correlation,
        learning_curves=state.learning_curves,
        guidance=state.guidance,
        fwt_start=state.fwt_start,
        fwt_baseline=state.fwt_baseline,
        evaluated_samples=state.evaluated_samples,
        timings=state.timings,
        num_tasks=len(state.task_names),
    )
    return results


def write_outputs(
    output_dir: Path,
    state: RunState,
    results: dict[str, Any],
    model: PeftModel,
    heads: nn.ModuleList,
    baselines: FrozenBaselines,
    plot: bool,
) -> None:
    """metrics.json, embeddings.json, final/ and the plots (main process only)."""
    out = output_dir
    atomic_write_json(out / "metrics.json", results)
    embeddings = model.base_model.hypernet.stacked_task_embeddings().detach().cpu()
    atomic_write_json(
        out / "embeddings.json",
        {
            "task_names": state.task_names,
            "embeddings": embeddings.tolist(),
            "h_embeddings": state.h_embeddings,
            "h_scores": state.h_scores,
            "consistency_ratio": state.consistency_ratio,
            "gamma": state.gamma,
            "h_embedding_rank_correlation": state.h_embedding_rank_correlation,
        },
    )
    with atomic_directory(out / "final") as tmp:
        save_artifacts(tmp, model, heads, baselines)
    if plot:
        names = state.task_names
        plots.plot_accuracy_matrix(
            results["accuracy_matrix"],
            out / "accuracy_matrix.png",
            title="Task-incremental accuracy",
            task_names=names,
        )
        plots.plot_accuracy_matrix(
            state.class_il,
            out / "accuracy_matrix_class_incremental.png",
            title="Class-incremental accuracy",
            task_names=names,
        )
        plots.plot_h_scores(state.h_scores, out / "h_scores.png", task_names=names)
        plots.plot_embeddings(embeddings.numpy(), out / "embeddings.png", task_names=names)


def tracker_step(t: int, step: int) -> int:
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
