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
from ..method.losses import GuidanceDecoder, flat_outputs, guidance_loss, guidance_weight, output_regulariser
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

    Built when task t starts: it records the old tasks' generated weights (the regulariser's targets), protects the
    hypernetwork heads' directions that produce them (``HyperNetwork.protect_tasks``; ``release`` ends it), and
    makes a fresh guidance decoder when the task has an H-embedding to be guided by.
    """

    def __init__(
        self,
        model: PeftModel,
        head: nn.Linear,
        t: int,
        config: HyperLoraConfig,
        h_embedding: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model, self.head, self.t, self.config = model, head, t, config
        tuner = model.base_model
        self.reg_targets = None  # the old tasks' generated factors, (t, total)
        if t > 0 and config.beta_reg > 0:
            with torch.no_grad():
                self.reg_targets = flat_outputs(tuner.generate(list(range(t))))
        self.beta_emb = guidance_weight(t, config.beta_emb_slope)
        self.decoder = self.h_embedding = None
        if h_embedding is not None and self.beta_emb > 0:
            self.decoder = GuidanceDecoder(
                config.hypernet_hidden_dim, config.task_embedding_dim, config.decoder_hidden_dim
            )
            self.decoder.to(head.weight.device)
            self.h_embedding = h_embedding.to(head.weight.device)
        if t > 0 and config.head_projection:  # the heads train only where the old tasks' activations are not
            tuner.hypernet.protect_tasks(range(t))
        self.reg_generator = torch.Generator().manual_seed(seed + 7919 * (t + 1))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss, and its parts (detached) for the logs."""
        reg_tasks = []
        if self.reg_targets is not None:  # a subset, so that the cost does not grow with the number of tasks
            reg_tasks = torch.randperm(self.t, generator=self.reg_generator)[: self.config.reg_max_tasks].tolist()
        # one hypernetwork pass serves the forward (task t, last row) and the losses (the sampled old tasks)
        tasks = [*reg_tasks, self.t]
        tuner = self.model.base_model
        out = tuner.generate(tasks)
        old, current = out.split_tasks(len(reg_tasks)) if reg_tasks else (None, out)
        with tuner.use_generated(current, [self.t]):
            logits = self.head(pooled_features(self.model(pixel_values)))
        ce = F.cross_entropy(logits.float(), labels)
        losses = {"ce": ce}
        if reg_tasks:
            losses["reg"] = output_regulariser(old, reg_tasks, self.reg_targets)
        if self.decoder is not None:
            losses["emb"] = guidance_loss(self.decoder, current.hidden.float(), self.h_embedding)
        loss = ce + self.config.beta_reg * losses.get("reg", 0.0) + self.beta_emb * losses.get("emb", 0.0)
        return loss, {k: v.detach() for k, v in losses.items()}

    def guidance_probe(self) -> tuple[float, float] | None:
        """The guidance loss now and the norm of its weighted gradient on the hypernetwork, without touching any
        ``.grad``: logged over the task, so that a guidance its own fresh decoder satisfies is seen to stop acting.
        None when the task has no guidance."""
        if self.decoder is None:
            return None
        hypernet = self.model.base_model.hypernet
        hidden = hypernet.hidden(hypernet.stacked_task_embeddings([self.t])).float()
        loss = guidance_loss(self.decoder, hidden, self.h_embedding)
        params = [p for p in hypernet.parameters() if p.requires_grad]
        grads = [g for g in torch.autograd.grad(self.beta_emb * loss, params, allow_unused=True) if g is not None]
        return loss.item(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    def release(self) -> None:
        """The task is trained: its heads' free parts go back into their weights."""
        self.model.base_model.hypernet.release_tasks()


def create_optimizer(step: TaskStep, args: ContinualTrainingArguments) -> torch.optim.AdamW:
    """AdamW over the hypernetwork (but old task embeddings), the new task's embedding, its head and the decoder, at
    their learning rates: one parameter group per distinct rate, so that each costs one fused update."""
    hypernet = step.model.base_model.hypernet
    embedding = hypernet.task_embeddings[step.t]
    decoder = [] if step.decoder is None else list(step.decoder.parameters())
    trained = [p for p in hypernet.parameters() if p.requires_grad and p is not embedding] + decoder
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
