"""Reliability: bad input fails clearly and writes nothing, random input only raises the documented errors, and
untrusted files (adapter folders, Hub repos, the package's own loaders) are handled safely.

Documented errors: ValueError, TypeError, KeyError, IndexError (and FileNotFoundError for a missing file). Every
"writes nothing" check snapshots a directory's listing and file bytes before and after the failing call.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import CNN_TARGETS, build_cnn
from hub_server import HubServer
from huggingface_hub import constants
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn

from hyperlora import HyperLoraConfig, HyperLoraLayer
from hyperlora.data import ImageSpec, Task, TaskImages
from hyperlora.hub import CONFIG_FILE, EMBEDDINGS_FILE, README_FILE, TaskEmbeddings
from hyperlora.tuner.config import CHECKSUM_KEY

DOCUMENTED = (ValueError, TypeError, KeyError, IndexError)
TINY = dict(r=2, task_embedding_dim=4, module_embedding_dim=4, hypernet_hidden_dim=8, target_modules=CNN_TARGETS)
PACKAGE = Path(__file__).resolve().parents[1] / "hyperlora"
WEIGHTS = "adapter_model.safetensors"
NUM_CLASSES = 5  # SmallCNN's head


def tiny_config(**overrides) -> HyperLoraConfig:
    return HyperLoraConfig(**{**TINY, **overrides})


def images(n: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained_cnn(num_tasks: int = 3, **overrides) -> PeftModel:
    """SmallCNN + HyperLoRA with ``num_tasks`` tasks and non-zero generated B, so that tasks differ."""
    model = get_peft_model(build_cnn(), tiny_config(**overrides))
    for _ in range(num_tasks):
        model.add_task()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in model.base_model.hypernet.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
    return model.eval()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (directories as None) with its bytes: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory and every cache a library could write to, all inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / ".hf" / "datasets"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A saved 3-task SmallCNN adapter and the outputs it gives for task_ids [0, 1, 2, 0]."""
    model = trained_cnn()
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(folder)
    with torch.no_grad():
        return folder, model(images(), task_ids=[0, 1, 2, 0])


def copy_adapter(saved: Path, workdir: Path) -> Path:
    folder = workdir / "adapter"
    shutil.copytree(saved, folder)
    return folder


_DROP = object()  # edit_config(folder, key=_DROP) removes the key


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))


def assert_untouched(base: nn.Module) -> None:
    """A model from build_cnn() after a failed load: no injected layer, nothing frozen, no PEFT attribute."""
    assert not any(isinstance(m, HyperLoraLayer) for m in base.modules()), "the base model was modified"
    assert all(p.requires_grad for p in base.parameters()) and not hasattr(base, "peft_config")
    assert list(base.state_dict()) == list(build_cnn().state_dict())


# === 1. bad input: a clear error, nothing written ====================================================================


@pytest.mark.parametrize("bad", [-1, 3, 10**30])
@pytest.mark.parametrize("call", ["set_task", "forward_int", "forward_list", "merge_task"])
def test_unknown_or_negative_task_id_raises_and_changes_nothing(workdir: Path, call: str, bad: int) -> None:
    model = trained_cnn()
    model.set_task(1)
    before_disk, before_weights = snapshot(workdir), weights_of(model)
    actions: dict[str, Callable[[], object]] = {
        "set_task": lambda: model.set_task(bad),
        "forward_int": lambda: model(images(), task_ids=bad),
        "forward_list": lambda: model(images(), task_ids=[0, bad, 1, 0]),
        "merge_task": lambda: model.base_model.merge_task(bad),
    }
    with torch.no_grad(), pytest.raises(ValueError, match=rf"unknown task id {bad}\b.*known task ids: 0\.\.2"):
        actions[call]()
    assert model.base_model.active_task == 1
    assert model.base_model.hypernet.merged_task is None
    after = weights_of(model)
    assert all(torch.equal(after[k], v) for k, v in before_weights.items())  # merge_task folded nothing in
    assert snapshot(workdir) == before_disk


