"""Sharing task embeddings (and whole adapters) through the Hub, against the local Hub server of tests/hub_server.py.

Everything runs on 127.0.0.1 with the real huggingface_hub client; HF_HOME, the hub cache, the token file and the
temporary directory all point into tmp_path, so the user's cache and credentials are never read or touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants
from peft import PeftModel, get_peft_model
from torch import nn

import hyperlora
from hyperlora.hub import CONFIG_FILE, EMBEDDINGS_FILE, README_FILE, TaskEmbeddings
from hyperlora.hub import embeddings as embeddings_module

TOKEN = "hf_FAKEtestTOKENnotREAL0123456789abcd"  # recognisable: it must never show up in a message or a log
OTHER_TOKEN = "hf_SOMEoneELSEStokenNOTreal9876543210"
THREE = [EMBEDDINGS_FILE, CONFIG_FILE, README_FILE]


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point every Hub-client path (read at import time, hence the constants too) and tempfile into tmp_path."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # so that leftovers of failed downloads are visible
    return systmp


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(lifetime_s=60) as server:
        yield server


def build_model(num_tasks: int = 3, *, task_seed: int = 1, **config_overrides) -> PeftModel:
    """Tiny timm ViT (same backbone weights every call) + HyperLoRA with a randomised, non-zero hypernetwork."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=1
    ).eval()
    options = dict(r=4, lora_alpha=8, hypernet_hidden_dim=32)
    options.update(config_overrides)
    model = get_peft_model(vit, hyperlora.HyperLoraConfig(**options))
    hypernet = model.base_model.hypernet
    torch.manual_seed(123)  # the hypernetwork weights: identical across calls with the same config
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # B heads start at zero: make the generated deltas non-zero
    generator = torch.Generator().manual_seed(task_seed)
    for _ in range(num_tasks):
        model.add_task(torch.randn(hypernet.task_embedding_dim, generator=generator))
    return model.eval()


def copy_hypernet_weights(source: PeftModel, target: PeftModel) -> None:
    """Same hypernetwork (trunk, heads, module embeddings) in target, its own task embeddings untouched."""
    state = {k: v for k, v in source.base_model.hypernet.state_dict().items() if not k.startswith("task_embeddings.")}
    missing, unexpected = target.base_model.hypernet.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("task_embeddings.") for k in missing)


def sample_embeddings(model: PeftModel | None = None) -> TaskEmbeddings:
    model = model or build_model()
    names = ["cifar", "flowers", "pets"]
    h = [[None, 0.5, float("nan")], [0.25, None, 1.0], [2, -1.5, None]]
    return TaskEmbeddings.from_model(model, task_names=names, h_scores=h)


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same(a: TaskEmbeddings, b: TaskEmbeddings) -> None:
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.task_names == b.task_names
    assert a.h_scores == b.h_scores
    assert a.config == b.config


def assert_same_lora(source: PeftModel, target: PeftModel, num_tasks: int) -> None:
    with torch.no_grad():
        out_s = source.base_model.generate(list(range(num_tasks)))
        out_t = target.base_model.generate(list(range(num_tasks)))
        for a_s, a_t, b_s, b_t in zip(out_s.A, out_t.A, out_s.B, out_t.B, strict=True):
            assert torch.equal(a_s, a_t) and torch.equal(b_s, b_t)
        assert any(b.abs().sum() > 0 for b in out_s.B)  # the comparison is not vacuous
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        ids = torch.tensor([0, 1, 2, 1]) % num_tasks
        torch.testing.assert_close(source(x, task_ids=ids), target(x, task_ids=ids), rtol=0, atol=0)
        assert not torch.allclose(source(x, task_ids=0), source(x, task_ids=1))


# --- the object itself -----------------------------------------------------------------------------------------------


