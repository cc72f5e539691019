"""HyperLoraModel: the PEFT tuner that owns the hypernetwork and feeds generated LoRA factors to its layers."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import HyperLoraConfig
from .hypernet import HypernetOutput, HyperNetwork
from .layer import HyperLoraLayer, supported_shape

TaskIds = int | Sequence[int] | torch.Tensor | None

TIMM_VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
TRANSFORMERS_VIT_TARGETS = [
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
]


def default_target_modules(model: nn.Module) -> list[str]:
    """The ViT projections of a timm or transformers 5.x ViT, recognised by their module names."""
    names = [name for name, _ in model.named_modules()]
    for targets in (TIMM_VIT_TARGETS, TRANSFORMERS_VIT_TARGETS):
        if any(name.endswith("." + targets[0]) for name in names):
            return list(targets)
    raise ValueError(
        f"HyperLoRA has no default target modules for {type(model).__name__}: pass "
        "HyperLoraConfig(target_modules=[...]) naming its nn.Linear or 1x1 nn.Conv2d layers"
    )


def _drop_task_ids(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs.pop("task_ids", None)
    return args, kwargs


class HyperLoraModel(BaseTuner):
    """Wraps a model so that every targeted layer gets a LoRA delta generated from the current task's embedding.

    Tasks live on the active adapter's hypernetwork: ``add_task`` appends an embedding, ``set_task`` picks the one
    used when a forward gets no ``task_ids``, and ``task_ids`` (one id per sample) mixes tasks in one batch.
    """

    prefix: str = "hyperlora_"
    tuner_layer_cls = HyperLoraLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {"vit": TRANSFORMERS_VIT_TARGETS}
    uses_shared_state = True

    # --- injection -----------------------------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: HyperLoraConfig = self.peft_config[adapter_name]
        if config.target_modules is None:
            config.target_modules = set(default_target_modules(model))
        if "hyperlora_hypernet" not in self._modules:
            self.hyperlora_hypernet = nn.ModuleDict()
            self._weight_cache: dict[str, tuple[tuple, HypernetOutput]] = {}
            self._given: tuple[str, HypernetOutput, dict[int, int]] | None = None  # see use_generated
            self._layers: list[HyperLoraLayer] = []
            # what PEFT is about to freeze, for _restore_base_model
            self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._num_targets = 0
        super().inject_adapter(model, adapter_name, **kwargs)

        self._layers = [m for m in model.modules() if isinstance(m, HyperLoraLayer)]
        adapted = sorted(
            (layer.module_index[adapter_name], layer) for layer in self._layers if adapter_name in layer.module_index
        )
        first_weight = adapted[0][1].get_base_layer().weight
        self.hyperlora_hypernet[adapter_name] = HyperNetwork(
            [(layer.out_features, layer.in_features) for _, layer in adapted],
            r=config.r,
            task_embedding_dim=config.task_embedding_dim,
            module_embedding_dim=config.module_embedding_dim,
            hidden_dim=config.hypernet_hidden_dim,
            num_layers=config.hypernet_num_layers,
        ).to(first_weight.device)
        self._update_trainable()

    def _create_and_replace(
        self,
        peft_config: HyperLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, HyperLoraLayer) else target
        if supported_shape(base) is None:
            detail = f"kernel {base.kernel_size}, groups {base.groups}" if isinstance(base, nn.Conv2d) else ""
            raise ValueError(
                f"HyperLoRA cannot adapt {current_key!r} ({type(base).__name__} {detail}".rstrip()
                + "): only nn.Linear and 1x1 nn.Conv2d layers with groups=1 are supported; "
                "change target_modules"
            )
        index, self._num_targets = self._num_targets, self._num_targets + 1
        if isinstance(target, HyperLoraLayer):
            target.update_layer(adapter_name, index, peft_config.scaling, peft_config.lora_dropout)
            return
        new_module = HyperLoraLayer(target)
        new_module.update_layer(adapter_name, index, peft_config.scaling, peft_config.lora_dropout)
        self._replace_module(parent, target_name, new_module, target)

    # --- tasks ---------------------------------------------------------------------------------------------------

    @property
    def hypernet(self) -> HyperNetwork:
        """The hypernetwork of the single active adapter."""
        if len(self.active_adapters) != 1:
            raise ValueError(f"task methods act on one adapter, {self.active_adapters} are active: set_adapter(name)")
        return self.hyperlora_hypernet[self.active_adapters[0]]

    @property
    def num_tasks(self) -> int:
        return self.hypernet.num_tasks

    @property
    def active_task(self) -> int | None:
        return self.hypernet.active_task

    def add_task(self, embedding: torch.Tensor | None = None) -> int:
        """Register a new task (random N(0, 1) embedding unless given), make it active and return its id."""
        hypernet = self.hypernet
        hypernet.active_task = hypernet.add_task(embedding)
        self._update_trainable()
        return hypernet.active_task

    def set_task(self, task_id: int) -> None:
        """Select the task used by forwards without ``task_ids``; only its embedding stays trainable."""
        hypernet = self.hypernet
        hypernet.active_task = hypernet.check_task(_scalar_task_id(task_id))
        self._update_trainable()

    def generate(self, task_ids: Sequence[int]) -> HypernetOutput:
        """Run the hypernetwork for the given tasks (differentiable): what the trainer's losses read."""
        hypernet = self.hypernet
        for task_id in task_ids:
            hypernet.check_task(task_id)
        return hypernet(hypernet.stacked_task_embeddings(task_ids))

    @contextmanager
    def use_generated(self, generated: HypernetOutput, task_ids: Sequence[int]) -> Iterator[None]:
        """Forwards inside take the active adapter's factors from ``generated`` (rows in ``task_ids`` order) instead
        of running the hypernetwork again: a training step whose losses also read generated weights runs it once."""
        self._given = (self.active_adapters[0], generated, {task: row for row, task in enumerate(task_ids)})
        try:
            yield
        finally:
            self._given = None

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.unmerge()
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._update_trainable(inference_mode)

    def _update_trainable(self, inference_mode: bool = False) -> None:
        # Old task embeddings stay frozen: only the hypernet, the module embeddings and the active task's
        # embedding of the active adapter train; nothing does in inference mode.
        for name, hypernet in self.hyperlora_hypernet.items():
            trainable = (
                name in self.active_adapters and not inference_mode and not self.peft_config[name].inference_mode
            )
            hypernet.requires_grad_(trainable)
            for task_id, embedding in enumerate(hypernet.task_embeddings):
                embedding.requires_grad_(trainable and task_id == hypernet.active_task)

    # --- forward -------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, task_ids: TaskIds = None, **kwargs: Any) -> Any:
        with self._task_weights(task_ids):
            return self.model(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # PeftModel.forward passes task_ids on to the base model: strip it there, after generating the weights.
        handle = self.model.register_forward_pre_hook(_drop_task_ids, with_kwargs=True)
        try:
            with self._task_weights(kwargs.get("task_ids")):
                yield
        finally:
            handle.remove()

    @contextmanager
    def _task_weights(self, task_ids: TaskIds) -> Iterator[None]:
        """Generate the requested tasks' factors once and hand each layer its own for the length of one forward."""
        handed_out = False
        try:
            for name in self.active_adapters:
                handed_out |= self._hand_out(name, self.hyperlora_hypernet[name], task_ids)
            yield
        finally:
            if handed_out:
                for layer in self._layers:
                    layer.clear_generated()

    def _hand_out(self, name: str, hypernet: HyperNetwork, task_ids: TaskIds) -> bool:
        """Hand each layer its factors; False when the merged weights already carry the task (nothing handed)."""
        tasks, ids = _resolve_task_ids(hypernet, task_ids)
        if hypernet.merged_task is not None:
            if tasks == [hypernet.merged_task]:
                return False
            raise ValueError(
                f"task {hypernet.merged_task} is merged into the weights; call unmerge() before running task(s) {tasks}"
            )
        out, rows = self._factors(name, hypernet, tasks)
        index = None
        if len(tasks) == 1:
            A, B = out.task_factors(rows[tasks[0]])
            if ids is not None:  # still handed out so that the layers can check the batch size
                index = torch.zeros_like(ids)
        else:
            A, B = out.A, out.B
            lookup = torch.full((hypernet.num_tasks,), -1, dtype=torch.long)
            lookup[list(rows)] = torch.tensor(list(rows.values()))
            index = lookup[ids]
        if index is not None:
            index = index.to(A[0].device)
        for layer in self._layers:
            m = layer.module_index.get(name)
            if m is not None:
                layer.set_generated(name, (A[m], B[m], index))
        return True

    def _factors(self, name: str, hypernet: HyperNetwork, tasks: list[int]) -> tuple[HypernetOutput, dict[int, int]]:
        """Fresh (differentiable) factors while training; all tasks once, cached until a parameter changes, else.
        Returns them with the row of each task."""
        if self._given is not None and self._given[0] == name and all(task in self._given[2] for task in tasks):
            _, out, rows = self._given
            return out, rows
        building_graph = torch.is_grad_enabled() and any(p.requires_grad for p in hypernet.parameters())
        if building_graph:
            return hypernet(hypernet.stacked_task_embeddings(tasks)), {task: row for row, task in enumerate(tasks)}
        key = hypernet.version()
        cached = self._weight_cache.get(name)
        if cached is None or cached[0] != key:
            # in full precision whatever the caller's autocast: the cache also serves full-precision reads
            embeddings = hypernet.stacked_task_embeddings().detach()
            with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
                cached = (key, hypernet(embeddings))
            self._weight_cache[name] = cached
        return cached[1], {task: task for task in range(hypernet.num_tasks)}

    # --- merging -------------------------------------------------------------------------------------------------

    def merge_task(self, task_id: int, safe_merge: bool = False) -> None:
        """Fold a task's generated delta into the base weights (and make it active): inference at the base cost."""
        hypernet = self.hypernet
        task_id = hypernet.check_task(_scalar_task_id(task_id))
        self.unmerge()
        with torch.no_grad(), self._task_weights(task_id):
            for layer in self._layers:
                layer.merge(safe_merge=safe_merge)
        hypernet.merged_task = task_id
        self.set_task(task_id)

    def unmerge(self) -> None:
        """Undo merge_task (no-op when nothing is merged)."""
        for layer in self._layers:
            layer.unmerge()
        for hypernet in self.hyperlora_hypernet.values():
            hypernet.merged_task = None

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.merge_task(self._require_active_task(), safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge and self.hypernet.merged_task is None:
            self.merge_task(self._require_active_task(), safe_merge=safe_merge)
        if not merge:
            self.unmerge()
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _require_active_task(self) -> int:
        if self.hypernet.active_task is None:
            raise ValueError("no task to merge: call add_task() first")
        return self.hypernet.active_task

    # --- saving and loading --------------------------------------------------------------------------------------

    def _restore_base_model(self) -> None:
        """Undo the injection, so that a load that fails leaves the caller's base model as it was: its own layers,
        its requires_grad flags, no ``peft_config`` attribute."""
        base = self._unload_and_optionally_merge(merge=False)
        for name, param in base.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, param.requires_grad))
        base.__dict__.pop("peft_config", None)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{cls.prefix}hypernet.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.prefix}hypernet.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: HyperLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        tuner = next(m for m in model.modules() if isinstance(m, cls))
        hypernet = tuner.hyperlora_hypernet[adapter_name]
        task_key = re.compile(rf"{cls.prefix}hypernet\.task_embeddings\.(\d+)$")
        saved_tasks = [int(match.group(1)) for key in state_dict if (match := task_key.search(key))]
        hypernet.resize_tasks(max(saved_tasks, default=-1) + 1)
        if hypernet.active_task is None and hypernet.num_tasks:
            hypernet.active_task = hypernet.num_tasks - 1
        tuner._update_trainable()

        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {k: v.shape for k, v in model.state_dict().items() if f".{cls.prefix}hypernet.{adapter_name}." in k}
        found = {k: v.shape for k, v in remapped.items() if f".{cls.prefix}hypernet.{adapter_name}." in k}
        problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
        problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
        problems += [
            f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
            for k in sorted(expected.keys() & found.keys())
            if found[k] != expected[k]
        ]
        if problems:
            fields = _differing_shape_fields(found, expected, f".{cls.prefix}hypernet.{adapter_name}.")
            if list(tuner.peft_config) == [adapter_name]:  # PeftModel.from_pretrained injected it just now
                tuner._restore_base_model()
            raise ValueError(
                "this HyperLoRA checkpoint does not fit the model: it was saved with a different config "
                "(r, embedding sizes, hypernet width/depth, target_modules) or base model. "
                + (f"Differing config keys: {'; '.join(fields)}. " if fields else "")
                + "; ".join(problems[:8])
                + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            )
        return remapped