@pytest.mark.parametrize(
    ("task_ids", "error", "match"),
    [
        # test_core covers floats, bools, 2-D lists, empty lists and wrong lengths of lists; these are the rest.
        ([0, None, 1, 0], TypeError, "sequence of ints"),
        (["0", "1", "1", "0"], TypeError, "sequence of ints"),
        ("0", TypeError, "sequence of ints"),
        ({0, 1}, TypeError, "sequence of ints"),
        ({0: 1}, TypeError, "sequence of ints"),
        ([[0], [1, 2], [0], [1]], TypeError, "sequence of ints"),  # ragged
        ([2**70, 0, 0, 0], ValueError, "unknown task id 1180591620717411303424"),  # beyond int64
        (np.array([0, 1, 1, 0], dtype=object), TypeError, "sequence of ints"),
        (torch.tensor([0j, 1j, 1j, 0j]), TypeError, "integers.*complex64"),
        (torch.tensor([0, 1, 1, 0], dtype=torch.bfloat16), TypeError, "integers.*bfloat16"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, r"1-D.*\(2, 2\)"),
        (torch.zeros(4, 1, 1, dtype=torch.int32), ValueError, "1-D"),
        (torch.zeros(0, dtype=torch.long), ValueError, "1-D"),
        (torch.tensor([0, 1, 1], dtype=torch.int32), ValueError, "3 entries but the batch has 4"),
        (np.array([0, 1, 1, 0, 1, 0]), ValueError, "6 entries but the batch has 4"),
        (np.array([0, 1, 255, 0], dtype=np.uint8), ValueError, "unknown task id 255"),
        (torch.tensor([0, -1, 1, 0], dtype=torch.int8), ValueError, "unknown task id -1"),
    ],
)
def test_task_ids_of_wrong_shape_length_or_dtype(workdir: Path, task_ids, error, match) -> None:
    model = trained_cnn()
    before = snapshot(workdir)
    with torch.no_grad(), pytest.raises(error, match=match):
        model(images(), task_ids=task_ids)
    assert snapshot(workdir) == before
    # The model still works afterwards: no generated weights were left behind on a layer.
    with torch.no_grad():
        assert model(images(), task_ids=[0, 1, 2, 0]).shape == (4, NUM_CLASSES)


def test_other_integer_dtypes_are_accepted() -> None:
    model = trained_cnn()
    with torch.no_grad():
        expected = model(images(), task_ids=torch.tensor([0, 2, 1, 0]))
        for ids in (
            torch.tensor([0, 2, 1, 0], dtype=torch.uint8),
            torch.tensor([0, 2, 1, 0], dtype=torch.int16),
            np.array([0, 2, 1, 0], dtype=np.int32),
            (0, 2, 1, 0),
        ):
            torch.testing.assert_close(model(images(), task_ids=ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "task_id", [np.int64(1), np.int32(1), np.uint8(1), torch.tensor(1), torch.tensor(1, dtype=torch.int32)]
)
def test_set_task_and_merge_task_take_the_integer_scalars_forward_takes(task_id) -> None:
    model = trained_cnn()
    model.set_task(0)
    with torch.no_grad():
        expected = model(images(), task_ids=task_id)
        model.set_task(task_id)
        assert model.base_model.active_task == 1 and type(model.base_model.active_task) is int
        torch.testing.assert_close(model(images()), expected, rtol=0, atol=0)
        model.base_model.merge_task(task_id)
        assert model.base_model.hypernet.merged_task == 1
    for bad in (np.float64(1.0), np.bool_(True), torch.tensor(1.0), torch.tensor(True), torch.tensor([1])):
        with pytest.raises(TypeError, match="task id must be an int"):
            model.set_task(bad)


@pytest.mark.parametrize(
    ("embedding", "error", "match"),
    [
        ("abc", TypeError, "real tensor"),
        (torch.zeros(4, dtype=torch.complex64), TypeError, "complex64"),  # was: imaginary part silently dropped
        (torch.ones(4, dtype=torch.bool), TypeError, "bool"),
        (object(), TypeError, "real tensor"),
        (torch.zeros(5), ValueError, r"shape \(4,\)"),
        ([float("inf")] * 4, ValueError, "NaN or Inf"),
    ],
)
def test_add_task_rejects_bad_embeddings(embedding, error, match) -> None:
    model = trained_cnn(1)
    with pytest.raises(error, match=match):
        model.add_task(embedding)
    assert model.base_model.num_tasks == 1 and model.base_model.active_task == 0


# --- datasets --------------------------------------------------------------------------------------------------------

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def image_dataset(labels: list, pictures: list | None = None, features=FEATURES) -> datasets.Dataset:
    pictures = pictures or [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(len(labels))]
    return datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features)


