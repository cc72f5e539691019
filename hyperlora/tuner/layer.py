"""HyperLoraLayer: a Linear or 1x1 Conv2d whose LoRA factors are generated, not stored.

The layer owns no adapter parameters. Before every forward the tuner (hyperlora.tuner.model) runs the hypernetwork once
for all layers and hands each layer its (A, B) and, for mixed-task batches, the sample -> task index; the layer only
applies them. That keeps generation to one batched hypernet call per forward instead of one per layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

# A (r, in) and B (out, r) of one task, or A (T, r, in) and B (T, out, r) of several with the sample -> row index
GeneratedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def supported_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a module HyperLoRA can adapt, None for any other module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module.out_channels, module.in_channels
    return None


class HyperLoraLayer(BaseTunerLayer, nn.Module):
    adapter_layer_names = ()
    other_param_names = ("module_index", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        if supported_shape(base_layer) is None:
            raise ValueError(f"HyperLoRA cannot adapt {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.out_features, self.in_features = supported_shape(base_layer)
        self.module_index: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._generated: dict[str, GeneratedWeights] = {}
        self._merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, module_index: int, scaling: float, lora_dropout: float) -> None:
        self.module_index[adapter_name] = module_index
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    # The tuner sets and clears the generated weights around each forward.
    def set_generated(self, adapter_name: str, weights: GeneratedWeights) -> None:
        self._generated[adapter_name] = weights

    def clear_generated(self) -> None:
        self._generated.clear()

    def _delta_weight(self, A: torch.Tensor, B: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = (B @ A) * self.scaling[adapter_name]
        if isinstance(self.base_layer, nn.Conv2d):
            delta = delta[:, :, None, None]
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the generated delta of the task the tuner selected into the base weight."""
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.module_index:
                continue  # another adapter's layer: this adapter does not target it
            if name not in self._generated:
                raise RuntimeError(
                    "HyperLoRA layers merge through the model: call model.merge_task(task_id) or merge_and_unload()"
                )
            A, B, _ = self._generated[name]
            if A.dim() != 2:
                raise ValueError("only a single task can be merged into the weights")
            A, B = A.detach(), B.detach()
            delta = self._delta_weight(A, B, name).to(weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or Infs detected while merging adapter {name!r}")
                weight.data = merged
            else:
                weight.data += delta
            self._merged_factors[name] = (A.clone(), B.clone())
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            A, B = self._merged_factors.pop(name)
            weight.data -= self._delta_weight(A, B, name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or (self.merged_adapters and not self._generated):
            return result  # merged: the base weight carries the task, nothing to look up (inference at base cost)
        for name in self.active_adapters:
            if name not in self.module_index:
                continue
            weights = self._generated.get(name)
            if weights is None:
                if name in self.merged_adapters:
                    continue
                raise RuntimeError(
                    "HyperLoRA weights are generated per forward by the HyperLoraModel: call the PEFT model, "
                    "not one of its layers"
                )
            A, B, index = weights
            if A.dtype != x.dtype or B.dtype != x.dtype:  # under autocast A and B can come out in different ones
                A, B = A.to(x.dtype), B.to(x.dtype)
            # the scaling goes on B (out x r), not on the (batch, ..., out) output: one pass less, both ways
            B = B * self.scaling[name]
            x_in = self.lora_dropout[name](x)
            if index is not None and index.shape[0] != x.shape[0]:
                raise ValueError(f"task_ids has {index.shape[0]} entries but the batch has {x.shape[0]} samples")
            if A.dim() == 2:
                result = self._add_single_task(result, x_in, A, B)
            else:
                result = result + self._per_sample(x_in, A.index_select(0, index), B.index_select(0, index))
        return result

    def _add_single_task(self, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Conv2d):
            base = self.base_layer
            hidden = F.conv2d(x, A[:, :, None, None], stride=base.stride, padding=base.padding)
            return result + F.conv2d(hidden, B[:, :, None, None])
        # LoRA's own operations (two linears and an add), so that a step costs what a LoRA step costs, op for op
        return result + F.linear(F.linear(x, A), B)

    def _per_sample(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # A: (N, r, in), B: (N, out, r), one factor pair per sample.
        if isinstance(self.base_layer, nn.Conv2d):
            base = self.base_layer
            if not isinstance(base.padding, str):  # "same" and "valid" are both zero padding for a 1x1 kernel
                pad_h, pad_w = base.padding
                x = F.pad(x, [pad_w, pad_w, pad_h, pad_h])
            x = x[:, :, :: base.stride[0], :: base.stride[1]]
            return torch.einsum("nor,nrhw->nohw", B, torch.einsum("nri,nihw->nrhw", A, x))
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __repr__(self) -> str:
        return "hyperlora." + super().__repr__()
