"""Evaluation after each task: rows of the task-IL and class-IL accuracy matrices, the router's task-id accuracy,
the frozen-feature baselines on the same test images, and the forward-transfer probe before a task trains."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import Task
from ..evaluation.baselines import FrozenBaselines
from ..method.router import entropy_route
from ..tuner import HyperLoraConfig
from .features import FeatureReader
from .state import FROZEN_CLASS_INCREMENTAL, RunState
from .step import train_mode

# Training images per class (on average) whose features give the forward-transfer probe its class means.
FWT_PROBE_PER_CLASS = 64


class Evaluator:
    """Accuracies of the model's tasks, through their heads; ``offsets[j]`` is task j's first global class."""

    def __init__(self, reader: FeatureReader, heads: nn.ModuleList, config: HyperLoraConfig, offsets: list[int]):
        self.reader, self.heads, self.config, self.offsets = reader, heads, config, offsets

    def task_accuracy(self, t: int, task: Task, head: nn.Module) -> float:
        """Task t's test accuracy now, in the middle of its training (which resumes in train mode)."""
        self.reader.model.eval()
        hits = count = 0
        with torch.no_grad():
            for pixel_values, labels in self.reader.loader(task, "test"):
                predicted = head(self.reader.forward(pixel_values, t)).argmax(-1)
                predicted, labels = self.reader.accelerator.gather_for_metrics((predicted, labels))
                hits, count = hits + (predicted == labels).sum().item(), count + labels.numel()
        train_mode(self.reader.model)
        return hits / count

    def evaluate(self, t: int, tasks: Sequence[Task], state: RunState, baselines: FrozenBaselines) -> None:
        """Row t of the task-IL and class-IL accuracy matrices, the router's task-id accuracy, the frozen baselines on
        the same images, and the FWT probe."""
        correct_all, routed_all, count_all = 0, 0, 0
        frozen_all = dict.fromkeys(FROZEN_CLASS_INCREMENTAL, 0)
        device = self.reader.accelerator.device
        for j in range(t + 1):
            loader = self.reader.loader(tasks[j], "test")
            hits_til, hits_cil, hits_route, hits_probe, n = 0, 0, 0, 0, 0
            with torch.no_grad():
                for b, (pixel_values, labels) in enumerate(loader):
                    frozen = self.reader.frozen_test_batch(j, b, pixel_values)
                    features = self.reader.forward(pixel_values, j)
                    local = self.heads[j](features).argmax(-1)
                    routed_task, predicted = self._class_incremental(pixel_values, frozen, t, j, features, baselines)
                    probe = baselines.probe_predict(j, frozen).to(device)
                    guesses = baselines.predict(frozen)
                    baseline = [guesses[name].to(device) for name in FROZEN_CLASS_INCREMENTAL]
                    local, labels, routed_task, predicted, probe, *baseline = (
                        self.reader.accelerator.gather_for_metrics(
                            (local, labels, routed_task, predicted, probe, *baseline)
                        )
                    )
                    hits_til += (local == labels).sum().item()
                    hits_cil += (predicted == labels + self.offsets[j]).sum().item()
                    hits_route += (routed_task == j).sum().item()
                    hits_probe += (probe == labels + self.offsets[j]).sum().item()
                    for name, guess in zip(FROZEN_CLASS_INCREMENTAL, baseline, strict=True):
                        frozen_all[name] += (guess == labels + self.offsets[j]).sum().item()
                    n += labels.numel()
            state.evaluated_samples[j] = n
            state.task_il[t][j] = hits_til / n
            state.class_il[t][j] = hits_cil / n
            state.frozen_linear_probe[j] = hits_probe / n
            correct_all, routed_all, count_all = correct_all + hits_cil, routed_all + hits_route, count_all + n
        state.seen_class_accuracy[t] = correct_all / count_all
        state.router_task_accuracy[t] = routed_all / count_all
        for name, hits in frozen_all.items():
            state.frozen_class_il[name][t] = hits / count_all

    def _class_incremental(
        self,
        pixel_values: torch.Tensor,
        frozen: torch.Tensor,
        t: int,
        j: int,
        features_j: torch.Tensor,
        baselines: FrozenBaselines,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each sample to a task, then let that task's adapter and head name the (global) class. The batch comes
        from task j's test set and ``features_j`` are its features under j's adapter: only samples routed elsewhere
        need another forward."""
        if self.config.router == "gaussian":
            _, routed = baselines.lda.predict(frozen.double().cpu())
            routed = routed.to(pixel_values.device)
        else:
            logits = [
                self.heads[i](features_j if i == j else self.reader.forward(pixel_values, i)) for i in range(t + 1)
            ]
            routed = entropy_route(logits)
        features = features_j.clone()
        elsewhere = routed != j
        if elsewhere.any():
            features[elsewhere] = self.reader.forward(pixel_values[elsewhere], routed[elsewhere])
        predicted = torch.empty_like(routed)
        for task_id in routed.unique().tolist():
            mask = routed == task_id
            predicted[mask] = self.heads[task_id](features[mask]).argmax(-1) + self.offsets[task_id]
        return routed, predicted

    def forward_transfer_probe(self, t: int, task: Task, frozen, state: RunState, seed: int = 0) -> None:
        """FWT's R[t-1][t] and b_t, before task t trains: nearest-class-mean accuracy on task t of the features under
        task t-1's adapter (the model after task t-1) and of the untrained backbone. The class means come from a
        seeded sample of ``FWT_PROBE_PER_CLASS`` training images per class on average (a mean needs few; every image
        more is a forward pass more). The frozen training features are the ones every task computes anyway, and the
        frozen test features land in the evaluation's cache."""
        self.reader.model.eval()
        k = min(len(task.train), FWT_PROBE_PER_CLASS * task.num_classes)
        sample = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))[:k]
        train = {
            "fwt_baseline": (frozen[0][sample.to(frozen[0].device)], frozen[1][sample.to(frozen[1].device)]),
            "fwt_start": self.reader.features(self.reader.loader(task, "train", indices=sample.tolist()), t - 1),
        }
        test = {"fwt_baseline": [], "fwt_start": [], "labels": []}
        with torch.no_grad():
            for b, (pixel_values, labels) in enumerate(self.reader.loader(task, "test")):
                frozen_b = self.reader.frozen_test_batch(t, b, pixel_values)
                batch = self.reader.accelerator.gather_for_metrics(
                    (frozen_b, self.reader.forward(pixel_values, t - 1), labels)
                )
                for key, value in zip(test, batch, strict=True):
                    test[key].append(value)
        test_labels = torch.cat(test["labels"])
        for key, (features, labels) in train.items():
            means = torch.stack([features[labels == c].mean(0) for c in range(task.num_classes)])
            predicted = torch.cdist(torch.cat(test[key]).float(), means.float()).argmin(-1)
            getattr(state, key)[t] = (predicted == test_labels).float().mean().item()