def _dataset_cases() -> dict[str, tuple[Callable[[], Task], str]]:
    good = image_dataset([0, 1, 0, 1])
    floats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32")})
    strings = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    return {
        "no image column": (
            lambda: Task("t", datasets.Dataset.from_dict({"img": [1, 2], "label": [0, 1]}), good),
            r"'t': the train split must be a datasets.Dataset with 'image' and 'label' columns, got columns \['img'",
        ),
        "no label column": (
            lambda: Task("t", good, datasets.Dataset.from_dict({"image": [1, 2], "fine_label": [0, 1]})),
            r"the test split .* got columns \['image', 'fine_label'\]",
        ),
        "not a dataset": (lambda: Task("t", [(0, 0)], good), "got columns None"),
        "negative label": (
            lambda: Task("t", image_dataset([0, -1, 0, 1]), good),
            r"'t': the train split has labels that are not non-negative integers: \[-1\]",
        ),
        "negative test label": (
            lambda: Task("t", good, image_dataset([0, 1, -3, 1])),
            r"the test split has labels .*\[-3\]",
        ),
        "float labels": (lambda: Task("t", image_dataset([0.0, 1.0], features=floats), good), r"\[0\.0, 1\.0\]"),
        "string labels": (lambda: Task("t", image_dataset(["a", "b"], features=strings), good), r"\['a', 'b'\]"),
        "missing label": (lambda: Task("t", image_dataset([0, None, 1]), good), r"\[None\]"),
        "test label out of range": (
            lambda: Task("t", good, image_dataset([0, 1, 7, 1])),
            r"'t': test labels \[7\] never occur in the train split",
        ),
        "empty train": (lambda: Task("t", good.select([]), good), "'t': the train split is empty"),
        "empty test": (lambda: Task("t", good, good.select([])), "'t': the test split is empty"),
        "one class": (lambda: Task("t", image_dataset([3, 3]), image_dataset([3])), r"at least 2 classes.*\[3\]"),
    }


@pytest.mark.parametrize("case", list(_dataset_cases()))
def test_task_rejects_bad_datasets(workdir: Path, case: str) -> None:
    make, match = _dataset_cases()[case]
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=match):
        make()
    assert snapshot(workdir) == before


