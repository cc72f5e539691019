"""HyperLoRA inside peft: saving and loading, several named adapters, and a guard on the peft internals it touches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from torch import nn

import hyperlora
from hyperlora import HyperLoraConfig, HyperLoraModel

# peft asks transformers 5.x models is_gradient_checkpointing, deprecated there; not HyperLoRA's concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SMALL = dict(r=4, task_embedding_dim=8, module_embedding_dim=8, hypernet_hidden_dim=32)
REPO = Path(__file__).resolve().parents[1]


def small_config(**kwargs) -> HyperLoraConfig:
    return HyperLoraConfig(**{**SMALL, **kwargs})


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def hypernet(model: PeftModel, adapter: str = "default") -> nn.Module:
    return model.base_model.hyperlora_hypernet[adapter]


def perturb(model: PeftModel, adapter: str = "default", std: float = 0.05, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in hypernet(model, adapter).heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)


def trained_vit(make_timm_vit, num_tasks: int = 3, **config) -> PeftModel:
    """A timm ViT with HyperLoRA, ``num_tasks`` tasks and a perturbed hypernet (tasks give different outputs)."""
    model = get_peft_model(make_timm_vit(), small_config(**config))
    for _ in range(num_tasks):
        model.add_task()
    perturb(model)
    return model


# --- the peft internals HyperLoRA relies on --------------------------------------------------------------------------


def test_hyperlora_is_registered_in_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["HYPERLORA"] is HyperLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["HYPERLORA"] is HyperLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["HYPERLORA"] == HyperLoraModel.prefix == "hyperlora_"
    # get_peft_model / PeftModel read the same tables through these module attributes.
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING is PEFT_TYPE_TO_TUNER_MAPPING


def test_peft_minor_version_is_the_pinned_one():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if re.match(r"peft\b", d))
    pinned = re.search(r">=\s*(\d+)\.(\d+)", spec).groups()
    upper = re.search(r"<\s*(\d+)\.(\d+)", spec).groups()
    assert (int(upper[0]), int(upper[1])) == (int(pinned[0]), int(pinned[1]) + 1), f"peft is not pinned: {spec}"
    assert pinned == ("0", "21")
    installed = tuple(peft.__version__.split(".")[:2])
    assert installed == pinned, (
        f"peft {peft.__version__} installed, HyperLoRA's registration was written for {'.'.join(pinned)}.x: "
        "re-check hyperlora/tuner/registration.py and the BaseTuner hooks HyperLoraModel overrides"
    )


def test_base_tuner_still_has_the_hooks_hyperlora_overrides():
    overridden = [
        "inject_adapter",
        "_create_and_replace",
        "_remove_adapter_name_from_key",
        "_remap_adapter_state_dict_for_load",
        "_unload_and_optionally_merge",
        "merge_adapter",
        "unmerge_adapter",
        "set_adapter",
    ]
    for name in overridden:
        assert hasattr(BaseTuner, name), f"peft's BaseTuner no longer has {name}: HyperLoraModel's override is dead"
        assert name in HyperLoraModel.__dict__
    assert "uses_shared_state" in BaseTuner.__dict__
    # PeftModel.forward enters the tuner's _enable_peft_forward_hooks (how task_ids reach the tuner).
    assert hasattr(PeftModel, "_enable_peft_forward_hooks")
    # Wrapped once each: PEFT writes the adapter card in create_or_update_model_card, push_to_hub replaces it before
    # _upload_modified_files, and PeftConfigMixin.from_json_file reads every adapter_config.json.
    from peft.config import PeftConfigMixin

    for name, wrapped in [
        ("create_or_update_model_card", PeftModel.create_or_update_model_card),
        ("_upload_modified_files", PeftModel._upload_modified_files),
        ("from_json_file", PeftConfigMixin.from_json_file.__func__),
    ]:
        assert wrapped.__code__.co_filename.endswith("registration.py"), name
        assert not hasattr(wrapped.__wrapped__, "__wrapped__"), name


def test_peft_model_forward_strips_task_ids_before_timm(make_timm_vit, vit_images):
    base = make_timm_vit()
    with pytest.raises(TypeError):
        base(vit_images, task_ids=[0, 0, 0, 0])  # timm itself rejects the keyword
    model = trained_vit(make_timm_vit, num_tasks=2)
    with torch.no_grad():
        out = model(vit_images, task_ids=[0, 1, 1, 0])
        assert out.shape == (4, 192)
        assert_rel_close(out[1], model(vit_images, task_ids=1)[1])
    # The base model's forward is back to normal afterwards (the stripping hook is removed).
    assert not model.base_model.model._forward_pre_hooks


def test_transformers_vit_takes_task_ids_through_peft(make_hf_vit, vit_images):
    model = get_peft_model(make_hf_vit(), small_config())
    model.add_task()
    model.add_task()
    perturb(model)
    with torch.no_grad():
        mixed = model(pixel_values=vit_images, task_ids=[0, 1, 1, 0]).last_hidden_state
        zero = model(pixel_values=vit_images, task_ids=0).last_hidden_state
        one = model(pixel_values=vit_images, task_ids=1).last_hidden_state
    assert not torch.allclose(zero, one, rtol=1e-3, atol=1e-3)
    for row, t in enumerate([0, 1, 1, 0]):
        assert_rel_close(mixed[row], (zero, one)[t][row])


# --- save and load ---------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, make_timm_vit, vit_images):
    """A saved 3-task adapter, with the outputs and embeddings it had for every task."""
    model = trained_vit(make_timm_vit, num_tasks=3)
    with torch.no_grad():
        outputs = [model(vit_images, task_ids=t) for t in range(3)]
    embeddings = [e.detach().clone() for e in hypernet(model).task_embeddings]
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", outputs, embeddings


def test_save_pretrained_files(saved):
    path, _, _ = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYPERLORA"
    assert config["r"] == SMALL["r"]
    weights = load_file(path / "adapter_model.safetensors")
    assert {f"base_model.hyperlora_hypernet.task_embeddings.{t}" for t in range(3)} <= weights.keys()
    assert "base_model.hyperlora_hypernet.module_embeddings" in weights
    assert all(k.startswith("base_model.hyperlora_hypernet.") for k in weights), "base weights leaked into the adapter"
    assert not any(".default." in k for k in weights), "adapter name left in a checkpoint key"


def test_from_pretrained_restores_every_task_frozen(saved, make_timm_vit, vit_images):
    path, outputs, embeddings = saved
    model = PeftModel.from_pretrained(make_timm_vit(), path)
    net = hypernet(model)
    calls = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    assert model.base_model.num_tasks == 3
    assert model.base_model.active_task == 2
    for t in range(3):
        assert torch.equal(net.task_embeddings[t].detach(), embeddings[t])
    with torch.no_grad():
        for t in range(3):
            assert_rel_close(model(vit_images, task_ids=t), outputs[t])
        mixed = model(vit_images, task_ids=[2, 0, 1, 0])
    for row, t in enumerate([2, 0, 1, 0]):
        assert_rel_close(mixed[row], outputs[t][row])
    assert not any(p.requires_grad for p in model.parameters())

    # Frozen for inference: generated weights are cached, also with autograd on.
    model(vit_images)
    model(vit_images, task_ids=0)
    handle.remove()
    assert len(calls) == 1


def test_from_pretrained_trainable(saved, make_timm_vit, vit_images):
    path, outputs, _ = saved
    model = PeftModel.from_pretrained(make_timm_vit(), path, is_trainable=True)
    net = hypernet(model)
    assert all(p.requires_grad for p in [*net.trunk.parameters(), *net.heads.parameters(), net.module_embeddings])
    assert [e.requires_grad for e in net.task_embeddings] == [False, False, True]
    base_params = [p for n, p in model.base_model.model.named_parameters() if "hyperlora_" not in n]
    assert base_params and not any(p.requires_grad for p in base_params)
    model.set_task(1)
    assert [e.requires_grad for e in net.task_embeddings] == [False, True, False]
    assert_rel_close(model(vit_images).detach(), outputs[1])
    # New tasks continue the numbering.
    assert model.add_task() == 3


def test_loading_needs_the_same_config(saved, tmp_path, make_timm_vit):
    path, _, _ = saved
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["r"] = 8
    (edited / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different config"):
        PeftModel.from_pretrained(make_timm_vit(), edited)


def test_loading_into_another_base_model_fails(saved, make_timm_vit):
    path, _, _ = saved
    with pytest.raises(ValueError, match="different config"):
        PeftModel.from_pretrained(make_timm_vit(embed_dim=96, num_heads=3), path)
    with pytest.raises(ValueError, match="different config"):
        PeftModel.from_pretrained(make_timm_vit(depth=3), path)


def test_loading_without_importing_hyperlora_raises_key_error(saved):
    path, _, _ = saved
    script = (
        f"import sys, peft\nassert 'hyperlora' not in sys.modules\npeft.PeftConfig.from_pretrained({str(path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "KeyError: 'HYPERLORA'" in result.stderr, result.stderr[-2000:]
    # With hyperlora imported (as in this process) the same call works.
    assert isinstance(PeftConfig.from_pretrained(path), HyperLoraConfig)
    assert hyperlora.__version__


# --- several named adapters ------------------------------------------------------------------------------------------


@pytest.fixture
def two_adapters(make_timm_vit, vit_images):
    model = trained_vit(make_timm_vit, num_tasks=2)
    with torch.no_grad():
        default_outputs = [model(vit_images, task_ids=t) for t in range(2)]
    model.add_adapter("other", small_config(r=2, target_modules=["attn.qkv", "mlp.fc2"]))
    assert model.active_adapter == "default"
    model.set_adapter("other")
    return model, default_outputs


def test_named_adapters_have_their_own_tasks(two_adapters, vit_images, make_timm_vit):
    model, default_outputs = two_adapters
    assert model.base_model.num_tasks == 0
    assert model.base_model.active_task is None
    assert model.add_task() == 0
    trainable = {
        n.split(".hyperlora_hypernet.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"other"}
    perturb(model, "other", seed=1)
    with torch.no_grad():
        other = model(vit_images)
        base = make_timm_vit()(vit_images)
        assert not torch.allclose(other, base, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(other, default_outputs[0], rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError, match=r"unknown task id 1"):
            model(vit_images, task_ids=1)

        model.set_adapter("default")
        assert model.base_model.num_tasks == 2
        for t in range(2):
            assert_rel_close(model(vit_images, task_ids=t), default_outputs[t])


def test_merge_with_an_adapter_that_targets_fewer_layers(two_adapters, vit_images):
    model, _ = two_adapters
    model.add_task()
    perturb(model, "other", seed=1)
    with torch.no_grad():
        expected = model(vit_images)
        model.merge_task(0)
        assert_rel_close(model(vit_images), expected)
        model.unmerge()
        assert_rel_close(model(vit_images), expected)


def test_save_and_load_two_adapters(two_adapters, tmp_path, make_timm_vit, vit_images):
    model, default_outputs = two_adapters
    model.add_task()
    model.add_task()
    perturb(model, "other", seed=1)
    with torch.no_grad():
        other_outputs = [model(vit_images, task_ids=t) for t in range(2)]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2

    loaded = PeftModel.from_pretrained(make_timm_vit(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert loaded.active_adapter == "default"
    with torch.no_grad():
        for t in range(2):
            assert_rel_close(loaded(vit_images, task_ids=t), default_outputs[t])
        loaded.set_adapter("other")
        for t in range(2):
            assert_rel_close(loaded(vit_images, task_ids=t), other_outputs[t])
    assert not any(p.requires_grad for p in loaded.parameters())
