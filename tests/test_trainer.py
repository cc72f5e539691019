"""ContinualTrainer end to end on tiny synthetic image tasks: outputs, metrics, determinism and resume."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import timm
import torch
from conftest import BN_CNN_TARGETS, build_bn_cnn
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from hyperlora import HyperLoraConfig
from hyperlora.data import Task
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments
from hyperlora.training import TrainerCallback
from hyperlora.training.prefix import FrozenPrefix
from hyperlora.training.reporting import tracker_config
from hyperlora.training.step import TaskStep


def _images(rng: np.random.Generator, label: int, count: int, size: int = 16) -> list[PILImage.Image]:
    """Each class is a bright horizontal band at its own height, with noise: learnable by a tiny ViT in a few steps."""
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 60, size=(size, size, 3))
        row = (label * 3) % (size - 3)
        pixels[row : row + 3, :, label % 3] = 255
        images.append(PILImage.fromarray(pixels.astype(np.uint8)))
    return images


def make_task(name: str, labels: list[int], seed: int, train_per_class: int = 12, test_per_class: int = 6) -> Task:
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": Value("int64")})

    def split(count):
        images = [image for label in labels for image in _images(rng, label, count)]
        return Dataset.from_dict(
            {"image": images, "label": [label for label in labels for _ in range(count)]}, features=features
        )

    return Task(name, split(train_per_class), split(test_per_class))


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return [make_task(f"t{i}", [2 * i, 2 * i + 1], seed=i) for i in range(3)]


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )


def config(**overrides) -> HyperLoraConfig:
    values = dict(
        r=2,
        lora_alpha=4,
        hypernet_hidden_dim=16,
        task_embedding_dim=8,
        module_embedding_dim=8,
        h_embedding_steps=50,
        h_score_samples=32,
    )
    return HyperLoraConfig(**(values | overrides))


def arguments(tmp_path, **overrides) -> ContinualTrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        max_steps_per_task=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        seed=3,
        plots=False,
    )
    return ContinualTrainingArguments(**(values | overrides))


def run(tmp_path, tasks, **overrides) -> dict:
    return ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, **overrides)).fit(tasks)


def test_fit_writes_metrics_artifacts_and_plots(tmp_path, tasks):
    results = run(tmp_path, tasks, plots=True)
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("faa", "daa", "avg_incremental_accuracy", "forgetting", "bwt", "fwt", "accuracy_matrix"):
        assert key in written and key in written["class_incremental"]
    matrix = np.array(written["accuracy_matrix"], dtype=float)
    assert matrix.shape == (3, 3)
    assert np.all(np.isfinite(np.diag(matrix))) and np.all(matrix[np.tril_indices(3)] >= 0)
    # no accuracy of an unseen task: the FWT probe's values are kept apart, and FWT is computed from them
    assert np.isnan(matrix[np.triu_indices(3, k=1)]).all()
    start, baseline = written["fwt_start"], written["fwt_baseline"]
    assert math.isclose(written["fwt"], np.mean([start[j] - baseline[j] for j in (1, 2)]), rel_tol=1e-9)
    assert math.isclose(written["faa"], float(np.mean(matrix[-1])), rel_tol=1e-9)
    assert math.isclose(results["faa"], written["faa"])
    h = np.array(written["h_scores"], dtype=float)
    assert np.isnan(h[0]).all() and np.isfinite(h[1, :1]).all() and np.isfinite(h[2, :2]).all()
    assert len(written["class_incremental"]["router_task_accuracy"]) == 3
    embeddings = json.loads((tmp_path / "embeddings.json").read_text())
    assert np.array(embeddings["embeddings"]).shape == (3, 8)
    for name in ("accuracy_matrix.png", "accuracy_matrix_class_incremental.png", "h_scores.png", "embeddings.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adapter/adapter_model.safetensors", "heads.safetensors", "frozen.safetensors"):
        assert (tmp_path / "final" / name).is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "task-002"
    assert all(t > 0 for t in written["timings"]["train_s"])


def test_callbacks_see_every_task_and_step_in_order_and_their_step_time_counts_in_train_s(tmp_path, tasks):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def on_task_begin(self, trainer, t, state):
            self.events.append(("begin", t, state.completed))

        def on_step_end(self, trainer, t, step, state):
            self.events.append(("step", t, step))
            if step == 1:
                time.sleep(0.2)  # inside the task's training

        def on_task_end(self, trainer, t, state):
            self.events.append(("end", t, state.completed))

    recorder = Recorder()
    args = arguments(tmp_path, max_steps_per_task=2)
    results = ContinualTrainer(tiny_vit(), config(), args, callbacks=[recorder]).fit(tasks[:2])
    assert recorder.events == [
        ("begin", 0, 0), ("step", 0, 1), ("step", 0, 2), ("end", 0, 1),
        ("begin", 1, 1), ("step", 1, 1), ("step", 1, 2), ("end", 1, 2),
    ]  # fmt: skip
    assert all(seconds >= 0.2 for seconds in results["timings"]["train_s"])


@pytest.mark.parametrize("embedding_learning_rate", [None, 5e-3])
def test_the_optimizer_has_one_group_per_learning_rate_holding_every_trained_parameter_once(embedding_learning_rate):
    from peft import get_peft_model

    from hyperlora.training.step import TaskStep, create_optimizer

    model = get_peft_model(tiny_vit(), config())
    for _ in range(2):
        model.add_task()
    head = torch.nn.Linear(32, 2)
    step = TaskStep(model, head, 1, config(), h_embedding=torch.randn(8))
    args = ContinualTrainingArguments(
        learning_rate=1e-3, head_learning_rate=1e-2, embedding_learning_rate=embedding_learning_rate
    )
    groups = create_optimizer(step, args).param_groups
    hypernet = model.base_model.hypernet
    embedding = hypernet.task_embeddings[1]
    expected = {1e-3: [p for p in hypernet.parameters() if p.requires_grad and p is not embedding]}
    expected.setdefault(embedding_learning_rate or 1e-3, []).append(embedding)
    expected[1e-2] = list(head.parameters())
    assert [group["lr"] for group in groups] == list(expected)
    for group, params in zip(groups, expected.values(), strict=True):
        assert {id(p) for p in group["params"]} == {id(p) for p in params}
        assert len(group["params"]) == len(params)
    assert not hypernet.task_embeddings[0].requires_grad  # the old task's embedding is not trained
    assert "free" in {name.split(".")[0] for name, p in hypernet.named_parameters() if p.requires_grad}
    step.release()


def _frozen_features(split: str, tasks: list[Task]) -> tuple[np.ndarray, np.ndarray]:
    """The untouched backbone's features of every task's split, computed here without the trainer."""
    from hyperlora.data import TaskImages, image_spec

    backbone = tiny_vit().eval()
    features, labels = [], []
    for task in tasks:
        images = TaskImages(getattr(task, split), image_spec(backbone).transform(), task.classes)
        with torch.no_grad():
            features.append(backbone(torch.stack([images[i][0] for i in range(len(images))])).double().numpy())
        labels.append(np.asarray(getattr(task, split)["label"]))
    return np.concatenate(features), np.concatenate(labels)


def test_frozen_baselines_match_scikit_learn_and_numpy_on_the_same_features(tmp_path, tasks):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results = run(tmp_path, tasks, plots=False)
    written = results["frozen_baselines"]
    train_x, train_y = _frozen_features("train", tasks)
    test_x, test_y = _frozen_features("test", tasks)
    probes, centroids = [], []
    for task in tasks:
        train, test = np.isin(train_y, task.classes), np.isin(test_y, task.classes)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_x[train], train_y[train])
        probes.append(probe.score(test_x[test], test_y[test]))
        centroids.append(NearestCentroid().fit(train_x[train], train_y[train]).score(test_x[test], test_y[test]))
    # FWT's baseline: the nearest-class-mean probe of each new task on the untrained backbone
    np.testing.assert_allclose(results["fwt_baseline"][1:], centroids[1:], atol=1e-9)
    assert results["fwt_baseline"][0] is None or np.isnan(results["fwt_baseline"][0])
    np.testing.assert_allclose(written["linear_probe_per_task"], probes, atol=1e-9)
    assert written["linear_probe"] == pytest.approx(np.mean(probes))
    # LDA over all seen classes, as the router defines it: within-class covariance / (n - C), shrunk by 0.1 towards
    # its mean variance, equal priors
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    centred = train_x - means[np.searchsorted(classes, train_y)]
    covariance = centred.T @ centred / (len(train_y) - len(classes))
    d = covariance.shape[0]
    shrunk = 0.9 * covariance + 0.1 * np.trace(covariance) / d * np.eye(d)
    weights = np.linalg.solve(shrunk, means.T)
    scores = test_x @ weights - 0.5 * np.sum(means * weights.T, axis=1)
    assert written["lda"] == pytest.approx(np.mean(classes[scores.argmax(1)] == test_y))
    assert written["lda"] == written["lda_per_step"][-1]
    assert 0.0 <= written["ncm"] <= 1.0 and len(written["ncm_per_step"]) == 3


def test_unaugmented_splits_are_decoded_once_and_the_cache_changes_no_result(tmp_path, tasks, monkeypatch):
    from hyperlora.data import tasks as data
    from hyperlora.training import features

    calls = []
    transform = data.ImageSpec.transform

    def counting(self, augment=False):
        inner = transform(self, augment)
        return lambda image: calls.append(image) or inner(image)

    monkeypatch.setattr(data.ImageSpec, "transform", counting)
    cached = run(tmp_path / "cached", tasks, num_train_epochs=3, max_steps_per_task=None)
    decoded_once = len(calls)
    # every image of every split, once: (12 + 6) per class, 2 classes, 3 tasks
    assert decoded_once == 3 * 2 * (12 + 6)
    monkeypatch.setattr(features, "IMAGE_CACHE_BYTES", 0)
    calls.clear()
    uncached = run(tmp_path / "uncached", tasks, num_train_epochs=3, max_steps_per_task=None)
    assert len(calls) > 3 * decoded_once
    for key in ("accuracy_matrix", "fwt_start", "h_scores"):
        np.testing.assert_array_equal(np.array(uncached[key], float), np.array(cached[key], float), err_msg=key)


def test_h_scores_are_normalised_and_the_h_embedding_is_recorded(tmp_path, tasks):
    results = run(tmp_path, tasks, plots=False)
    h = np.array(results["h_scores"], dtype=float)
    assert np.all((h[np.tril_indices(3, k=-1)] >= 0) & (h[np.tril_indices(3, k=-1)] <= 1))
    assert results["h_score_features"] == "head"
    assert np.isnan(results["gamma"][0]) and results["gamma"][2] > 0
    assert results["consistency_ratio"][2] >= 0 and -1 <= results["h_embedding_rank_correlation"][2] <= 1
    embeddings = json.loads((tmp_path / "embeddings.json").read_text())
    assert np.array(embeddings["h_embeddings"]).shape == (3, 8)
    for key in ("consistency_ratio", "gamma", "h_embedding_rank_correlation"):
        assert len(embeddings[key]) == 3


def test_same_seed_same_results_and_resume_matches_uninterrupted(tmp_path, tasks, monkeypatch):
    reference = run(tmp_path / "a", tasks)
    assert run(tmp_path / "b", tasks)["accuracy_matrix"] == reference["accuracy_matrix"]

    from hyperlora.training import trainer as trainer_module

    real_checkpoint = trainer_module.save_checkpoint

    def interrupt_after_second_task(output_dir, state, *artifacts):
        real_checkpoint(output_dir, state, *artifacts)
        if state.completed == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_checkpoint", interrupt_after_second_task)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", tasks)
    monkeypatch.undo()
    assert (tmp_path / "c" / "checkpoints" / "latest").read_text().strip() == "task-001"
    resumed = run(tmp_path / "c", tasks, resume_from_checkpoint=True)
    for key in ("accuracy_matrix", "h_scores", "faa", "forgetting"):
        assert resumed[key] == reference[key], key
    assert resumed["class_incremental"]["accuracy_matrix"] == reference["class_incremental"]["accuracy_matrix"]


def snapshot(root) -> dict[str, bytes | None]:
    """Every path under root (directories as None) with its bytes: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_a_resume_that_changes_the_run_is_refused_naming_every_difference_and_writes_nothing(tmp_path, tasks):
    first = run(tmp_path, tasks[:2])
    before = snapshot(tmp_path)
    changed = arguments(tmp_path, resume_from_checkpoint=True, learning_rate=0.5, max_steps_per_task=4, augment=True)
    trainer = ContinualTrainer(tiny_vit(), config(r=3), changed)
    for call in (trainer.check_resume, trainer.fit):
        with pytest.raises(ValueError, match="cannot resume") as refused:
            call([tasks[0], tasks[2]])
        message = str(refused.value)
        assert "tasks: ['t0', 't1'] in the checkpoint, ['t0', 't2'] now" in message
        assert "HyperLoraConfig.r: 2 in the checkpoint, 3 now" in message
        for name in ("learning_rate: 0.001", "max_steps_per_task: 3", "augment: False"):
            assert name in message
        assert "lora_alpha" not in message and "seed" not in message  # only what differs
        assert snapshot(tmp_path) == before

    # What only changes where and how a run reports is accepted; the finished run is read back, not retrained.
    safe = dict(logging_steps=1, per_device_eval_batch_size=5, plots=True, dataloader_num_workers=1, report_to="none")
    trainer = ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, resume_from_checkpoint=True, **safe))
    trainer.check_resume(tasks[:2])
    assert snapshot(tmp_path) == before
    resumed = trainer.fit(tasks[:2])
    assert resumed["accuracy_matrix"] == first["accuracy_matrix"]
    assert (tmp_path / "h_scores.png").is_file()