def test_odd_images_are_converted_to_rgb_and_resized(workdir: Path) -> None:
    """Documents what happens to images of another mode or size: Task never looks at pixels; the backbone's
    transform (ImageSpec.transform) converts every PIL mode to RGB (grayscale copied to the three channels) and
    resizes + centre-crops any size to the backbone's square input. Empty or non-PIL images are refused by name."""
    spec = ImageSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pictures = [
        Image.new("L", (5, 17), 200),  # grayscale, odd size
        Image.new("1", (1, 1), 1),  # bilevel, a single pixel
        Image.new("P", (300, 3)),  # palette, extreme aspect ratio
        Image.new("RGBA", (9, 9), (10, 20, 30, 0)),
        Image.new("I;16", (7, 3), 40000),  # 16-bit grayscale
        Image.new("F", (4, 6), 0.5),  # 32-bit float
        Image.new("CMYK", (8, 8)),
        Image.new("LA", (8, 8)),
    ]
    dataset = image_dataset([0, 1] * 4, pictures)
    task = Task("odd", dataset, dataset)  # accepted as is
    assert task.classes == [0, 1]
    items = TaskImages(dataset, spec.transform(), task.classes)
    for i in range(len(items)):
        pixels, label = items[i]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32, pictures[i].mode
        assert torch.isfinite(pixels).all() and label == i % 2
    gray, _ = items[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale -> three equal channels
    torch.testing.assert_close(gray, torch.full_like(gray, (200 / 255 - 0.5) / 0.5))
    # Augmenting transform too.
    assert spec.transform(augment=True)(pictures[0]).shape == (3, 16, 16)

    transform = spec.transform()
    with pytest.raises(ValueError, match=r"empty image of size \(0, 0\)"):
        transform(Image.new("RGB", (0, 0)))
    with pytest.raises(TypeError, match=r"PIL image in the 'image' column.*ndarray"):
        transform(np.zeros((8, 8, 3), dtype=np.uint8))
    unstructured = datasets.Dataset.from_dict({"image": [[[0, 0]], [[1, 1]]], "label": [0, 1]})  # no Image()
    with pytest.raises(TypeError, match=r"PIL image.*got list"):
        TaskImages(unstructured, transform, [0, 1])[0]
    # A label outside the task's classes (a test split checked by hand, or indices into another split).
    with pytest.raises(ValueError, match=r"example 2 has label 7, not one of this task's \[0, 1\]"):
        TaskImages(image_dataset([0, 1, 7]), transform, [0, 1])[2]
    with pytest.raises(IndexError):
        TaskImages(dataset, transform, [0, 1])[len(dataset)]
    assert not list(workdir.iterdir())


# --- adapter folders -------------------------------------------------------------------------------------------------


def test_save_records_the_weights_checksum(saved_adapter, workdir: Path) -> None:
    folder, expected = saved_adapter
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved[CHECKSUM_KEY] == {WEIGHTS: hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not an "unexpected key" for PEFT's generic loader either
        generic = PeftConfig.from_pretrained(folder)
        model = PeftModel.from_pretrained(build_cnn(), folder)
    assert isinstance(generic, HyperLoraConfig)
    assert CHECKSUM_KEY not in generic.to_dict()  # an InitVar: never a field, never compared or re-exported
    with torch.no_grad():
        torch.testing.assert_close(model(images(), task_ids=[0, 1, 2, 0]), expected, rtol=0, atol=0)
    assert snapshot(workdir) == {}


@pytest.mark.parametrize(
    "change",
    [
        dict(r=4),
        dict(hypernet_hidden_dim=16),
        dict(hypernet_num_layers=3),
        dict(task_embedding_dim=6),
        dict(module_embedding_dim=2),
        dict(target_modules=["pw1", "pw2"]),
    ],
    ids=lambda change: next(iter(change)),
)
def test_config_contradicting_the_saved_adapter_names_the_keys(saved_adapter, workdir: Path, change: dict) -> None:
    # test_peft_integration edits adapter_config.json (the checkpoint then contradicts its own config); here the
    # caller passes its own config, which PEFT uses instead of the saved one.
    folder, _ = saved_adapter
    before = snapshot(folder)
    key, value = next(iter(change.items()))
    saved_value = 3 if key == "target_modules" else TINY.get(key, 2)
    shown = "number of adapted modules) (checkpoint 3, model 2" if key == "target_modules" else ""
    message = re.escape(shown) if shown else rf"{key} \(checkpoint {saved_value}, model {value}\)"
    base = build_cnn()
    with pytest.raises(ValueError, match=rf"different config.*Differing config keys: .*{message}"):
        PeftModel.from_pretrained(base, folder, config=tiny_config(**change))
    assert snapshot(folder) == before and snapshot(workdir) == {}
    assert_untouched(base)  # what PEFT injected before the weights were found not to fit is gone


def test_config_override_of_a_shape_free_key_is_accepted(saved_adapter) -> None:
    """Documented, not refused: with ``config=`` PEFT uses the caller's config and never reads the saved one, so a
    key that leaves every shape alone (lora_alpha here: saved 16, given 64) cannot be compared and simply applies."""
    folder, expected = saved_adapter
    model = PeftModel.from_pretrained(build_cnn(), folder, config=tiny_config(lora_alpha=64))
    layer = next(m for m in model.modules() if isinstance(m, HyperLoraLayer))
    assert layer.scaling["default"] == 64 / TINY["r"]
    with torch.no_grad():
        assert not torch.allclose(model(images(), task_ids=[0, 1, 2, 0]), expected, rtol=1e-3, atol=1e-3)


def _truncate(fraction: float) -> Callable[[bytes], bytes]:
    return lambda data: data[: int(len(data) * fraction)]


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def flip(data: bytes) -> bytes:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        return bytes(changed)

    return flip


DAMAGE = {
    "truncated to half": _truncate(0.5),
    "truncated to nothing": _truncate(0.0),
    "last byte missing": lambda data: data[:-1],
    "header length byte": _flip(3),
    "header json byte": _flip(20),
    "tensor data byte": _flip(-3),  # only the checksum can see this one
    "appended garbage": lambda data: data + b"\x00" * 8,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_weights_file_is_refused_by_name(saved_adapter, workdir: Path, damage: str) -> None:
    folder = copy_adapter(saved_adapter[0], workdir)
    (folder / WEIGHTS).write_bytes(DAMAGE[damage]((folder / WEIGHTS).read_bytes()))
    before, base = snapshot(workdir), build_cnn()
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / WEIGHTS))} does not match the SHA-256"):
        PeftModel.from_pretrained(base, folder)
    assert snapshot(workdir) == before
    assert_untouched(base)  # refused before PEFT injected anything into the caller's model