def test_from_model_defaults_and_json_safe_config() -> None:
    model = build_model(2)
    te = TaskEmbeddings.from_model(model)
    assert te.embeddings.shape == (2, 32) and te.embeddings.dtype == torch.float32
    assert te.task_names == ["task_0", "task_1"]
    assert te.h_scores == [[None, None], [None, None]]
    assert te.config["peft_type"] == "HYPERLORA" and te.config["r"] == 4
    assert te.config["target_modules"] == sorted(["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    json.dumps(te.config, allow_nan=False)
    assert torch.equal(TaskEmbeddings.from_model(model.base_model).embeddings, te.embeddings)  # the tuner works too
    te.embeddings.add_(1.0)  # a snapshot: editing it leaves the model alone
    assert not torch.equal(model.base_model.hypernet.stacked_task_embeddings().detach(), te.embeddings)
    with pytest.raises(TypeError, match="HyperLoRA"):
        TaskEmbeddings.from_model(nn.Linear(2, 2))


def test_h_scores_normalised() -> None:
    te = sample_embeddings()
    assert te.h_scores == [[None, 0.5, None], [0.25, None, 1.0], [2.0, -1.5, None]]  # NaN -> None, int -> float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embeddings": torch.zeros(32)}, "2-D"),
        ({"embeddings": torch.full((3, 32), float("nan"))}, "NaN or Inf"),
        ({"embeddings": torch.zeros(3, 32, dtype=torch.long)}, "floating point"),
        ({"task_names": ["a", "b"]}, "task_names has 2 entries for 3"),
        ({"task_names": ["a", "a", "b"]}, "unique"),
        ({"h_scores": [[None] * 3] * 2}, "3 x 3"),
        ({"h_scores": [[None] * 3, [None] * 2, [None] * 3]}, "row 1"),
        ({"h_scores": [[None] * 3, [None, float("inf"), None], [None] * 3]}, r"h_scores\[1\]\[1\]"),
        ({"config": {"task_embedding_dim": 16}}, "task_embedding_dim is 16"),
        ({"config": {"peft_type": "LORA"}}, "peft_type"),
    ],
)
def test_validation_names_the_problem(change: dict, message: str) -> None:
    fields = dict(embeddings=torch.zeros(3, 32), task_names=["a", "b", "c"], h_scores=[[None] * 3] * 3, config={})
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        TaskEmbeddings(**fields)


# --- local folder ----------------------------------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    te = sample_embeddings()
    folder = te.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(folder)) == sorted(THREE)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    header = json.loads((folder / CONFIG_FILE).read_text())
    assert header["format_version"] == 1 and header["task_names"] == te.task_names and header["h_scores"][0][2] is None
    card = (folder / README_FILE).read_text()
    assert card.startswith("---\nlibrary_name: hyperlora\n") and "- hyperlora" in card
    assert_same(TaskEmbeddings.from_pretrained(folder), te)
    assert_same(TaskEmbeddings.from_pretrained(str(folder)), te)


def test_save_into_existing_adapter_folder_keeps_other_files(tmp_path: Path) -> None:
    model = build_model()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    peft_card = (adapter_dir / README_FILE).read_bytes()
    before = set(os.listdir(adapter_dir))
    te = sample_embeddings(model)
    te.save_pretrained(adapter_dir)
    assert set(os.listdir(adapter_dir)) == before | {EMBEDDINGS_FILE, CONFIG_FILE}
    assert (adapter_dir / README_FILE).read_bytes() == peft_card  # a foreign model card is kept
    assert_same(TaskEmbeddings.from_pretrained(adapter_dir), te)
    # Saving again over our own files replaces them.
    te2 = TaskEmbeddings.from_model(model, task_names=["x", "y", "z"])
    te2.save_pretrained(adapter_dir)
    assert TaskEmbeddings.from_pretrained(adapter_dir).task_names == ["x", "y", "z"]