def test_a_fresh_run_into_a_folder_with_checkpoints_needs_overwrite_output_dir(tmp_path, tasks):
    run(tmp_path, tasks[:2])
    before = snapshot(tmp_path)
    trainer = ContinualTrainer(tiny_vit(), config(), arguments(tmp_path))
    for call in (trainer.check_resume, trainer.fit):
        with pytest.raises(ValueError, match=r"--resume_from_checkpoint .* or --overwrite_output_dir"):
            call(tasks[:1])
        assert snapshot(tmp_path) == before
    run(tmp_path, tasks[2:], overwrite_output_dir=True)  # starts over: the old run's checkpoints are gone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "task-000"]
    state = json.loads((tmp_path / "checkpoints" / "task-000" / "state.json").read_text())
    assert state["task_names"] == ["t2"] and state["training_arguments"]["overwrite_output_dir"] is True


def test_check_resume_without_checkpoints_is_a_no_op_that_writes_nothing(tmp_path, tasks):
    for resume in (False, True):
        trainer = ContinualTrainer(tiny_vit(), config(), arguments(tmp_path / "new", resume_from_checkpoint=resume))
        trainer.check_resume(tasks)
        assert not (tmp_path / "new").exists()


def test_old_tasks_are_not_forgotten_by_construction(tmp_path, tasks):
    """With the output regulariser, old tasks' generated weights barely move while new tasks train."""
    results = run(tmp_path, tasks, max_steps_per_task=6)
    matrix = np.array(results["accuracy_matrix"], dtype=float)
    assert results["forgetting"] <= 0.25
    assert matrix[0, 0] >= 0.5