@pytest.mark.parametrize("damage", ["truncated to half", "header length byte", "header json byte"])
def test_damaged_weights_without_a_recorded_checksum(saved_adapter, workdir: Path, damage: str) -> None:
    # An adapter saved before checksums were recorded: the safetensors header is still checked.
    folder = copy_adapter(saved_adapter[0], workdir)
    edit_config(folder, **{CHECKSUM_KEY: _DROP})
    (folder / WEIGHTS).write_bytes(DAMAGE[damage]((folder / WEIGHTS).read_bytes()))
    before, base = snapshot(workdir), build_cnn()
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / WEIGHTS))} is truncated or corrupted"):
        PeftModel.from_pretrained(base, folder)
    assert snapshot(workdir) == before
    assert_untouched(base)


def test_missing_weights_file_is_named(saved_adapter, workdir: Path) -> None:
    folder = copy_adapter(saved_adapter[0], workdir)
    (folder / WEIGHTS).unlink()
    before = snapshot(workdir)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(folder / WEIGHTS))} is missing"):
        PeftModel.from_pretrained(build_cnn(), folder)
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(r="eight"), "HyperLoraConfig.r must be a positive integer, got 'eight'"),
        (dict(r=-1), "HyperLoraConfig.r must be a positive integer, got -1"),
        (dict(r=2.0), "HyperLoraConfig.r must be a positive integer, got 2.0"),
        (dict(foo=1), r"adapter_config.json has keys HyperLoraConfig does not know: \['foo'\]"),
        (dict(foo=1, bar=None), r"does not know: \['bar', 'foo'\]"),
        (dict(lora_alpha="16"), "HyperLoraConfig.lora_alpha must be a finite number, got '16'"),
        (dict(lora_dropout="0.1"), "HyperLoraConfig.lora_dropout must be a finite number"),
        (dict(beta_reg=[1]), "HyperLoraConfig.beta_reg must be a finite number"),
        (dict(h_embedding_steps="5"), "HyperLoraConfig.h_embedding_steps must be an integer >= 0"),
        (dict(h_score_shrinkage="yes"), "HyperLoraConfig.h_score_shrinkage must be true or false"),
        (dict(inference_mode="false"), "HyperLoraConfig.inference_mode must be true or false"),
        (dict(target_modules=5), "HyperLoraConfig.target_modules must be None or a list of module names, got 5"),
        (dict(target_modules=["pw1", 2]), "HyperLoraConfig.target_modules must be None or a list"),
        (dict(target_modules="pw(1"), r"HyperLoraConfig.target_modules 'pw\(1' is not a valid regex"),
        (dict(modules_to_save="head"), "HyperLoraConfig.modules_to_save must be None or a list"),
        (dict(normalisation=3), "HyperLoraConfig.normalisation must be one of"),
        (dict(task_type="BOGUS"), "Invalid task type"),  # PEFT's own check
        ({CHECKSUM_KEY: "abc"}, f"{CHECKSUM_KEY} must map"),
        ({CHECKSUM_KEY: {"../../secret": "0" * 64}}, f"{CHECKSUM_KEY} must map"),  # never opened
    ],
)
def test_bad_adapter_config_json_is_a_clear_error(saved_adapter, workdir: Path, changes: dict, match: str) -> None:
    folder = copy_adapter(saved_adapter[0], workdir)
    edit_config(folder, **changes)
    before, base = snapshot(workdir), build_cnn()
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, folder)
    assert snapshot(workdir) == before
    assert_untouched(base)


@pytest.mark.parametrize("text", [b"{not json", b'{"r": 2, "peft_type": "HYPER', b"", b"\xff\xfe\x00binary"])
def test_adapter_config_json_that_is_not_json_is_named(saved_adapter, workdir: Path, text: bytes) -> None:
    folder = copy_adapter(saved_adapter[0], workdir)
    (folder / "adapter_config.json").write_bytes(text)
    before, base = snapshot(workdir), build_cnn()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'adapter_config.json'))} is not valid JSON"):
        PeftModel.from_pretrained(base, folder)
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        HyperLoraConfig.from_pretrained(folder)
    assert snapshot(workdir) == before
    assert_untouched(base)


# === 2. property-based: random input only ever raises the documented errors ==========================================


@functools.cache
def _base_cnn() -> torch.nn.Module:
    return build_cnn()


@functools.cache
def _fixed_inputs() -> torch.Tensor:
    return images(4, seed=5)


@functools.cache
def _base_output() -> torch.Tensor:
    with torch.no_grad():
        return _base_cnn()(_fixed_inputs())