@pytest.mark.parametrize("existing", [False, True])
def test_save_pretrained_failure_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    target = tmp_path / "out"
    if existing:
        TaskEmbeddings.from_model(build_model(), task_names=["old0", "old1", "old2"]).save_pretrained(target)
    before, entries = listing(tmp_path), sorted(os.listdir(tmp_path))
    calls = []
    real_write = embeddings_module._write_file

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            real_write(path, data[: len(data) // 2])  # a half-written file, then the "disk" fails
            raise OSError("No space left on device")
        real_write(path, data)

    monkeypatch.setattr(embeddings_module, "_write_file", failing_write)  # where save_pretrained looks it up
    with pytest.raises(OSError, match="No space left"):
        sample_embeddings().save_pretrained(target)
    assert listing(tmp_path) == before  # the target is as it was and no staging folder is left
    assert sorted(os.listdir(tmp_path)) == entries


def test_local_mismatched_or_damaged_files(tmp_path: Path) -> None:
    a = TaskEmbeddings.from_model(build_model(3, task_seed=1))
    b = TaskEmbeddings.from_model(build_model(3, task_seed=2))
    c = TaskEmbeddings.from_model(build_model(2, task_seed=3))
    for name, te in (("a", a), ("b", b), ("c", c)):
        te.save_pretrained(tmp_path / name)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / CONFIG_FILE).write_bytes((tmp_path / "a" / CONFIG_FILE).read_bytes())
    (mixed / EMBEDDINGS_FILE).write_bytes((tmp_path / "b" / EMBEDDINGS_FILE).read_bytes())
    with pytest.raises(ValueError, match=f"{EMBEDDINGS_FILE}.*SHA-256"):
        TaskEmbeddings.from_pretrained(mixed)
    (mixed / EMBEDDINGS_FILE).write_bytes((tmp_path / "c" / EMBEDDINGS_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"shape \(2, 32\).*\(3, 32\).*different saves"):
        TaskEmbeddings.from_pretrained(mixed)
    (mixed / EMBEDDINGS_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=f"{EMBEDDINGS_FILE}.*corrupted or truncated"):
        TaskEmbeddings.from_pretrained(mixed)
    (mixed / CONFIG_FILE).write_bytes((tmp_path / "a" / CONFIG_FILE).read_bytes()[:-40])
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}.*corrupted or truncated"):
        TaskEmbeddings.from_pretrained(mixed)
    (mixed / CONFIG_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a HyperLoRA task-embeddings file"):
        TaskEmbeddings.from_pretrained(mixed)
    (mixed / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        TaskEmbeddings.from_pretrained(mixed)
    with pytest.raises(NotADirectoryError):
        TaskEmbeddings.from_pretrained(tmp_path / "a" / CONFIG_FILE)


# --- applying to a model ---------------------------------------------------------------------------------------------


def test_apply_to_reproduces_the_source_lora_weights() -> None:
    source = build_model(3, task_seed=1)
    te = sample_embeddings(source)
    target = build_model(1, task_seed=99)  # different (and fewer) task embeddings
    copy_hypernet_weights(source, target)
    te.apply_to(target)
    assert target.base_model.hypernet.num_tasks == 3
    assert_same_lora(source, target, 3)


def test_apply_to_unmerges_a_merged_task() -> None:
    source = build_model(3, task_seed=1)
    target = build_model(1, task_seed=99)
    copy_hypernet_weights(source, target)
    target.base_model.merge_task(0)  # the old embedding's delta is folded into the weights: it must come out
    TaskEmbeddings.from_model(source).apply_to(target)
    assert target.base_model.hypernet.merged_task is None
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # merge + unmerge round the base weights by float32 ulps, hence the tolerance
        torch.testing.assert_close(target(x, task_ids=[0, 2]), source(x, task_ids=[0, 2]), rtol=1e-4, atol=1e-4)


def test_apply_to_refuses_mismatches() -> None:
    te = TaskEmbeddings.from_model(build_model(2))
    cases = [
        (build_model(3), "has 3 tasks but only 2"),
        (build_model(1, r=8), "r: 4 here vs 8"),
        (build_model(1, hypernet_hidden_dim=16), "hypernet_hidden_dim"),
        (build_model(1, target_modules=["attn.qkv"]), "target_modules"),
        (build_model(1, task_embedding_dim=16, module_embedding_dim=32), "size 16, these have 32"),
    ]
    for model, message in cases:
        before = model.base_model.hypernet.stacked_task_embeddings().detach().clone()
        with pytest.raises(ValueError, match=message):
            te.apply_to(model)
        assert torch.equal(model.base_model.hypernet.stacked_task_embeddings(), before)  # nothing changed


def test_apply_to_warns_on_other_lora_alpha(caplog: pytest.LogCaptureFixture) -> None:
    te = TaskEmbeddings.from_model(build_model(2))
    with caplog.at_level(logging.WARNING, logger="hyperlora.hub"):
        te.apply_to(build_model(1, lora_alpha=16))
    assert "lora_alpha differs" in caplog.text


# --- through the Hub -------------------------------------------------------------------------------------------------


def test_hub_round_trip_and_apply(hub: HubServer, tmp_path: Path) -> None:
    source = build_model(3, task_seed=1)
    te = sample_embeddings(source)
    info = te.push_to_hub("alice/tasks", token=TOKEN, endpoint=hub.url)
    assert info.oid == hub.repos[("model", "alice/tasks")].head.oid
    assert set(hub.files("alice/tasks")) == {".gitattributes", *THREE}
    assert hub.auth_headers and all(h == f"Bearer {TOKEN}" for h in hub.auth_headers)
    assert "from_pretrained('alice/tasks')" in hub.files("alice/tasks")[README_FILE].decode()

    pulled = TaskEmbeddings.from_pretrained("alice/tasks", endpoint=hub.url)
    assert_same(pulled, te)
    assert not any(tmp_path.joinpath("systmp").iterdir())  # the download folder is gone

    target = build_model(2, task_seed=42)
    copy_hypernet_weights(source, target)
    pulled.apply_to(target)
    assert_same_lora(source, target, 3)

    # A second push is a new commit; the first stays reachable by revision.
    TaskEmbeddings.from_model(source, task_names=["a", "b", "c"]).push_to_hub(
        "alice/tasks", token=TOKEN, endpoint=hub.url, commit_message="rename"
    )
    assert TaskEmbeddings.from_pretrained("alice/tasks", endpoint=hub.url).task_names == ["a", "b", "c"]
    assert TaskEmbeddings.from_pretrained("alice/tasks", revision=info.oid, endpoint=hub.url).task_names == [
        "cifar",
        "flowers",
        "pets",
    ]
    with pytest.raises(FileNotFoundError, match="no such revision"):
        TaskEmbeddings.from_pretrained("alice/tasks", revision="v9", endpoint=hub.url)


def test_private_repo_needs_its_token(hub: HubServer) -> None:
    sample_embeddings().push_to_hub("alice/secret", token=TOKEN, private=True, endpoint=hub.url)
    assert hub.repos[("model", "alice/secret")].private
    assert TaskEmbeddings.from_pretrained("alice/secret", token=TOKEN, endpoint=hub.url).task_names[0] == "cifar"
    with pytest.raises(FileNotFoundError, match="not found, or it is private"):
        TaskEmbeddings.from_pretrained("alice/secret", endpoint=hub.url)


@pytest.fixture
def default_endpoint(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The test server as the Hub of calls that take no endpoint, as a model card's snippet makes them.

    PeftModel.push_to_hub is transformers' PushToHubMixin: it takes no endpoint and goes through a shared
    `transformers.utils.hub.hf_api()` instance (swapped for one on the test server) plus ModelCard.load, which builds
    its URL from huggingface_hub.constants.ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE (both read from HF_ENDPOINT once,
    at import: patched here). PeftModel.from_pretrained forwards `endpoint=` only to some of its hf_hub_download calls
    (not to the one reading the peft type) and checks for the weights file with the module-level
    `huggingface_hub.file_exists`, bound to a global HfApi created at import: its endpoint is patched too. With these
    patches both are PEFT's own, unmodified code paths.
    """
    import huggingface_hub.hf_api
    import transformers.utils.hub

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(
        transformers.utils.hub, "_hf_api", HfApi(endpoint=hub.url, library_name="transformers", library_version="5")
    )
    return hub


def fresh_base() -> nn.Module:
    """The backbone of build_model, as a user who loads an adapter builds it."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=1
    ).eval()


def card_snippet(card: ModelCard) -> dict:
    """Run the card's Python snippet in a namespace of its own (it must need nothing else) and return the namespace."""
    [code] = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def check_adapter_card(card: ModelCard, base_model: str, source: str) -> None:
    assert card.data.library_name == "peft" and card.data.base_model == base_model
    assert {"hyperlora", f"base_model:adapter:{base_model}"} <= set(card.data.tags)
    assert "import hyperlora" in card.text and f"from_pretrained(base_model, {source!r})" in card.text
    assert "transformers model" not in card.text and card.text.count("<!-- hyperlora-adapter -->") == 1


BASE_ID = "timm/vit_tiny_patch16_224.augreg_in21k"


def test_whole_adapter_through_peft_push_to_hub_and_from_pretrained(default_endpoint: HubServer) -> None:
    hub = default_endpoint
    source = build_model(3, task_seed=1)
    source.peft_config["default"].base_model_name_or_path = BASE_ID  # get_peft_model reads no name off timm models
    source.push_to_hub("alice/adapter", token=TOKEN, commit_message="adapter")
    stored = hub.files("alice/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(stored)
    assert json.loads(stored["adapter_config.json"])["peft_type"] == "HYPERLORA"
    # PEFT's card, not the generic transformers one push_to_hub writes, and its snippet loads the adapter
    card = ModelCard(stored["README.md"].decode())
    check_adapter_card(card, BASE_ID, "alice/adapter")
    assert_same_lora(source, card_snippet(card)["load"](fresh_base()).eval(), 3)

    loaded = PeftModel.from_pretrained(fresh_base(), "alice/adapter", token=TOKEN).eval()
    assert loaded.base_model.hypernet.num_tasks == 3
    assert_same_lora(source, loaded, 3)

    # The embeddings alone, pushed next to the adapter, bring a fresh copy of it to the same tasks; of that repo
    # (which also holds PEFT's files) only the two fixed file names are ever fetched.
    TaskEmbeddings.from_model(source).push_to_hub("alice/adapter", token=TOKEN, endpoint=hub.url)
    with torch.no_grad():
        for p in loaded.base_model.hypernet.task_embeddings:
            p.zero_()
    hub.requests.clear()
    TaskEmbeddings.from_pretrained("alice/adapter", endpoint=hub.url).apply_to(loaded)
    assert_same_lora(source, loaded, 3)
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}
    assert fetched == {CONFIG_FILE, EMBEDDINGS_FILE}


def test_a_damaged_adapter_on_the_hub_is_refused_by_name_before_the_base_model_is_touched(
    default_endpoint: HubServer,
) -> None:
    build_model(3).push_to_hub("alice/adapter", token=TOKEN)
    default_endpoint.corrupt("alice/adapter", "adapter_model.safetensors", flip_at=-3)  # tensor data: loads fine
    base = fresh_base()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not match the SHA-256 recorded in"):
        PeftModel.from_pretrained(base, "alice/adapter", token=TOKEN)
    assert not any(isinstance(module, hyperlora.HyperLoraLayer) for module in base.modules())


def test_the_task_embeddings_card_snippet_runs_as_written(default_endpoint: HubServer) -> None:
    source = build_model(3, task_seed=1)
    sample_embeddings(source).push_to_hub("alice/tasks", token=TOKEN)
    target = build_model(1, task_seed=42)
    copy_hypernet_weights(source, target)
    card = ModelCard(default_endpoint.files("alice/tasks")[README_FILE].decode())
    assert card_snippet(card)["apply_tasks"](target) is target
    assert_same_lora(source, target, 3)


def test_saved_adapter_card_is_peft_style_keeps_what_its_owner_wrote_and_its_snippet_loads(tmp_path: Path) -> None:
    source = build_model(3, task_seed=1)
    source.peft_config["default"].base_model_name_or_path = BASE_ID
    folder = tmp_path / "adapter"
    source.save_pretrained(folder)
    card = ModelCard.load(folder / README_FILE)
    check_adapter_card(card, BASE_ID, str(folder))
    assert_same_lora(source, card_snippet(card)["load"](fresh_base()).eval(), 3)

    card.text = "# My adapter\n\nNotes of my own.\n\n" + card.text  # the owner edits the card; saving again keeps it
    card.save(folder / README_FILE)
    source.save_pretrained(folder)
    card = ModelCard.load(folder / README_FILE)
    check_adapter_card(card, BASE_ID, str(folder))
    assert card.text.startswith("# My adapter\n\nNotes of my own.")


# --- failures: clear errors, nothing left behind ---------------------------------------------------------------------


def _failure_cases(hub: HubServer) -> dict[str, tuple[type[Exception], str]]:
    te = sample_embeddings()
    te.push_to_hub("alice/good", token=TOKEN, endpoint=hub.url)
    te.push_to_hub("alice/flipped", token=TOKEN, endpoint=hub.url)
    hub.corrupt("alice/flipped", EMBEDDINGS_FILE, flip_at=-3)  # in the tensor data: only the checksum sees it
    te.push_to_hub("alice/truncated", token=TOKEN, endpoint=hub.url)
    size = len(hub.files("alice/truncated")[EMBEDDINGS_FILE])
    hub.corrupt("alice/truncated", EMBEDDINGS_FILE, truncate_to=size // 2)
    te.push_to_hub("alice/badjson", token=TOKEN, endpoint=hub.url)
    hub.corrupt("alice/badjson", CONFIG_FILE, truncate_to=50)
    good = hub.files("alice/good")
    hub.create_repo(
        "alice/data", "dataset", files={CONFIG_FILE: good[CONFIG_FILE], EMBEDDINGS_FILE: good[EMBEDDINGS_FILE]}
    )
    hub.create_repo("alice/plain-model", files={"config.json": b"{}", "model.safetensors": b"x"})
    hub.create_repo("alice/half", files={CONFIG_FILE: good[CONFIG_FILE]})
    return {
        "alice/missing": (FileNotFoundError, "'alice/missing' was not found, or it is private"),
        "alice/flipped": (ValueError, f"{EMBEDDINGS_FILE} in Hub repository 'alice/flipped'.*SHA-256"),
        "alice/truncated": (ValueError, f"{EMBEDDINGS_FILE} in Hub repository 'alice/truncated'.*corrupted or trunc"),
        "alice/badjson": (ValueError, f"{CONFIG_FILE} in Hub repository 'alice/badjson'.*corrupted or truncated"),
        "alice/data": (ValueError, "'alice/data' is not a model repository.*no HyperLoRA task embeddings"),
        "alice/plain-model": (ValueError, "'alice/plain-model' holds no HyperLoRA task embeddings"),
        "alice/half": (ValueError, f"'alice/half' has {CONFIG_FILE} but no {EMBEDDINGS_FILE}"),
        "not a/valid id": (ValueError, "neither an existing local folder nor a valid Hub repo id"),
    }


def test_download_failures_are_clear_and_leave_nothing_behind(
    hub: HubServer, tmp_path: Path, isolated_hf: Path
) -> None:
    cases = _failure_cases(hub)
    target = tmp_path / "mine"
    sample_embeddings(build_model(3, task_seed=5)).save_pretrained(target)  # what the user already has
    before = listing(tmp_path)
    for repo_id, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            TaskEmbeddings.from_pretrained(repo_id, token=TOKEN, endpoint=hub.url).save_pretrained(target)
        assert listing(tmp_path) == before, repo_id  # target, cache and temp folder unchanged
        assert not any(isolated_hf.iterdir()), repo_id
    assert_same(TaskEmbeddings.from_pretrained("alice/good", endpoint=hub.url), sample_embeddings())


def test_token_never_appears_in_errors_or_logs(hub: HubServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cases = _failure_cases(hub)
    sample_embeddings().push_to_hub("bob/owned", token=OTHER_TOKEN, endpoint=hub.url)
    hub.create_repo("bob/closed", private=True)
    seen: list[BaseException] = []
    for repo_id, (error, _) in cases.items():
        with pytest.raises(error) as info:
            TaskEmbeddings.from_pretrained(repo_id, token=TOKEN, endpoint=hub.url)
        seen.append(info.value)
    with pytest.raises(FileNotFoundError) as info:  # private, wrong token
        TaskEmbeddings.from_pretrained("bob/closed", token=TOKEN, endpoint=hub.url)
    seen.append(info.value)
    with pytest.raises(PermissionError, match="refused to push 'bob/owned'") as info:  # someone else's repo
        sample_embeddings().push_to_hub("bob/owned", token=TOKEN, endpoint=hub.url)
    seen.append(info.value)
    with pytest.raises(OSError, match="unreachable") as info:  # nobody listening there
        TaskEmbeddings.from_pretrained("alice/good", token=TOKEN, endpoint="http://127.0.0.1:9")
    seen.append(info.value)
    for exc in seen:
        for text in (str(exc), repr(exc), str(exc.__cause__), str(exc.__context__)):
            assert TOKEN not in text and TOKEN[3:] not in text
    assert f"Bearer {TOKEN}" in hub.auth_headers  # it was really sent, just never shown
    assert TOKEN not in caplog.text and TOKEN[3:] not in caplog.text
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_server_stops_by_itself() -> None:
    import socket
    import time

    server = HubServer(lifetime_s=0.2).start()
    host, port = server.url.removeprefix("http://").split(":")
    socket.create_connection((host, int(port)), timeout=1).close()
    deadline = time.monotonic() + 5
    while not server.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
    server.stop()  # idempotent