def test_bad_tasks_and_arguments_are_rejected(tmp_path, tasks):
    with pytest.raises(ValueError, match="unique"):
        run(tmp_path, [tasks[0], tasks[0]])
    with pytest.raises(ValueError, match="at least one task"):
        run(tmp_path, [])
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        ContinualTrainingArguments(per_device_train_batch_size=0)
    empty = Dataset.from_dict(
        {"image": [], "label": []}, features=Features({"image": Image(), "label": Value("int64")})
    )
    with pytest.raises(ValueError, match="empty"):
        Task("x", empty, tasks[0].test)
    with pytest.raises(ValueError, match="'image' and 'label'"):
        Task("x", tasks[0].train.rename_column("label", "target"), tasks[0].test)
    assert not list((tmp_path).glob("metrics.json"))


def base_state(model: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer of a base model (BatchNorm statistics included), as bytes, under its own names."""
    return {
        name.replace(".base_layer", ""): tensor.detach().cpu().contiguous().numpy().tobytes()
        for name, tensor in model.state_dict().items()
        if "hyperlora_" not in name
    }


def test_fit_leaves_every_base_model_tensor_untouched_batchnorm_included(tmp_path, tasks):
    model = build_bn_cnn()
    assert model.training  # passed in as built, in train mode
    before = base_state(model)
    assert any(name.endswith("running_mean") for name in before)
    trainer = ContinualTrainer(model, config(target_modules=BN_CNN_TARGETS), arguments(tmp_path))
    trainer.fit(tasks[:2])
    after = base_state(trainer.model.get_base_model())
    assert after.keys() == before.keys()
    assert [name for name in before if after[name] != before[name]] == []


def test_tracker_config_holds_only_scalars_every_tracker_accepts():
    from peft import PeftType

    values = {"a": None, "b": [2, 1], "c": {"d": {"y", "x"}, "e": 1.5}, "f": PeftType.LORA, "g": True, "h": "s"}
    assert tracker_config(values) == {
        "a": "None",
        "b": "2,1",
        "c/d": "x,y",
        "c/e": 1.5,
        "f": "LORA",
        "g": True,
        "h": "s",
    }


def test_report_to_tensorboard_logs_the_run_under_output_dir(tmp_path, tasks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, tasks[:2], report_to="tensorboard", logging_steps=1)
    event_files = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files
    scalars = {}
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in events.Scalars(tag))
    assert len(scalars["train/loss"]) == 6 and all(math.isfinite(v) for v in scalars["train/loss"])  # 3 steps x 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert scalars["eval/task_il_accuracy"] == pytest.approx(
        [np.mean(row[: t + 1]) for t, row in enumerate(metrics["accuracy_matrix"])]
    )


def test_without_a_terminal_progress_is_printed_as_log_lines(tmp_path, tasks, capsys):
    """capsys's stdout and stderr are not terminals, as under SLURM or `> log`: tqdm is off, log lines say it all."""
    results = run(tmp_path, tasks[:2], logging_steps=2)
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if " step " in line]
    pattern = r"task (\d) \((t\d)\) step (\d)/3: loss [\d.]+ \(ce [\d.]+(, reg [\d.]+)?(, emb [\d.]+)?\), lr ([\d.e-]+)"
    parsed = [re.fullmatch(pattern, line) for line in steps]
    assert all(parsed), steps
    # every logging_steps steps and at the task's last step; the cosine schedule's rate used by that step
    assert [(m[1], m[2], m[3], float(m[6])) for m in parsed] == [
        ("0", "t0", "2", 7.5e-4),
        ("0", "t0", "3", 2.5e-4),
        ("1", "t1", "2", 7.5e-4),
        ("1", "t1", "3", 2.5e-4),
    ]
    assert parsed[2][4] is not None  # task 1 also has the regulariser
    done = [line for line in lines if " done, " in line]
    assert len(done) == 2
    for t, line in enumerate(done):
        til = np.mean(results["accuracy_matrix"][t][: t + 1])
        cil = results["class_incremental"]["seen_class_accuracy"][t]
        assert line.startswith(f"task {t} (t{t}) done, {t + 1} of 2: task-IL accuracy {til:.4f} over the seen tasks")
        assert f"class-IL {cil:.4f}" in line and re.search(r"h-embedding [\d.]+s, train [\d.]+s, eval [\d.]+s$", line)
    assert lines.index(steps[-1]) < lines.index(done[-1])  # in order, as they happen


