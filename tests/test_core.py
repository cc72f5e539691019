"""The HyperLoRA core: targeting, config validation, tasks and task ids, training, caching and merging."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from hyperlora import HyperLoraConfig, HyperLoraLayer, HyperNetwork
from hyperlora.tuner.model import TIMM_VIT_TARGETS, TRANSFORMERS_VIT_TARGETS

# peft asks transformers 5.x models is_gradient_checkpointing, deprecated there; not HyperLoRA's concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SMALL = dict(r=4, task_embedding_dim=8, module_embedding_dim=8, hypernet_hidden_dim=32)
CNN_TARGETS = ["pw1", "pw2", "pw3"]
KINDS = ["timm", "hf", "cnn"]


def small_config(**kwargs) -> HyperLoraConfig:
    return HyperLoraConfig(**{**SMALL, **kwargs})


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` of the reference's scale (elementwise rtol plus an atol scaled to the largest value)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def adapted_names(model: nn.Module) -> set[str]:
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, m in model.named_modules() if isinstance(m, HyperLoraLayer)}


def hypernet(model: PeftModel, adapter: str = "default") -> nn.Module:
    return model.base_model.hyperlora_hypernet[adapter]


def perturb(model: PeftModel, adapter: str = "default", std: float = 0.05, seed: int = 0) -> None:
    """Give every output head random weights (in place, as an optimizer would): B != 0, tasks now differ."""
    generator = torch.Generator().manual_seed(seed)
    net = hypernet(model, adapter)
    with torch.no_grad():  # std is the scale of the generated factors: undo the output multiplier and the sum over
        for head in net.heads.values():  # the hidden units (each about 1 in size)
            scale = std / (net.output_scale * head.in_features**0.5)
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * scale)


class CallCounter:
    """Counts the forward calls of a module through a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.count += 1

    def remove(self) -> None:
        self.handle.remove()


@pytest.fixture
def setup(request, make_timm_vit, make_hf_vit, make_cnn, vit_images, cnn_images):
    """Factory: (kind, **config overrides) -> (peft model, untouched copy of the base, inputs, run)."""

    def build(kind: str, **config):
        if kind == "timm":
            base, x = make_timm_vit(), vit_images
        elif kind == "hf":
            base, x = make_hf_vit(), vit_images
        else:
            base, x = make_cnn(), cnn_images
            config.setdefault("target_modules", CNN_TARGETS)
        reference = copy.deepcopy(base)
        model = get_peft_model(base, small_config(**config))

        def run(module: nn.Module, inputs: torch.Tensor = x, **kwargs) -> torch.Tensor:
            if kind == "hf":
                return module(pixel_values=inputs, **kwargs).last_hidden_state
            return module(inputs, **kwargs)

        return model, reference, x, run

    return build


# --- targeting -------------------------------------------------------------------------------------------------------


