"""One training step of a task: the loss of ALGORITHM.md (cross-entropy + output regulariser + embedding guidance),
the optimizer over what the task trains, and the clipped update.

Public so that benchmarks time the step the trainer takes, not a copy of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from torch import nn

from ..data import pooled_features
from ..method.losses import flat_outputs, guidance_loss, guidance_weight, output_regulariser, relation_targets
from ..tuner import HyperLoraConfig
from .arguments import ContinualTrainingArguments


def train_mode(model: nn.Module) -> None:
    """Train mode, except that batch-norm layers keep using (and not updating) their running statistics: the
    backbone is frozen, statistics included, or old tasks and the router would drift."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class TaskStep(nn.Module):
    """Everything one training step of task ``t`` computes, in one module so that DDP sees a single forward.

    Built when task t starts: it records the old tasks' generated weights (what the regulariser holds and the guidance
    compares with), the relations of the H-embedding's weights to them (the guidance's targets), and protects the
    hypernetwork heads' directions that produce them (``HyperNetwork.protect_tasks``; ``release`` ends it). A task that
    ``inherits`` (starts near a related old task) trains only its embedding and the heads' free part
    (``inherit_in_free_part``).
    """

    def __init__(
        self,
        model: PeftModel,
        head: nn.Linear,
        t: int,
        config: HyperLoraConfig,
        h_embedding: torch.Tensor | None = None,
        seed: int = 0,
        inherits: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.head, self.t, self.config = model, head, t, config
        tuner = model.base_model
        self.beta_emb = guidance_weight(t, config.beta_emb_slope)
        guided = h_embedding is not None and self.beta_emb > 0
        self.old_outputs = self.kappa = None  # the old tasks' flat_outputs (t, total); the guidance's targets (t,)
        if t > 0 and (config.beta_reg > 0 or guided):
            with torch.no_grad():
                self.old_outputs = flat_outputs(tuner.generate(list(range(t)))).float()
                if guided:
                    h_output = tuner.hypernet(h_embedding.to(head.weight.device, torch.float32)[None])
                    self.kappa = relation_targets(h_output, self.old_outputs)
        hypernet = tuner.hypernet
        # Inheriting, the trunk and module embeddings stay fixed: the old tasks' activations cannot move, nor (through
        # the protected heads) their generated weights, and the new task learns in the free part at a LoRA's pace.
        in_free_part = t > 0 and inherits and config.inherit_in_free_part and config.head_projection
        if t > 0 and config.head_projection:  # the heads train only where the old tasks' activations are not
            hypernet.protect_tasks(range(t), pace_task=t if config.free_pace or in_free_part else None)
        trunk = (*hypernet.trunk.parameters(), hypernet.module_embeddings)
        self.fixed = [p for p in trunk if p.requires_grad] if in_free_part else []
        for p in self.fixed:
            p.requires_grad_(False)
        self.reg_generator = torch.Generator().manual_seed(seed + 7919 * (t + 1))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss, and its parts (detached) for the logs."""
        sampled = []
        if self.old_outputs is not None:  # a subset, so that the cost does not grow with the number of tasks
            sampled = torch.randperm(self.t, generator=self.reg_generator)[: self.config.reg_max_tasks].tolist()
        regularised = sampled and self.config.beta_reg > 0
        # one hypernetwork pass serves the forward (task t, last row) and the regulariser (the sampled old tasks)
        tuner = self.model.base_model
        out = tuner.generate([*sampled, self.t] if regularised else [self.t])
        old, current = out.split_tasks(len(sampled)) if regularised else (None, out)
        with tuner.use_generated(current, [self.t]):
            logits = self.head(pooled_features(self.model(pixel_values)))
        ce = F.cross_entropy(logits.float(), labels)
        losses = {"ce": ce}
        if regularised:
            losses["reg"] = output_regulariser(old, sampled, self.old_outputs)
        if self.kappa is not None:
            losses["emb"] = self._guidance(current, sampled)
        loss = ce + self.config.beta_reg * losses.get("reg", 0.0) + self.beta_emb * losses.get("emb", 0.0)
        return loss, {k: v.detach() for k, v in losses.items()}

    def _guidance(self, current, rows: list[int]) -> torch.Tensor:
        index = torch.as_tensor(rows, device=self.kappa.device)
        return guidance_loss(current, self.old_outputs.index_select(0, index), self.kappa.index_select(0, index))

    def guidance_probe(self) -> tuple[float, float] | None:
        """The guidance loss now, over every old task, and the norm of its weighted gradient on the hypernetwork (task
        embedding included), without touching any ``.grad``: logged over the task, so that a guidance that stops
        acting is seen to. None when the task has no guidance."""
        if self.kappa is None:
            return None
        hypernet = self.model.base_model.hypernet
        loss = self._guidance(self.model.base_model.generate([self.t]), list(range(self.t)))
        params = [p for p in hypernet.parameters() if p.requires_grad]
        grads = [g for g in torch.autograd.grad(self.beta_emb * loss, params, allow_unused=True) if g is not None]
        return loss.item(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    def release(self) -> None:
        """The task is trained: its heads' free parts go back into their weights, and a fixed trunk trains again."""
        self.model.base_model.hypernet.release_tasks()
        for p in self.fixed:
            p.requires_grad_(True)


def create_optimizer(step: TaskStep, args: ContinualTrainingArguments) -> torch.optim.AdamW:
    """AdamW over the hypernetwork (but old task embeddings), the new task's embedding and its head, at their learning
    rates: one parameter group per distinct rate, so that each costs one fused update."""
    hypernet = step.model.base_model.hypernet
    embedding = hypernet.task_embeddings[step.t]
    trained = [p for p in hypernet.parameters() if p.requires_grad and p is not embedding]
    rates = {}  # learning rate -> parameters: one group per distinct rate, first the hypernetwork's (logged)
    for params, lr in (
        (trained, args.learning_rate),
        ([embedding], args.embedding_learning_rate or args.learning_rate),
        (list(step.head.parameters()), args.head_learning_rate),
    ):
        rates.setdefault(lr, []).extend(params)
    # fused: one kernel per group over all its parameters, which matters for the hypernet's few large head matrices
    fused = step.head.weight.device.type in ("cpu", "cuda")
    groups = [{"params": params, "lr": lr} for lr, params in rates.items()]
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=fused)


def training_step(
    accelerator: Accelerator,
    step: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch of a prepared ``TaskStep``: forward, backward, and (when gradients sync) the clipped optimizer
    step. Raises FloatingPointError on a non-finite loss, before it touches any weight."""
    with accelerator.accumulate(step):
        loss, parts = step(pixel_values, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()}")
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm:
            # what the optimizer updates, not every parameter of the frozen backbone
            trained = [p for group in optimizer.param_groups for p in group["params"]]
            accelerator.clip_grad_norm_(trained, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss, parts