def test_seed_fixes_the_hypernetwork_initialisation_whatever_ran_before(tmp_path, tasks):
    adapters = []
    for global_seed in (1, 2):
        model = build_bn_cnn()
        torch.manual_seed(global_seed)  # what ran before in the process
        torch.rand(global_seed)
        trainer = ContinualTrainer(model, config(target_modules=BN_CNN_TARGETS), arguments(tmp_path / str(global_seed)))
        initial = {k: v.clone() for k, v in trainer.model.base_model.hypernet.state_dict().items()}
        trainer.fit(tasks[:1])
        adapter = tmp_path / str(global_seed) / "final" / "adapter" / "adapter_model.safetensors"
        adapters.append((initial, adapter.read_bytes()))
    (first, first_adapter), (second, second_adapter) = adapters
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first_adapter == second_adapter
    other = ContinualTrainer(build_bn_cnn(), config(target_modules=BN_CNN_TARGETS), arguments(tmp_path, seed=4))
    assert any(not torch.equal(v, first[k]) for k, v in other.model.base_model.hypernet.state_dict().items())


def _hf_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    options = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    return ViTForImageClassification(ViTConfig(**options, patch_size=8, num_labels=7))


def test_a_transformers_model_with_a_task_head_is_trained_through_its_base_model(tmp_path, tasks):
    classifier = _hf_classifier()
    trainer = ContinualTrainer(classifier, config(), arguments(tmp_path))
    assert trainer.model.get_base_model() is classifier.vit  # features, not the 7 logits of its head
    results = trainer.fit(tasks[:1])
    assert 0.0 <= results["accuracy_matrix"][0][0] <= 1.0