def tuned_model(model: nn.Module) -> HyperLoraModel:
    """The HyperLoraModel of a PeftModel (or the HyperLoraModel itself)."""
    if isinstance(model, HyperLoraModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, HyperLoraModel):
        return base
    raise TypeError(f"expected a PeftModel with a HyperLoRA adapter or a HyperLoraModel, got {type(model).__name__}")


def _shape_fields(shapes: dict[str, torch.Size], marker: str) -> dict[str, object]:
    """The config values a hypernetwork state dict's shapes imply (what can be read off a checkpoint)."""
    by_name = {key.split(marker, 1)[1]: shape for key, shape in shapes.items() if marker in key}
    implied: dict[str, object] = {}
    if "module_embeddings" in by_name:
        implied["target_modules (number of adapted modules)"], implied["module_embedding_dim"] = by_name[
            "module_embeddings"
        ]
    trunk = sorted(int(name.split(".")[1]) for name in by_name if re.fullmatch(r"trunk\.\d+\.weight", name))
    implied["hypernet_num_layers"] = len(trunk)
    if trunk:
        hidden, width = by_name[f"trunk.{trunk[0]}.weight"]
        implied["hypernet_hidden_dim"] = hidden
        if "module_embedding_dim" in implied:
            implied["task_embedding_dim"] = width - implied["module_embedding_dim"]
    heads = {name: shape for name, shape in by_name.items() if re.fullmatch(r"heads\.\d+x\d+\.weight", name)}
    implied["weight shapes of the adapted modules"] = sorted(name.split(".")[1] for name in heads)
    for name, shape in heads.items():
        out_features, in_features = map(int, name.split(".")[1].split("x"))
        implied["r"] = shape[0] // (out_features + in_features)
    return implied


