"""The frozen prefix: every task's features through its adapted blocks only, equal to its full forward pass."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from hyperlora import HyperLoraConfig
from hyperlora.training.prefix import FrozenPrefix


def adapted(backbone: nn.Module, target_modules, tasks: int = 3):
    """The backbone with HyperLoRA on ``target_modules`` and ``tasks`` tasks whose generated weights differ."""
    model = get_peft_model(backbone, HyperLoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    torch.manual_seed(5)
    for _ in range(tasks):
        model.add_task(torch.randn(32))
    with torch.no_grad():  # B starts at zero: move every hypernet weight so that the tasks' deltas are not
        for parameter in model.base_model.hypernet.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def calls(module: nn.Module) -> list[int]:
    """How often ``module`` runs (a replayed block is still called: count a module inside it)."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_the_prefix_runs_once_per_batch_and_every_task_gets_its_full_forward(make_timm_vit):
    model = adapted(make_timm_vit(depth=3), r"blocks\.2\.(attn\.qkv|mlp\.fc2)")
    blocks = model.base_model.model.blocks
    first = calls(blocks[0].mlp)
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in range(2)]
    prefix = FrozenPrefix(model)
    with torch.no_grad():
        full = [[model(x, task_ids=t) for t in range(3)] for x in batches]
        first[0] = 0
        read = [[prefix(b, lambda x=x, t=t: model(x, task_ids=t)) for t in range(3)] for b, x in enumerate(batches)]
    assert prefix.cut == 2
    assert first[0] == 2  # once per batch: every other pass replayed blocks 0 and 1 (7 calls, 5 replays)
    for b in range(2):
        assert not torch.allclose(full[b][0], full[b][1])  # the tasks differ, so a replay of the wrong one would show
        for t in range(3):
            torch.testing.assert_close(read[b][t], full[b][t])
    assert "forward" not in vars(blocks[0])  # the blocks are themselves again


def test_a_model_adapted_from_its_first_block_runs_in_full(make_timm_vit, vit_images):
    model = adapted(make_timm_vit(depth=2), None)
    prefix = FrozenPrefix(model)
    with torch.no_grad():
        read = [prefix(0, lambda t=t: model(vit_images, task_ids=t)) for t in range(3)]
        full = [model(vit_images, task_ids=t) for t in range(3)]
    assert prefix.cut == 0
    for t in range(3):
        torch.testing.assert_close(read[t], full[t])


class Skip(nn.Module):
    """Blocks in a ModuleList that are not a chain: block 0's output is read again at the end."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.blocks[0](x)
        return self.blocks[2](torch.relu(self.blocks[1](first))) + first


def test_blocks_that_are_not_a_chain_get_full_passes():
    model = adapted(Skip(), ["blocks.2"])
    x = torch.randn(5, 8)
    prefix = FrozenPrefix(model)
    with torch.no_grad():
        read = [prefix(0, lambda t=t: model(x, task_ids=t)) for t in range(3)]
        full = [model(x, task_ids=t) for t in range(3)]
    assert prefix.cut == 0  # the first replay disagreed with the full pass
    for t in range(3):
        torch.testing.assert_close(read[t], full[t])