def test_models_that_return_logits_are_refused_saying_what_to_pass():
    from peft import get_peft_model

    with pytest.raises(TypeError, match=r"wrap its base model instead \(get_peft_model\(model.vit, config\)\)"):
        ContinualTrainer(get_peft_model(_hf_classifier(), config()))
    timm_classifier = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=1)
    with pytest.raises(TypeError, match=r"5-class classifier.*num_classes=0"):
        ContinualTrainer(timm_classifier, config())


def test_a_resume_from_a_damaged_checkpoint_is_refused_by_file_name_and_writes_nothing(tmp_path, tasks):
    run(tmp_path, tasks[:1])
    checkpoint = tmp_path / "checkpoints" / "task-000"
    for name in ("adapter/adapter_model.safetensors", "heads.safetensors", "frozen.safetensors"):
        intact = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))  # tensor data: still loads
        before = snapshot(tmp_path)
        trainer = ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, resume_from_checkpoint=True))
        for call in (trainer.check_resume, trainer.fit):
            with pytest.raises(ValueError, match=rf"{re.escape(str(checkpoint / name))} does not match the SHA-256"):
                call(tasks[:1])
            assert snapshot(tmp_path) == before
        (checkpoint / name).write_bytes(intact)
    ContinualTrainer(tiny_vit(), config(), arguments(tmp_path, resume_from_checkpoint=True)).check_resume(tasks[:1])


