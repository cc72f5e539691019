"""The frozen prefix: the blocks that finish before the first adapted module starts give the same activations under
every task's adapter, so scoring many old tasks on the same images (transferability's "head" and "pooled") runs them
once and each old task only through its adapted suffix."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from ..tuner.layer import HyperLoraLayer


def _chain(model: nn.Module) -> nn.Sequential | nn.ModuleList | None:
    """The outermost ModuleList / Sequential around the first adapted module: the backbone's blocks."""
    adapted = next((name for name, module in model.named_modules() if isinstance(module, HyperLoraLayer)), None)
    if adapted is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and adapted.startswith(name + ".") and len(module) > 1:
            return module
    return None


class FrozenPrefix:
    """Replays, for every batch it has seen, the output of the blocks before the first adapted module.

    The prefix is read off the first pass (hooks): the blocks of the chain (``_chain``) that have finished when the
    first adapted module starts, whatever the model's forward does around them. The first replay is checked against
    that full pass; a model whose blocks do not form a chain, or whose first block is adapted, gets full passes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = _chain(model)
        self.cut: int | None = None if self.blocks is not None else 0  # prefix length; None until the first pass
        self._outputs: dict[Hashable, Any] = {}  # batch -> the last prefix block's output

    def __call__(self, batch: Hashable, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()``: one forward pass of batch ``batch`` under some adapter. The first pass of a batch is a full one
        and keeps its prefix; later passes of the batch replay it."""
        if self.cut == 0:
            return run()
        if batch in self._outputs:
            return self._replay(self._outputs[batch], run)
        out, cut, captured = self._capture(run)
        if self.cut is None:
            replayed = self._replay(captured, run, cut) if cut else None
            self.cut = cut if replayed is not None and torch.allclose(replayed, out, rtol=1e-4, atol=1e-5) else 0
        if self.cut:
            self._outputs[batch] = captured
        return out

    def part(self, name: Hashable) -> Callable[[int, Callable[[], torch.Tensor]], torch.Tensor]:
        """This prefix for the batches of another loader (over other images): its batch b is kept as (name, b)."""
        return lambda batch, run: self((name, batch), run)

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
        finished, last, started = 0, None, False  # blocks finished before any adapted module started; the last's output

        def block_done(module, args, output) -> None:
            nonlocal finished, last
            if not started:
                finished, last = finished + 1, output

        def adapted_starts(module, args) -> None:
            nonlocal started
            started = True

        handles = [block.register_forward_hook(block_done) for block in self.blocks]
        handles += [
            module.register_forward_pre_hook(adapted_starts)
            for module in self.model.modules()
            if isinstance(module, HyperLoraLayer)
        ]
        try:
            out = run()
        finally:
            for handle in handles:
                handle.remove()
        return out, finished, last

    def _replay(self, captured: Any, run: Callable[[], torch.Tensor], cut: int | None = None) -> torch.Tensor:
        prefix = list(self.blocks)[: cut or self.cut]
        for block in prefix:  # each returns the last one's output; only that one is read
            block.forward = lambda *args, **kwargs: captured
        try:
            return run()
        finally:
            for block in prefix:
                del block.forward