@functools.cache
def _three_task_model(user: str) -> tuple[PeftModel, list[torch.Tensor]]:
    """One model per test (``user``): merge_task / unmerge round the base weights, which other tests compare."""
    model = trained_cnn(3)
    with torch.no_grad():
        per_task = [model(_fixed_inputs(), task_ids=t) for t in range(3)]
    return model, per_task


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=6),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=4),
    st.lists(st.text(max_size=3), max_size=2),
)
# Each key gets a valid value or junk: a handful of keys with junk alone would almost never build a model.
_VALID = {
    "r": st.integers(1, 4),
    "lora_alpha": st.floats(-100, 100),
    "lora_dropout": st.floats(0, 0.9),
    "task_embedding_dim": st.integers(1, 6),
    "module_embedding_dim": st.integers(1, 6),
    "hypernet_hidden_dim": st.integers(1, 6),
    "hypernet_num_layers": st.integers(1, 3),
    "h_score_samples": st.integers(1, 10),
    "h_embedding_steps": st.integers(0, 10),
    "beta_reg": st.floats(0, 10),
    "router_shrinkage": st.floats(0, 1),
    "normalisation": st.sampled_from(["ahp", "minmax", "none"]),
    "h_score_shrinkage": st.booleans(),
    "exclude_modules": st.sampled_from([None, ["pw3"], "pw1"]),
}
_config_values = st.lists(st.sampled_from(sorted(_VALID)), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: st.one_of(_VALID[key], _junk) for key in keys})
)
_target_modules = st.one_of(
    st.just(CNN_TARGETS), st.just(["pw1"]), st.just("pw.*"), st.just(["conv"]), st.just("nothing"), _junk
)


@pytest.mark.filterwarnings("ignore:You have passed exclude_modules=.*but no modules were excluded")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=_config_values,
    target_modules=_target_modules,
    embedding=st.one_of(
        st.none(), st.lists(st.floats(width=32), min_size=0, max_size=7), st.text(max_size=3), st.integers()
    ),
)
@example(values={}, target_modules=CNN_TARGETS, embedding=None)
@example(values={"r": 1, "lora_alpha": -3.5, "exclude_modules": ["pw3"]}, target_modules="pw.*", embedding=[0.5] * 4)
@example(values={"hypernet_num_layers": 3, "lora_dropout": 0.5}, target_modules=["pw1"], embedding="x")
def test_random_config_values_only_raise_documented_errors(values: dict, target_modules, embedding) -> None:
    try:
        config = HyperLoraConfig(**{"target_modules": target_modules, **values})
    except DOCUMENTED:
        event("HyperLoraConfig refused")
        return
    try:
        model = get_peft_model(copy.deepcopy(_base_cnn()), config)
    except DOCUMENTED:
        event("get_peft_model refused")
        return
    try:
        task = model.add_task(embedding)
    except DOCUMENTED:
        event("add_task refused the embedding")
        task = model.add_task()
    event("model built and run")
    model.eval()
    with torch.no_grad():
        for ids in (None, task, [task] * 4):
            out = model(_fixed_inputs(), task_ids=ids)
            assert out.shape == (4, NUM_CLASSES) and torch.isfinite(out).all()
            # A fresh task's generated B is zero: the outputs are the base model's, whatever the config.
            torch.testing.assert_close(out, _base_output(), rtol=0, atol=0)


def _tensor_ids(draw_dtype, shape_and_values):
    dtype = draw_dtype
    values, shape = shape_and_values
    data = np.resize(np.array(values if values else [0], dtype=np.int64), shape)
    if dtype in (torch.float32, torch.float64, torch.complex64, torch.bfloat16):
        return torch.tensor(data.astype(np.float64), dtype=dtype)
    if dtype == torch.bool:
        return torch.tensor(data % 2 == 1)
    info = torch.iinfo(dtype)
    return torch.tensor(np.clip(data, info.min, info.max)).to(dtype)


_ids_values = st.lists(st.integers(min_value=-4, max_value=6), max_size=7)
_task_ids = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=4),
    _ids_values,
    st.lists(st.one_of(st.integers(-1, 3), st.none(), st.floats(width=32), st.text(max_size=1)), max_size=5),
    st.lists(st.lists(st.integers(0, 2), max_size=3), max_size=4),
    st.builds(
        _tensor_ids,
        st.sampled_from(
            [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32, torch.complex64]
        ),
        st.tuples(_ids_values, st.sampled_from([(4,), (3,), (5,), (), (0,), (4, 1), (2, 2), (1, 4, 1)])),
    ),
    st.builds(np.array, st.lists(st.integers(0, 2), min_size=4, max_size=4)),
)