def test_guidance_is_logged_over_each_guided_task_without_changing_training(tmp_path, tasks, monkeypatch):
    """metrics.json's ``guidance``: [step, L_emb, norm of beta_emb * grad L_emb on the hypernetwork] at the first step
    and every tenth of each task that has an H-embedding (not the first task)."""
    results = run(tmp_path / "logged", tasks[:2])  # max_steps_per_task 3: steps 1, 2 and 3
    guidance = json.loads((tmp_path / "logged" / "metrics.json").read_text())["guidance"]
    assert guidance == results["guidance"]
    assert guidance[0] == [] and [step for step, _, _ in guidance[1]] == [1, 2, 3]
    for _, loss, norm in guidance[1]:
        assert 0.0 <= loss <= 4.0 and np.isfinite(norm) and norm > 0  # a squared gap of cosines, and a gradient
    monkeypatch.setattr(TaskStep, "guidance_probe", lambda self: None)
    unlogged = run(tmp_path / "unlogged", tasks[:2])
    assert unlogged["guidance"] == [[], []]
    assert unlogged["accuracy_matrix"] == results["accuracy_matrix"]  # the probe reads, it never trains


LAST_BLOCK = r"blocks\.1\.mlp\.fc\d"  # adapted in two_block_vit: block 0 is a frozen prefix


def two_block_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    )


