"""Hard interruptions and numerical faults: SIGKILL mid-task, mid-checkpoint and mid-H-embedding, then resume.

The killed runs are separate processes (``subprocess.run`` of a tiny script that calls ``child_main`` below), killed
with ``os.kill(os.getpid(), signal.SIGKILL)`` from inside: no ``finally``, no ``atexit``, no flushing. A resumed
process must then reproduce the metrics of an uninterrupted run with the same seed, and whatever the kill left on disk
must be either whole or inside a temporary ``.NAME.XXXX.tmp`` folder/file of hyperlora.files (which the next
published checkpoint removes).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import BN_CNN_TARGETS, build_bn_cnn
from test_trainer import arguments, config, make_task, tiny_vit
from torch.optim.optimizer import register_optimizer_step_pre_hook

import hyperlora.method.embedding as embedding_module
import hyperlora.training.checkpointing as checkpointing_module
from hyperlora.data import Task
from hyperlora.files import latest_checkpoint
from hyperlora.method.transferability import h_score
from hyperlora.trainer import ContinualTrainer
from hyperlora.training.step import TaskStep

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# atomic_directory's mkdtemp(prefix=".NAME.", suffix=".tmp") and atomic_write_text's mkstemp(same): never finished.
INCOMPLETE = re.compile(r"^\..+\.tmp$")


def make_tasks() -> list[Task]:
    return [make_task(f"t{i}", [2 * i, 2 * i + 1], seed=i) for i in range(3)]


def make_trainer(backbone: str, output_dir: Path, **overrides) -> ContinualTrainer:
    """The run every test here repeats: a tiny timm ViT, or a CNN with BatchNorm passed in train mode (whose running
    statistics a resumed run would not reproduce if anything updated them)."""
    if backbone == "vit":
        return ContinualTrainer(tiny_vit(), config(), arguments(output_dir, **overrides))
    return ContinualTrainer(build_bn_cnn(), config(target_modules=BN_CNN_TARGETS), arguments(output_dir, **overrides))


# --- the child process -----------------------------------------------------------------------------------------------


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str) -> None:
    """Patch this process so that it SIGKILLs itself at ``point``."""
    current = {"train": None, "h": None, "steps": 0}

    def tracking(method, key):
        def wrapper(self, t, *args):
            current[key], current["steps"] = t, 0
            if key == "train":
                print(f"TRAINING TASK {t}", flush=True)
            try:
                return method(self, t, *args)
            finally:
                current[key] = None

        return wrapper

    ContinualTrainer._train_task = tracking(ContinualTrainer._train_task, "train")
    ContinualTrainer._h_embedding = tracking(ContinualTrainer._h_embedding, "h")

    if point == "train":  # task 1, just before its 2nd optimizer step

        def before_step(optimizer, args, kwargs):
            if current["train"] == 1 and isinstance(optimizer, torch.optim.AdamW):
                current["steps"] += 1
                if current["steps"] == 2:
                    _die()

        register_optimizer_step_pre_hook(before_step)
    elif point == "checkpoint":  # task 1's checkpoint: adapter written, heads.safetensors half written
        real_save_file = checkpointing_module.save_file

        def save_file(tensors, filename, metadata=None):
            path = Path(filename)
            if path.name == "heads.safetensors" and path.parent.name.startswith(".task-001."):
                data = safetensors.torch.save(tensors, metadata=metadata)
                with open(path, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                _die()
            return real_save_file(tensors, filename, metadata=metadata)

        checkpointing_module.save_file = save_file
    elif point == "h_embedding":  # task 2, right after its H-scores, before the embedding fit
        real_transferability = embedding_module.transferability

        def transferability_then_die(*args, **kwargs):
            scores = real_transferability(*args, **kwargs)
            if current["h"] == 2:
                _die()
            return scores

        embedding_module.transferability = transferability_then_die
    elif point != "none":
        raise ValueError(point)


def child_main(argv: list[str]) -> None:
    """``child.py BACKBONE OUTPUT_DIR POINT [resume]``: the same run as the ``reference`` fixture, killed at POINT."""
    backbone, output_dir, point = argv[:3]
    torch.set_num_threads(1)  # as conftest.py does for the pytest process: same numerics as the reference
    _install_kill(point)
    make_trainer(backbone, Path(output_dir), resume_from_checkpoint=argv[3:] == ["resume"]).fit(make_tasks())


CHILD = """\
import sys
from test_interruption import child_main  # found through PYTHONPATH
child_main(sys.argv[1:])
"""


# --- helpers ---------------------------------------------------------------------------------------------------------


def _run_child(
    script: Path, backbone: str, output_dir: Path, point: str, resume: bool = False
) -> subprocess.CompletedProcess:
    command = [sys.executable, str(script), backbone, str(output_dir), point] + (["resume"] if resume else [])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _trained_tasks(child: subprocess.CompletedProcess) -> list[int]:
    return [int(line.split()[-1]) for line in child.stdout.splitlines() if line.startswith("TRAINING TASK ")]


def _check_files(root: Path) -> list[Path]:
    """Every finished *.json parses and every finished *.safetensors loads; returns the unfinished (.NAME.X.tmp)
    folders and files, whose contents are not checked."""
    incomplete = []
    for directory, subdirs, files in os.walk(root):
        directory = Path(directory)
        for name in [*subdirs, *files]:
            if INCOMPLETE.match(name):
                incomplete.append(directory / name)
        subdirs[:] = [name for name in subdirs if not INCOMPLETE.match(name)]
        for name in files:
            path = directory / name
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".safetensors"):
                safetensors.torch.load_file(path)
    return sorted(incomplete)


def _assert_close(actual, expected, where: str = "metrics") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and isinstance(actual, float):
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _without_timings(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "timings"}  # wall-clock seconds differ per run


def _assert_latest_checkpoint_loads(output_dir: Path, name: str) -> None:
    path = latest_checkpoint(output_dir / "checkpoints")
    assert path is not None and path.name == name
    assert json.loads((path / "state.json").read_text())["completed"] == int(name.removeprefix("task-")) + 1
    for file in ("adapter/adapter_model.safetensors", "heads.safetensors", "frozen.safetensors"):
        assert safetensors.torch.load_file(path / file)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks()


@pytest.fixture(scope="module")
def references(tmp_path_factory, tasks) -> dict[str, dict]:
    """metrics.json of the uninterrupted run per backbone, made on first use (in this process; the children run the
    very same code)."""
    cache: dict[str, dict] = {}

    def reference(backbone: str) -> dict:
        if backbone not in cache:
            output_dir = tmp_path_factory.mktemp(f"reference-{backbone}")
            make_trainer(backbone, output_dir).fit(tasks)
            cache[backbone] = _without_timings(json.loads((output_dir / "metrics.json").read_text()))
        return cache[backbone]

    return reference


@pytest.fixture(scope="module")
def reference(references) -> dict:
    return references("vit")


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("child") / "child.py"
    script.write_text(CHILD)
    return script


# --- SIGKILL, then resume --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit", "batchnorm_cnn"])
@pytest.mark.parametrize(
    "point, latest",
    [("train", "task-000"), ("checkpoint", "task-000"), ("h_embedding", "task-001")],
)
def test_sigkill_leaves_whole_files_and_resume_matches_uninterrupted(
    tmp_path, references, child_script, backbone, point, latest
):
    output_dir = tmp_path / "run"
    killed = _run_child(child_script, backbone, output_dir, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _trained_tasks(killed) == [0, 1]  # each kill point lies in or after task 1's training, before task 2's

    # What the kill left: the last finished checkpoint, whole; no outputs of a finished run.
    incomplete = _check_files(output_dir)
    _assert_latest_checkpoint_loads(output_dir, latest)
    assert not (output_dir / "metrics.json").exists() and not (output_dir / "final").exists()
    if point == "checkpoint":
        # The half-written checkpoint exists, but only as atomic_directory's temporary folder, and it is truncated.
        [folder] = incomplete
        assert folder.parent.name == "checkpoints" and folder.name.startswith(".task-001.") and folder.is_dir()
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        with pytest.raises(safetensors.SafetensorError):
            safetensors.torch.load_file(folder / "heads.safetensors")
        assert not (output_dir / "checkpoints" / "task-001").exists()
    else:
        assert incomplete == []

    resumed = _run_child(child_script, backbone, output_dir, "none", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _trained_tasks(resumed) == list(range(int(latest[-3:]) + 1, 3))  # from the checkpoint on, not from 0
    # Resume reads only what `latest` names and ignores the temporary folder; publishing the next checkpoint
    # (publish_checkpoint) then deletes it with every older checkpoint.
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["latest", "task-002"]
    assert _check_files(output_dir) == []
    metrics = json.loads((output_dir / "metrics.json").read_text())
    _assert_close(_without_timings(metrics), references(backbone))


# --- numerical faults ------------------------------------------------------------------------------------------------


def test_nan_loss_names_the_task_keeps_the_last_checkpoint_and_resume_recovers(tmp_path, tasks, reference, monkeypatch):
    real_train_task = ContinualTrainer._train_task

    def explode_task_1(self, t, *rest):
        if t == 1:  # a learning rate of 1e30: the weights reach ~1e30 after one step and the next loss is NaN
            monkeypatch.setattr(self.args, "learning_rate", 1e30)
            monkeypatch.setattr(self.args, "head_learning_rate", 1e30)
        return real_train_task(self, t, *rest)

    monkeypatch.setattr(ContinualTrainer, "_train_task", explode_task_1)
    with pytest.raises(FloatingPointError, match=r"task 1 \(t1\): the loss became (nan|inf)"):
        ContinualTrainer(tiny_vit(), config(), arguments(tmp_path)).fit(tasks)
    monkeypatch.undo()

    assert _check_files(tmp_path) == []
    _assert_latest_checkpoint_loads(tmp_path, "task-000")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "task-000"]
    assert not (tmp_path / "metrics.json").exists()

    trained = []
    monkeypatch.setattr(
        ContinualTrainer, "_train_task", lambda self, t, *rest: trained.append(t) or real_train_task(self, t, *rest)
    )
    ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, resume_from_checkpoint=True)).fit(tasks)
    assert trained == [1, 2]
    _assert_close(_without_timings(json.loads((tmp_path / "metrics.json").read_text())), reference)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_gradient_spike_reaches_the_optimizer_clipped_to_max_grad_norm(tmp_path, tasks, monkeypatch, max_grad_norm):
    """A finite 1e8 loss spike at step 2: the optimizer sees a gradient of norm <= max_grad_norm (and of ~1e8 with
    clipping off); training carries on and stays finite."""
    real_forward = TaskStep.forward
    calls, norms = [], []

    def spiking_forward(self, *args, **kwargs):
        loss, parts = real_forward(self, *args, **kwargs)
        calls.append(None)
        return (loss * 1e8 if len(calls) == 2 else loss), parts

    def before_step(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.AdamW):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    monkeypatch.setattr(TaskStep, "forward", spiking_forward)
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        results = ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, max_grad_norm=max_grad_norm)).fit(
            tasks[:1]
        )
    finally:
        handle.remove()
    assert len(norms) == 3 and all(math.isfinite(n) for n in norms)
    if max_grad_norm is None:
        assert norms[1] > 1e6
    else:
        assert max(norms) <= max_grad_norm * (1 + 1e-4)
    assert math.isfinite(results["accuracy_matrix"][0][0])
    weights = safetensors.torch.load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- degenerate H-score inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shrinkage", [True, False])
@pytest.mark.parametrize("value", [1.0, 0.0, -2.5, 0.1, 1 / 3, 123.456])  # 0.1 etc.: means not exact in float
def test_constant_features_score_zero_as_documented(value, shrinkage):
    features = np.full((10, 4), value)
    assert h_score(features, np.arange(10) % 2, shrinkage=shrinkage) == 0.0


@pytest.mark.parametrize("shrinkage", [True, False])
def test_one_class_is_a_clear_value_error(shrinkage):
    features = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        h_score(features, np.full(12, 3), shrinkage=shrinkage)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        h_score(torch.ones(12, 4), torch.zeros(12, dtype=torch.long), shrinkage=shrinkage)


def test_a_one_class_task_is_refused_before_training_and_named():
    with pytest.raises(ValueError, match=r"task 'solo': needs at least 2 classes"):
        make_task("solo", [4], seed=0, train_per_class=3, test_per_class=2)


def test_publishing_a_checkpoint_clears_what_killed_runs_left(tmp_path):
    from hyperlora.files import latest_checkpoint, publish_checkpoint

    for name in ("task-000", "task-001", ".task-002.ab12.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    (tmp_path / ".latest.x9y8.tmp").write_text("task-0")  # a pointer write cut short
    publish_checkpoint(tmp_path, "task-001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "task-001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "task-001"