def test_timm_vit_default_targets(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    expected = {f"blocks.{b}.{t}" for b in range(2) for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert adapted_names(model) == expected
    assert model.peft_config["default"].target_modules == set(TIMM_VIT_TARGETS)
    # The Conv2d patch embedding (also named "...proj") stays a plain Conv2d.
    assert type(model.base_model.model.patch_embed.proj) is nn.Conv2d
    assert len(hypernet(model).module_shapes) == 8


def test_transformers_vit_default_targets(hf_vit):
    model = get_peft_model(hf_vit, small_config())
    expected = {f"layers.0.attention.{p}_proj" for p in "qkvo"} | {"layers.0.mlp.fc1", "layers.0.mlp.fc2"}
    assert adapted_names(model) == expected
    assert model.peft_config["default"].target_modules == set(TRANSFORMERS_VIT_TARGETS)
    assert type(model.base_model.model.pooler.dense) is nn.Linear


def test_cnn_pointwise_targets(small_cnn):
    model = get_peft_model(small_cnn, small_config(target_modules=CNN_TARGETS))
    assert adapted_names(model) == set(CNN_TARGETS)
    assert type(model.base_model.model.conv) is nn.Conv2d
    shapes = hypernet(model).module_shapes
    assert sorted(shapes) == sorted([(16, 8), (16, 16), (8, 16)])


def test_3x3_conv_target_is_rejected_by_name(small_cnn):
    with pytest.raises(ValueError, match=r"'conv'.*1x1"):
        get_peft_model(small_cnn, small_config(target_modules=["conv", "pw1"]))


@pytest.mark.parametrize("targets", [["patch_embed.proj"], ["proj"]])
def test_timm_patch_embedding_target_is_rejected_by_name(timm_vit, targets):
    with pytest.raises(ValueError, match=r"patch_embed\.proj"):
        get_peft_model(timm_vit, small_config(target_modules=targets))


def test_grouped_conv_is_rejected(small_cnn):
    small_cnn.pw2 = nn.Conv2d(16, 16, kernel_size=1, groups=4)
    with pytest.raises(ValueError, match=r"pw2.*groups"):
        get_peft_model(small_cnn, small_config(target_modules=CNN_TARGETS))


def test_targets_matching_nothing_raise(timm_vit):
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(timm_vit, small_config(target_modules=["no_such_layer"]))


def test_model_without_default_targets_needs_target_modules(small_cnn):
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(small_cnn, small_config())


@pytest.mark.parametrize(
    "overrides",
    [
        {"r": 0},
        {"r": -2},
        {"r": 2.5},
        {"r": True},
        {"task_embedding_dim": 0},
        {"module_embedding_dim": -1},
        {"hypernet_hidden_dim": 0},
        {"hypernet_num_layers": 0},
        {"h_score_samples": 0},
        {"h_embedding_steps": -1},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"beta_reg": -0.5},
        {"beta_emb_slope": float("nan")},
        {"router_shrinkage": 1.5},
        {"normalisation": "zscore"},
        {"embedding_init": "zeros"},
        {"router": "nearest"},
    ],
)
def test_bad_config_values_raise(overrides):
    name = next(iter(overrides))
    with pytest.raises(ValueError, match=name):
        HyperLoraConfig(**overrides)


def test_config_defaults_and_scaling():
    config = HyperLoraConfig(target_modules=["a", "b"])
    assert config.peft_type == "HYPERLORA"
    assert config.target_modules == {"a", "b"}
    assert (config.r, config.task_embedding_dim, config.module_embedding_dim) == (8, 32, 32)
    assert (config.hypernet_hidden_dim, config.hypernet_num_layers) == (64, 2)
    assert HyperLoraConfig(r=4, lora_alpha=6).scaling == 1.5


def test_shape_groups_share_heads(timm_vit):
    # 8 adapted modules but only 4 distinct (out, in) shapes: qkv, proj, fc1, fc2.
    net = hypernet(get_peft_model(timm_vit, small_config()))
    assert set(net.heads.keys()) == {"576x192", "192x192", "768x192", "192x768"}
    assert net.module_embeddings.shape == (8, SMALL["module_embedding_dim"])


# --- a fresh adapter is the base model -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_equals_base_model_exactly(setup, kind):
    model, reference, _, run = setup(kind)
    with torch.no_grad():
        expected = run(reference)
        model.add_task()
        assert torch.equal(run(model), expected)
        model.add_task()
        assert torch.equal(run(model), expected)
        assert torch.equal(run(model, task_ids=[0, 1, 1, 0]), expected)
    # Also with autograd on (the uncached, differentiable path).
    assert torch.equal(run(model, task_ids=0), expected)


def test_generated_b_is_zero_and_a_is_not(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    out = model.base_model.generate([0])
    assert all(torch.count_nonzero(b) == 0 for b in out.B)
    assert all(a.abs().sum() > 0 for a in out.A)
    assert out.A[0].shape == (1, SMALL["r"], 192) and out.B[0].shape == (1, 576, SMALL["r"])


def test_a_step_that_generates_once_matches_one_that_generates_for_the_forward(timm_vit):
    """use_generated: the trainer's step reads old tasks' factors and runs the forward from one hypernet pass."""
    model = get_peft_model(timm_vit, small_config())
    for _ in range(3):
        model.add_task()
    model.train()
    hypernet = model.base_model.hypernet
    with torch.no_grad():
        for head in hypernet.heads.values():  # a trained hypernet: B no longer zero
            head.weight.normal_(0.0, 0.05)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def loss_and_grads(once: bool):
        model.zero_grad()
        calls = []
        handle = hypernet.register_forward_hook(lambda *_: calls.append(1))
        out = model.base_model.generate([0, 2])
        if once:
            with model.base_model.use_generated(out, [0, 2]):
                features = model(x)
        else:
            features = model(x)
        handle.remove()
        loss = features.pow(2).mean() + sum(a[0].pow(2).sum() for a in out.A)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in hypernet.parameters() if p.grad is not None], len(calls)

    loss_once, grads_once, calls_once = loss_and_grads(True)
    loss_twice, grads_twice, calls_twice = loss_and_grads(False)
    assert (calls_once, calls_twice) == (1, 2)
    torch.testing.assert_close(loss_once, loss_twice)
    assert len(grads_once) == len(grads_twice) > 0
    for a, b in zip(grads_once, grads_twice, strict=True):
        torch.testing.assert_close(a, b)
    # a task the given rows lack is generated as usual
    out = model.base_model.generate([0, 2])
    model.base_model.set_task(1)
    calls = []
    handle = hypernet.register_forward_hook(lambda *_: calls.append(1))
    with model.base_model.use_generated(out, [0, 2]):
        model(x)
    handle.remove()
    assert calls == [1]


# --- tasks and task ids ----------------------------------------------------------------------------------------------


def test_add_task_ids_and_set_task(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    assert model.base_model.active_task is None
    assert [model.add_task() for _ in range(3)] == [0, 1, 2]
    assert model.base_model.active_task == 2
    assert model.base_model.num_tasks == 3
    model.set_task(0)
    assert model.base_model.active_task == 0
    model.set_task(2)
    assert model.base_model.active_task == 2


def test_add_task_with_given_embedding(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    embedding = torch.arange(8, dtype=torch.float32)
    task = model.add_task(embedding)
    assert torch.equal(hypernet(model).task_embeddings[task].detach(), embedding)
    with pytest.raises(ValueError, match="shape"):
        model.add_task(torch.zeros(7))
    with pytest.raises(ValueError, match="NaN"):
        model.add_task(torch.full((8,), float("nan")))
    assert model.base_model.num_tasks == 1


@pytest.mark.parametrize("bad", [5, 2, -1])
def test_set_task_unknown_id_raises(timm_vit, bad):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.add_task()
    with pytest.raises(ValueError, match=rf"unknown task id {bad}\b"):
        model.set_task(bad)
    assert model.base_model.active_task == 1


def test_set_task_rejects_non_int(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    with pytest.raises(TypeError):
        model.set_task(0.0)
    with pytest.raises(TypeError):
        model.set_task(True)


def test_forward_before_add_task_raises(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    with pytest.raises(ValueError, match="add_task"):
        model(vit_images)


@pytest.mark.parametrize(
    ("task_ids", "error", "match"),
    [
        ([0, 7, 1, 0], ValueError, r"\b7\b"),
        (7, ValueError, r"\b7\b"),
        ([0, -1, 1, 0], ValueError, r"-1\b"),
        (torch.tensor([0, 1, -3, 0]), ValueError, r"-3\b"),
        ([0, 1, 1], ValueError, "3 entries"),
        ([0, 1, 1, 0, 1], ValueError, "5 entries"),
        ([0, 0, 0], ValueError, "3 entries"),  # one distinct task: still checked against the batch
        ([0.0, 1.0, 1.0, 0.0], TypeError, "int"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), TypeError, "int"),
        (torch.tensor([True, False, True, False]), TypeError, "int"),
        ([[0, 1], [1, 0]], ValueError, "1-D"),
        (torch.zeros(4, 1, dtype=torch.long), ValueError, "1-D"),
        ([], ValueError, "1-D"),
    ],
)
def test_bad_task_ids_raise(timm_vit, vit_images, task_ids, error, match):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.add_task()
    with torch.no_grad(), pytest.raises(error, match=match):
        model(vit_images, task_ids=task_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_tasks_differ_after_training_the_hypernet(setup, kind):
    model, reference, _, run = setup(kind)
    for _ in range(3):
        model.add_task()
    perturb(model)
    with torch.no_grad():
        outputs = [run(model, task_ids=t) for t in range(3)]
        base = run(reference)
    for t in range(3):
        assert not torch.allclose(outputs[t], base, rtol=1e-3, atol=1e-3)
        for s in range(t):
            assert not torch.allclose(outputs[t], outputs[s], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("grad", [False, True], ids=["cached", "differentiable"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_task_ids_match_single_task_calls(setup, kind, grad):
    model, _, _, run = setup(kind)
    for _ in range(3):
        model.add_task()
    perturb(model)
    with torch.no_grad():
        single = [run(model, task_ids=t) for t in range(3)]
    cases = [[0, 1, 1, 0], [2, 0, 2, 0], torch.tensor([1, 2, 0, 2]), [1, 1, 1, 1]]
    with torch.set_grad_enabled(grad):
        for ids in cases:
            mixed = run(model, task_ids=ids)
            assert mixed.requires_grad == grad
            for row, t in enumerate(torch.as_tensor(ids).tolist()):
                assert_rel_close(mixed[row], single[t][row])


@pytest.mark.parametrize("kind", KINDS)
def test_ways_of_naming_one_task_agree(setup, kind):
    model, _, _, run = setup(kind)
    model.add_task()
    model.add_task()
    perturb(model)
    with torch.no_grad():
        by_int = run(model, task_ids=0)
        by_list = run(model, task_ids=[0, 0, 0, 0])
        by_tensor = run(model, task_ids=torch.zeros(4, dtype=torch.int32))
        model.set_task(0)
        by_active = run(model)
    assert torch.equal(by_int, by_active)
    assert_rel_close(by_list, by_int)
    assert_rel_close(by_tensor, by_int)


def test_adding_a_task_leaves_existing_tasks_unchanged(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    with torch.no_grad():
        before = model(vit_images, task_ids=0)
        model.add_task()
        after = model(vit_images, task_ids=0)
    assert_rel_close(after, before)  # not bit-exact: the cache now generates both tasks in one batch


# --- training --------------------------------------------------------------------------------------------------------


def _loss(output: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1.0, 1.0, output.numel()).reshape(output.shape)
    return (output - target).pow(2).mean()


def test_trainable_parameters_and_gradients(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.add_task()  # task 1 active, task 0 old
    perturb(model)
    net = hypernet(model)
    _loss(model(vit_images, task_ids=[0, 1, 1, 0])).backward()

    assert not net.task_embeddings[0].requires_grad and net.task_embeddings[0].grad is None
    active = net.task_embeddings[1]
    assert active.requires_grad and active.grad is not None and active.grad.abs().sum() > 0
    assert net.module_embeddings.grad is not None and net.module_embeddings.grad.abs().sum() > 0
    for name, param in [*net.trunk.named_parameters(), *net.heads.named_parameters()]:
        assert param.requires_grad, name
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.base_model.model.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name


def test_fresh_adapter_gets_gradients_through_b(timm_vit, vit_images):
    # B starts at zero; the B half of the heads must still receive gradient so that training can start.
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    _loss(model(vit_images)).backward()
    net = hypernet(model)
    for key, head in net.heads.items():
        in_features = int(key.split("x")[1])
        b_rows = head.weight.grad[SMALL["r"] * in_features :]
        assert b_rows.abs().sum() > 0, key


def test_set_task_moves_trainability(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    for _ in range(3):
        model.add_task()
    model.set_task(1)
    flags = [e.requires_grad for e in hypernet(model).task_embeddings]
    assert flags == [False, True, False]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hyperlora_hypernet.default." in n for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_step_changes_active_task_outputs(setup, kind):
    model, _, _, run = setup(kind)
    model.add_task()
    model.add_task()
    net = hypernet(model)
    old_embedding = net.task_embeddings[0].detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = run(model)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(run(model)).backward()
        optimizer.step()
    with torch.no_grad():
        after = run(model)
    assert not torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert torch.equal(net.task_embeddings[0].detach(), old_embedding)


@pytest.mark.parametrize("task_ids", [None, [0, 1, 1, 0]])
def test_hypernet_runs_once_per_training_forward(timm_vit, vit_images, task_ids):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.add_task()
    model.train()
    counter = CallCounter(hypernet(model))
    _loss(model(vit_images, task_ids=task_ids)).backward()
    assert counter.count == 1
    model(vit_images, task_ids=task_ids)
    assert counter.count == 2  # differentiable factors are regenerated every training forward
    counter.remove()


def test_calling_a_layer_outside_the_model_raises(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    layer = model.base_model.model.blocks[0].attn.qkv
    with pytest.raises(RuntimeError, match="call the PEFT model"):
        layer(torch.randn(2, 16, 192))


# --- caching ---------------------------------------------------------------------------------------------------------


def test_no_grad_forwards_reuse_generated_weights(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.add_task()
    perturb(model)
    counter = CallCounter(hypernet(model))
    with torch.no_grad():
        first = model(vit_images)
        second = model(vit_images)
        model(vit_images, task_ids=0)
        model(vit_images, task_ids=[1, 0, 0, 1])
    assert counter.count == 1
    assert torch.equal(first, second)
    counter.remove()


def test_weights_generated_under_autocast_serve_a_full_precision_forward(timm_vit, vit_images):
    """The weight cache filled under bf16 autocast (as an evaluation fills it) is generated in float32 all the
    same, so a forward outside autocast (as the H-score reads the old tasks) is the float32 one exactly."""
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    with torch.no_grad():
        exact = model(vit_images)
        model.base_model._weight_cache.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(vit_images)
        again = model(vit_images)
    assert torch.equal(again, exact)


def test_frozen_model_reuses_weights_even_with_autograd_on(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    model.base_model.requires_grad_(False)  # nothing to differentiate: generation can be cached
    counter = CallCounter(hypernet(model))
    model(vit_images)
    model(vit_images)
    assert counter.count == 1
    counter.remove()


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adamw"])
def test_cache_is_invalidated_by_an_optimizer_step(timm_vit, vit_images, fused):
    """Also by the trainer's fused AdamW, which updates parameters without bumping their version counters: a stale
    cache once evaluated a task after its training with the weights of its last learning-curve point."""
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    counter = CallCounter(hypernet(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, fused=True) if fused else torch.optim.SGD(params, lr=0.5)
    with torch.no_grad():
        before = model(vit_images)
        model(vit_images)
    assert counter.count == 1

    _loss(model(vit_images)).backward()  # differentiable path: one more call
    optimizer.step()
    assert counter.count == 2
    with torch.no_grad():
        after = model(vit_images)
        again = model(vit_images)
    assert counter.count == 3  # regenerated once after the step, then cached again
    assert not torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, again)
    fresh = model(vit_images).detach()  # uncached, differentiable path with the new parameters
    assert_rel_close(after, fresh)
    counter.remove()


def test_cache_follows_new_tasks_and_set_task(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    with torch.no_grad():
        model(vit_images)  # cache holds task 0 only
        model.add_task()
        cached_new = model(vit_images, task_ids=1)
    assert_rel_close(cached_new, model(vit_images, task_ids=1).detach())
    with torch.no_grad():
        model.set_task(0)
        assert torch.equal(model(vit_images), model(vit_images, task_ids=0))


# --- merging ---------------------------------------------------------------------------------------------------------


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "hyperlora_" not in n}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_task_matches_unmerged_and_unmerge_restores(setup, kind):
    model, _, _, run = setup(kind)
    for _ in range(3):
        model.add_task()
    perturb(model)
    weights = _base_weights(model)
    with torch.no_grad():
        unmerged = [run(model, task_ids=t) for t in range(3)]

        model.merge_task(1)
        assert any(not torch.equal(p, weights[n]) for n, p in _base_weights(model).items())
        assert_rel_close(run(model, task_ids=1), unmerged[1])
        assert_rel_close(run(model, task_ids=[1, 1, 1, 1]), unmerged[1])
        with pytest.raises(ValueError, match="unmerge"):
            run(model, task_ids=0)
        with pytest.raises(ValueError, match="unmerge"):
            run(model, task_ids=[0, 1, 1, 0])
        assert model.active_task == 1  # merging a task makes it the active one
        assert_rel_close(run(model), unmerged[1])
        model.set_task(2)
        with pytest.raises(ValueError, match="unmerge"):
            run(model)  # the active task (2) is not the merged one

        model.merge_task(0)  # re-merging another task unmerges the first
        assert_rel_close(run(model, task_ids=0), unmerged[0])

        model.unmerge()
        for name, param in _base_weights(model).items():
            torch.testing.assert_close(param, weights[name], rtol=1e-6, atol=1e-6)
        for t in range(3):
            assert_rel_close(run(model, task_ids=t), unmerged[t])
        model.unmerge()  # no-op


def test_merged_forward_skips_the_hypernet(timm_vit, vit_images):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    model.merge_task(0)
    counter = CallCounter(hypernet(model))
    with torch.no_grad():
        model(vit_images)
    assert counter.count == 0
    counter.remove()


def test_merged_forward_touches_no_layer_state(timm_vit, vit_images, monkeypatch):
    """Inference at the base cost: a merged forward neither hands factors to the layers nor clears them."""
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    model.merge_task(0)
    calls = []
    for method in ("set_generated", "clear_generated"):
        original = getattr(HyperLoraLayer, method)
        monkeypatch.setattr(
            HyperLoraLayer, method, lambda self, *a, _m=method, _f=original: calls.append(_m) or _f(self, *a)
        )
    with torch.no_grad():
        model(vit_images)
    assert calls == []
    model.unmerge()
    with torch.no_grad():
        model(vit_images)
    assert calls.count("set_generated") == len(adapted_names(model)) and "clear_generated" in calls


def test_merge_task_rejects_unknown_task(timm_vit):
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    with pytest.raises(ValueError, match=r"unknown task id 3"):
        model.merge_task(3)


@pytest.mark.parametrize("kind", ["timm", "cnn"])
def test_merge_and_unload_returns_plain_model_with_active_task(setup, kind):
    model, reference, _, run = setup(kind)
    model.add_task()
    model.add_task()
    perturb(model)
    model.set_task(0)
    with torch.no_grad():
        expected = run(model)
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, HyperLoraLayer) for m in plain.modules())
    assert not any("hyperlora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert_rel_close(run(plain), expected)
        assert not torch.allclose(run(plain), run(reference), rtol=1e-4, atol=1e-4)


def test_unload_returns_the_base_model(timm_vit, vit_images):
    reference = copy.deepcopy(timm_vit)
    model = get_peft_model(timm_vit, small_config())
    model.add_task()
    perturb(model)
    model.merge_task(0)
    plain = model.unload()
    assert not any(isinstance(m, HyperLoraLayer) for m in plain.modules())
    with torch.no_grad():
        assert_rel_close(plain(vit_images), reference(vit_images), rel=1e-5)


def test_scalar_tensor_and_numpy_task_id_mean_one_task_for_the_batch(timm_vit, vit_images):
    model, x = get_peft_model(timm_vit, HyperLoraConfig(r=4, lora_alpha=8)), vit_images
    model.add_task()
    model.add_task()
    perturb(model)
    with torch.no_grad():
        expected = model(x, task_ids=1)
        torch.testing.assert_close(model(x, task_ids=torch.tensor(1)), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(x, task_ids=np.int64(1)), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown task id 5"):
        model(x, task_ids=torch.tensor(5))


def _trained_hypernet(shapes: list[tuple[int, int]]) -> HyperNetwork:
    """Three tasks and heads far from their zero init, as after training: tasks 0 and 1 are the ones to protect."""
    torch.manual_seed(0)
    net = HyperNetwork(shapes, r=2, task_embedding_dim=4, module_embedding_dim=4, hidden_dim=16, num_layers=2)
    for _ in range(3):
        net.add_task()
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.normal_()
    return net


def _new_task_loss(net: HyperNetwork, directions: list[torch.Tensor]) -> torch.Tensor:
    """Linear in the heads' weights: one optimizer step's change in it is exactly first order."""
    out = net(net.stacked_task_embeddings([2]))
    return sum((w * d).sum() for w, d in zip((*out.A, *out.B), directions, strict=True))


def test_protected_heads_train_only_free_directions_whose_adam_step_does_more_for_the_new_task():
    net = _trained_hypernet([(12, 8), (8, 12)])
    generated = net(net.stacked_task_embeddings([2]))
    directions = [torch.randn_like(w) for w in (*generated.A, *generated.B)]
    start = {key: head.weight.detach().clone() for key, head in net.heads.items()}
    before = _new_task_loss(net, directions).item()
    bases = net.head_bases([0, 1])

    # what the optimizer used to do: Adam on W, then undo the protected part, W <- W - (W U - C) U^T
    optimizer = torch.optim.Adam([head.weight for head in net.heads.values()], lr=1e-3)
    _new_task_loss(net, directions).backward()
    gradients = {key: head.weight.grad.detach().double().numpy() for key, head in net.heads.items()}
    optimizer.step()
    with torch.no_grad():
        for key, head in net.heads.items():
            U = bases[key][0]
            head.weight.sub_((head.weight - start[key]) @ U @ U.t())
        step_then_undo = before - _new_task_loss(net, directions).item()
        for key, head in net.heads.items():
            head.weight.copy_(start[key])

    net.protect_tasks([0, 1])
    assert not any(head.weight.requires_grad for head in net.heads.values())
    optimizer = torch.optim.Adam(list(net.free.values()), lr=1e-3)
    _new_task_loss(net, directions).backward()
    for key, free in net.free.items():  # against numpy: the free part's gradient is W's, in the free directions
        Q = bases[key][1].double().numpy()
        np.testing.assert_allclose(free.grad.double().numpy(), gradients[key] @ Q, rtol=1e-4, atol=1e-6)
    optimizer.step()
    with torch.no_grad():
        free_step = before - _new_task_loss(net, directions).item()
    # Adam moves each trained coordinate by about lr: spent only on free directions, it does more for the new task
    assert free_step > 1.2 * step_then_undo > 0


def test_protected_tasks_generated_weights_stay_exact_and_release_folds_the_free_part_back():
    net = _trained_hypernet([(12, 8), (8, 12), (12, 8)])
    bases = net.head_bases([0, 1])
    shapes = {key: (U.shape, Q.shape) for key, (U, Q) in bases.items()}
    assert shapes == {"12x8": ((16, 4), (16, 12)), "8x12": ((16, 2), (16, 14))}  # 2 tasks x members, the rest
    before = net(net.stacked_task_embeddings())
    net.protect_tasks([0, 1])
    with torch.no_grad():
        protected = net(net.stacked_task_embeddings())
        for free in net.free.values():  # an optimizer step that knows nothing about the old tasks
            free.add_(torch.randn_like(free))
        after = net(net.stacked_task_embeddings())
    for m in range(3):
        torch.testing.assert_close(protected.A[m], before.A[m], rtol=1e-4, atol=1e-5)  # the same weights, held apart
        for old, new in ((before.A[m], after.A[m]), (before.B[m], after.B[m])):
            torch.testing.assert_close(new[:2], old[:2], rtol=1e-4, atol=1e-5)  # tasks 0 and 1: untouched
            assert (new[2] - old[2]).abs().max() > 1e-2  # task 2 is free to learn
    net.release_tasks()
    assert len(net.free) == 0 and all(head.weight.requires_grad for head in net.heads.values())
    released = net(net.stacked_task_embeddings())
    for m in range(3):
        torch.testing.assert_close(released.B[m], after.B[m], rtol=1e-4, atol=1e-5)


def test_paced_free_part_moves_the_new_task_as_an_unprotected_head_would_and_keeps_old_tasks_exact():
    """pace_task: the free part is scaled by |h| / |Q^T h| of the new task's activations (numpy), the same weights
    come out, one Adam step moves the new task's weights pace times as far as without it, the old tasks' not at all,
    and release folds the scale into the weights."""
    moved, paces = {}, {}
    for paced in (False, True):
        net = _trained_hypernet([(12, 8), (8, 12), (12, 8)])
        before = net(net.stacked_task_embeddings())
        net.protect_tasks([0, 1], pace_task=2 if paced else None)
        start = net(net.stacked_task_embeddings())
        for m in range(3):
            torch.testing.assert_close(start.B[m], before.B[m], rtol=1e-4, atol=1e-5)
        if paced:
            hidden = net.hidden(net.stacked_task_embeddings([2]))[0].detach().double().numpy()
            for key, (_, Q) in net.head_bases([0, 1]).items():
                h = hidden[net._groups[key]]
                expected = np.linalg.norm(h) / np.linalg.norm(h @ Q.double().numpy())
                assert net.fixed[key][3] == pytest.approx(min(expected, 10.0), rel=1e-5) and expected > 1
                paces[key] = net.fixed[key][3]
        optimizer = torch.optim.Adam(list(net.free.values()), lr=1e-3)
        torch.manual_seed(1)
        directions = [torch.randn_like(b) for b in start.B]
        sum((b[2] * d).sum() for b, d in zip(start.B, directions, strict=True)).backward()
        optimizer.step()  # Adam's first step: lr times the gradient's sign, the same signs with or without pace
        with torch.no_grad():
            after = net(net.stacked_task_embeddings())
        moved[paced] = [(after.B[m] - start.B[m]).detach() for m in range(3)]
        for m in range(3):
            torch.testing.assert_close(after.B[m][:2], start.B[m][:2], rtol=1e-4, atol=1e-5)  # old tasks: exact
        net.release_tasks()
        released = net(net.stacked_task_embeddings())
        for m in range(3):
            torch.testing.assert_close(released.B[m], after.B[m], rtol=1e-4, atol=1e-5)
    for m, key in enumerate(["12x8", "8x12", "12x8"]):
        ratio = moved[True][m][2].norm() / moved[False][m][2].norm()
        assert ratio.item() == pytest.approx(paces[key], rel=1e-3)