def test_frozen_features_read_the_h_score_sample_first_in_the_splits_order(tmp_path, tasks):
    """The frozen pass that reads the H-score's sample first, in parts and through the prefix, gives the plain pass's
    features and labels row for row, and keeps the sample's prefix: one output per part (one batch each)."""
    trainer = ContinualTrainer(two_block_vit(), config(target_modules=LAST_BLOCK), arguments(tmp_path))
    plain_features, plain_labels = trainer.reader.frozen_features(tasks[0])
    prefix = FrozenPrefix(trainer.model)
    features, labels = trainer.reader.frozen_features(tasks[0], [[5, 0, 9], [3, 11, 2, 7]], prefix)
    torch.testing.assert_close(features, plain_features, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, plain_labels)
    assert prefix.cut == 1 and sorted(prefix._outputs) == [(0, 0), (1, 0)]


def test_head_scores_through_the_frozen_prefix_equal_full_passes(tmp_path, tasks, monkeypatch):
    """The old tasks read through their adapted blocks only (the frozen prefix kept from the frozen pass and
    replayed), on h_score_adapted_samples images in two batches: the scores full forward passes give."""

    settings = config(h_score_features="head", h_score_adapted_samples=12, target_modules=LAST_BLOCK)
    replays = []
    replay = FrozenPrefix._replay
    monkeypatch.setattr(FrozenPrefix, "_replay", lambda self, *a, **k: replays.append(1) or replay(self, *a, **k))
    read = ContinualTrainer(
        two_block_vit(), settings, arguments(tmp_path / "prefix", per_device_eval_batch_size=8)
    ).fit(tasks)
    # the prefix is kept from the frozen pass (tasks 1 and 2 check their first replay there), so every old task's
    # two batches replay it: one old task before task 1, two before task 2
    assert len(replays) == 2 + 2 * (1 + 2)
    monkeypatch.setattr(FrozenPrefix, "__call__", lambda self, batch, run: run())
    full = ContinualTrainer(two_block_vit(), settings, arguments(tmp_path / "full", per_device_eval_batch_size=8)).fit(
        tasks
    )
    np.testing.assert_allclose(read["h_scores"][2][:2], full["h_scores"][2][:2], rtol=1e-5)
    np.testing.assert_allclose(read["h_score_reference"][2][:2], full["h_score_reference"][2][:2], rtol=1e-5)


def test_old_tasks_screened_out_score_as_their_reference_and_the_finalist_as_when_all_are_read(tmp_path, tasks):
    """h_score_finalists=1: task 2 screens its two old tasks on 4 of its 12 sampled images and reads one on all
    twelve (the screen kept, the rest read): its score is the one reading both in full gives; the other scores as
    the frozen backbone in its place and ties with it (never related)."""
    settings = {"h_score_features": "head", "h_score_adapted_samples": 12}
    screened = ContinualTrainer(
        tiny_vit(), config(**settings, h_score_finalists=1, h_score_screen_samples=4), arguments(tmp_path / "screen")
    ).fit(tasks)
    full = ContinualTrainer(tiny_vit(), config(**settings), arguments(tmp_path / "full")).fit(tasks)
    assert screened["h_scores"][1] == full["h_scores"][1]  # one old task: nothing to screen
    scores, reference, beats = (np.array(screened[key][2][:2]) for key in ("h_scores", "h_score_reference",
                                                                           "h_score_beats_reference"))  # fmt: skip
    out = int(np.flatnonzero(beats == 0.5)[0])
    kept = 1 - out
    assert scores[out] == pytest.approx(reference[out]) and scores[kept] != pytest.approx(reference[kept])
    assert scores[kept] == pytest.approx(full["h_scores"][2][kept], rel=1e-5)
    np.testing.assert_allclose(reference, full["h_score_reference"][2][:2], rtol=1e-5)