@settings(max_examples=30, deadline=None)
@given(task_ids=_task_ids)
@example(task_ids=None)
@example(task_ids=1)
@example(task_ids=[0, 2, 1, 0])
@example(task_ids=torch.tensor([2, 2, 0, 1], dtype=torch.uint8))
def test_random_task_ids_only_raise_documented_errors(task_ids) -> None:
    model, per_task = _three_task_model("forward")
    try:
        with torch.no_grad():
            out = model(_fixed_inputs(), task_ids=task_ids)
    except DOCUMENTED as error:
        event(f"refused: {type(error).__name__}")
        return
    event("ran")
    assert out.shape == (4, NUM_CLASSES) and torch.isfinite(out).all()
    ids = torch.as_tensor(2 if task_ids is None else task_ids).long().reshape(-1).expand(4)  # None: active task 2
    for row, task in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], per_task[task][row], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["set_task", "merge_task"]),
    task_id=st.booleans().flatmap(  # half near the valid range, half anything else
        lambda near: (
            st.integers(-2, 4)
            if near
            else st.one_of(_junk, st.integers(min_value=-(2**70), max_value=2**70), st.just(np.int64(1)))
        )
    ),
)
@example(method="set_task", task_id=1)
@example(method="merge_task", task_id=0)
def test_random_task_ids_for_set_task_and_merge_task(method: str, task_id) -> None:
    model, per_task = _three_task_model("set_and_merge")
    tuner = model.base_model
    try:
        getattr(tuner, method)(task_id)
    except DOCUMENTED as error:
        event(f"refused: {type(error).__name__}")
        assert tuner.hypernet.merged_task is None and tuner.active_task == 2
        return
    event(f"{method} accepted")
    try:
        assert isinstance(task_id, int | np.integer) and not isinstance(task_id, bool)  # as forward's task_ids
        assert 0 <= task_id < 3 and tuner.active_task == task_id
        with torch.no_grad():
            torch.testing.assert_close(model(_fixed_inputs()), per_task[int(task_id)], rtol=1e-4, atol=1e-5)
    finally:
        tuner.unmerge()
        tuner.set_task(2)