def _differing_shape_fields(found: dict, expected: dict, marker: str) -> list[str]:
    """'key: checkpoint X vs model Y' for every config value the checkpoint's shapes contradict."""
    saved, model = _shape_fields(found, marker), _shape_fields(expected, marker)
    return [f"{k} (checkpoint {saved[k]}, model {model[k]})" for k in saved if k in model and saved[k] != model[k]]


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _scalar_task_id(task_id: Any) -> Any:
    """A numpy integer or a 0-d integer tensor as the int it holds (as forward's task_ids take them); anything else
    unchanged, for check_task to accept or refuse."""
    integer_tensor = isinstance(task_id, torch.Tensor) and task_id.ndim == 0 and task_id.dtype in _INTEGER_DTYPES
    return int(task_id) if isinstance(task_id, np.integer) or integer_tensor else task_id


def _resolve_task_ids(hypernet: HyperNetwork, task_ids: TaskIds) -> tuple[list[int], torch.Tensor | None]:
    """(distinct tasks, per-sample ids or None when the caller gave none), validated."""
    if task_ids is None:
        if hypernet.active_task is None:
            raise ValueError("no task yet: call add_task() before running the model")
        return [hypernet.active_task], None
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        return [hypernet.check_task(task_ids)], None
    try:
        ids = torch.as_tensor(task_ids)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # None entries, strings, sets, ints beyond int64
        if isinstance(task_ids, list | tuple) and all(type(t) is int for t in task_ids):
            for task_id in task_ids:
                hypernet.check_task(task_id)  # a flat list of ints: one of them is beyond int64, an unknown id
        raise TypeError(
            "task_ids must be an int, a sequence of ints or an integer tensor (one id per sample), "
            f"got {type(task_ids).__name__} {task_ids!r:.80}"
        ) from None
    if ids.numel() == 0:  # checked first: torch.as_tensor([]) is float32, which is not the caller's mistake
        raise ValueError(f"task_ids must be 1-D with one task id per sample, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"task_ids must hold integers (torch.long), got {ids.dtype}")
    if ids.ndim == 0:  # a scalar tensor or numpy integer: one task for the whole batch
        return [hypernet.check_task(int(ids))], None
    if ids.ndim != 1:
        raise ValueError(f"task_ids must be 1-D with one task id per sample, got shape {tuple(ids.shape)}")
    tasks = torch.unique(ids).tolist()
    for task_id in tasks:
        hypernet.check_task(int(task_id))
    return tasks, ids.long().cpu()