def test_head_scores_are_read_against_the_frozen_backbone_and_related_tasks_start_nearer(tmp_path, tasks, monkeypatch):
    """h_score_features="head": every old task's score beside the frozen backbone's in its place (its head on the
    frozen features) and how surely it beats it; a task that beats it gets half its target distance, so the new task's
    H-embedding starts nearer to it than to the old tasks that do not, and it trains as one that inherits."""
    inherited = []
    build = TaskStep.__init__

    def recording(self, *args, inherits=False, **kwargs):
        inherited.append(inherits)
        build(self, *args, inherits=inherits, **kwargs)

    monkeypatch.setattr(TaskStep, "__init__", recording)
    trainer = ContinualTrainer(tiny_vit(), config(h_score_features="head"), arguments(tmp_path))
    results = trainer.fit(tasks)
    reference, beats = np.array(results["h_score_reference"]), np.array(results["h_score_beats_reference"])
    assert np.isnan(reference[0]).all() and np.isfinite(reference[2, :2]).all() and np.isnan(reference[1, 1:]).all()
    assert ((beats[2, :2] >= 0) & (beats[2, :2] <= 1)).all()
    never = ContinualTrainer(
        tiny_vit(), config(h_score_features="head", relatedness_confidence=1.5), arguments(tmp_path / "never")
    ).fit(tasks)
    assert never["h_scores"][1] == results["h_scores"][1]  # task 1: the same scores; only the targets may differ
    inherited.clear()
    head_alone = ContinualTrainer(
        tiny_vit(), config(h_score_features="head", relatedness_pooled=False), arguments(tmp_path / "head")
    ).fit(tasks)
    assert inherited == [False, True, 1.0 in head_alone["h_score_related"][2]]
    assert head_alone["h_score_related"][1][0] == float(beats[1, 0] >= 0.95)  # its head beats the reference
    # by default its pooled features must beat the frozen backbone's too: here they do not
    assert results["h_score_related"][1][0] == 0.0 and head_alone["h_score_related"][1][0] == 1.0

    def start(run: str) -> list[float]:
        return json.loads((tmp_path / run / "embeddings.json").read_text())["h_embeddings"][1]

    assert start("head") != start("never") and start("") == start("never")
    plain = ContinualTrainer(tiny_vit(), config(h_score_features="lda"), arguments(tmp_path / "lda")).fit(tasks)
    assert np.isnan(np.array(plain["h_score_reference"], dtype=float)).all()  # lda never sees an adapter


def test_learning_curves_end_at_each_tasks_accuracy_after_training(tmp_path, tasks):
    results = run(tmp_path, tasks[:2], eval_curve_points=2)  # max_steps_per_task 3: points at steps 2 and 3
    curves = results["learning_curves"]
    assert [[step for step, _ in curve] for curve in curves] == [[2, 3], [2, 3]]
    for t, curve in enumerate(curves):
        assert curve[-1][1] == results["accuracy_matrix"][t][t]  # the same head and adapter, evaluated again
    assert run(tmp_path / "none", tasks[:1])["learning_curves"] == [[]]
    with pytest.raises(ValueError, match="eval_curve_points"):
        ContinualTrainingArguments(eval_curve_points=-1)


@pytest.mark.parametrize("inherits", [True, False])
def test_a_task_that_inherits_leaves_the_old_tasks_generated_weights_exactly_as_they_were(inherits):
    """Started near a related old task, a task trains its embedding and the heads' free part only: the old task's
    activations cannot move, so its protected weights cannot either. A task that does not inherit also trains the
    trunk, which moves them (what the output regulariser holds)."""
    from peft import get_peft_model

    from hyperlora.method.losses import flat_outputs
    from hyperlora.training.step import create_optimizer

    model = get_peft_model(tiny_vit(), config())
    tuner, hypernet = model.base_model, model.base_model.hypernet
    old = hypernet.task_embeddings[model.add_task()].detach()
    model.add_task(old + 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(0)))
    head = torch.nn.Linear(32, 2)
    step = TaskStep(model, head, 1, config(), h_embedding=hypernet.task_embeddings[1].detach(), inherits=inherits)
    trunk = [*hypernet.trunk.parameters(), hypernet.module_embeddings]
    assert any(p.requires_grad for p in trunk) is not inherits
    optimizer = create_optimizer(step, ContinualTrainingArguments(learning_rate=1e-2, head_learning_rate=1e-2))
    before = [flat_outputs(tuner.generate([i])).detach().clone() for i in (0, 1)]
    pixels, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        step(pixels, labels)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    old_moved, new_moved = ((flat_outputs(tuner.generate([i])) - before[i]).abs().max().item() for i in (0, 1))
    step.release()
    assert new_moved > 1e-3
    assert (old_moved < 1e-6) == inherits, old_moved
    assert all(p.requires_grad for p in trunk)