# === 3. untrusted files ==============================================================================================


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Pickle imports, torch.load without weights_only=True, and trust_remote_code other than False."""
    tree = ast.parse(source, filename)
    torch_names = {"torch"}
    load_names: set[str] = set()
    for node in ast.walk(tree):  # aliases first: `import torch as t`, `from torch import load`
        if isinstance(node, ast.Import):
            torch_names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in ("pickle", "dill")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill"):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            is_torch_load = (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id in torch_names
            ) or (isinstance(func, ast.Name) and func.id in load_names)
            keywords = {k.arg: k.value for k in node.keywords}
            if is_torch_load:
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            remote = keywords.get("trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                found.append(f"{where} trust_remote_code={ast.unparse(remote)}")
            if isinstance(func, ast.Attribute) and func.attr == "load" and "allow_pickle" in keywords:
                allow = keywords["allow_pickle"]
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where} load(allow_pickle=...)")
    return found


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = """
import pickle
import torch as T
from torch import load as L
from pickle import loads
T.load("x")
torch.load("x", weights_only=False)
L("x")
load_dataset("x", trust_remote_code=True)
AutoModel.from_pretrained("x", trust_remote_code=flag)
np.load("x", allow_pickle=True)
"""
    lines = [int(problem.split(":")[1].split()[0]) for problem in unsafe_calls(bad)]
    assert sorted(lines) == [2, 5, 6, 7, 8, 9, 10, 11], unsafe_calls(bad)  # all but `import torch as T`
    good = 'import torch\ntorch.load("x", weights_only=True)\nload_dataset("x", trust_remote_code=False)\n'
    assert unsafe_calls(good) == []


def test_package_source_has_no_pickle_unsafe_torch_load_or_remote_code() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 20 and PACKAGE / "hub" / "embeddings.py" in files
    problems = [p for path in files for p in unsafe_calls(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert problems == []


@pytest.fixture
def isolated_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[HubServer, Path]]:
    """The local Hub server, with every Hub-client path, the cache and tempfile pointed into tmp_path/sandbox."""
    sandbox = tmp_path / "sandbox"
    home = sandbox / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    systmp = sandbox / "tmp" / "deeper"  # downloads land two levels down: "../" and "../../" stay in the sandbox
    systmp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.chdir(systmp)
    with HubServer(lifetime_s=60) as server:
        yield server, tmp_path


TRAVERSAL_NAMES = ["../evil.json", "../../evil.json", "sub/../../evil.json", "/tmp/evil.json", "..\\evil.json"]


def embedding_files(embeddings: TaskEmbeddings, folder: Path) -> dict[str, bytes]:
    """The two files a Hub repo of task embeddings holds, as bytes (written and read back through the public API)."""
    embeddings.save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, EMBEDDINGS_FILE)}


def test_hub_download_fetches_only_fixed_names_and_writes_nothing_outside(isolated_hub, tmp_path: Path) -> None:
    server, root = isolated_hub
    embeddings = TaskEmbeddings.from_model(trained_cnn(2), task_names=["a", "b"])
    good = embedding_files(embeddings, root / "source")
    evil = {name: b'{"evil": true}' for name in TRAVERSAL_NAMES}
    # Seeded directly: the server's commit endpoint (like the real Hub) would refuse such paths.
    server.create_repo("mallory/tasks", files={**evil, **good})
    assert set(TRAVERSAL_NAMES) <= set(server.files("mallory/tasks"))
    before, tmp_evil = snapshot(root), Path("/tmp/evil.json").exists()

    loaded = TaskEmbeddings.from_pretrained("mallory/tasks", endpoint=server.url)
    assert torch.equal(loaded.embeddings, embeddings.embeddings) and loaded.task_names == ["a", "b"]
    fetched = sorted(
        path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for _, path in server.requests if "/resolve/" in path
    )
    assert set(fetched) == {CONFIG_FILE, EMBEDDINGS_FILE}  # the traversal names were listed but never requested
    assert snapshot(root) == before  # the download folder is gone and nothing appeared anywhere else
    assert not list(root.rglob("evil.json")) and Path("/tmp/evil.json").exists() == tmp_evil

    target = root / "target"
    loaded.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, EMBEDDINGS_FILE, README_FILE])
    assert set(snapshot(root)) - set(before) == {
        "target",
        *(f"target/{n}" for n in (CONFIG_FILE, EMBEDDINGS_FILE, README_FILE)),
    }


def test_hub_repo_with_only_traversal_names_is_refused(isolated_hub) -> None:
    server, root = isolated_hub
    good = embedding_files(TaskEmbeddings.from_model(trained_cnn(1)), root / "source")
    server.create_repo(
        "mallory/only-evil",
        files={f"../{CONFIG_FILE}": good[CONFIG_FILE], f"../{EMBEDDINGS_FILE}": good[EMBEDDINGS_FILE]},
    )
    before = snapshot(root)
    with pytest.raises(ValueError, match=f"holds no HyperLoRA task embeddings: it has no {CONFIG_FILE}"):
        TaskEmbeddings.from_pretrained("mallory/only-evil", endpoint=server.url)
    assert snapshot(root) == before
    assert not [path for _, path in server.requests if "/resolve/" in path]


def test_local_task_embeddings_loader_ignores_other_files(tmp_path: Path) -> None:
    # A local folder is read by the two fixed names only: opening either of these would fail the load.
    folder = TaskEmbeddings.from_model(trained_cnn(1)).save_pretrained(tmp_path / "te")
    (folder / "evil.pkl").write_bytes(b"\x80\x04not a pickle that anyone should load")
    (folder / "link.json").symlink_to(tmp_path / "nowhere.json")
    assert TaskEmbeddings.from_pretrained(folder).num_tasks == 1


# --- file permissions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_have_the_permissions_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """The atomic writers stage in mkstemp/mkdtemp names, which are private (0600/0700) whatever the umask."""
    import os
    import stat

    from hyperlora.files import atomic_directory, atomic_write_json

    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"faa": 1.0})
        with atomic_directory(tmp_path / "final") as staging:
            trained_cnn(1).save_pretrained(staging / "adapter")
        trained_cnn(1).save_pretrained(tmp_path / "adapter")  # PEFT's own save (safetensors writes 0600)
        TaskEmbeddings.from_model(trained_cnn(1)).save_pretrained(tmp_path / "te")
    finally:
        os.umask(previous)
    written = [tmp_path / "metrics.json", tmp_path / "final", tmp_path / "te", *(tmp_path / "adapter").iterdir()]
    for path in [*written, *(tmp_path / "final").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "te").iterdir()} == {0o666 & ~umask}
