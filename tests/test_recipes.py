"""The benchmark recipes end to end on image folders the tests write, with a tiny ViT: one and two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cifar100
import domainnet
import imagenet_r
import numpy as np
import pytest
import yaml
from PIL import Image

import hyperlora.training.recipe as runner

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY = [
    "--model_name_or_path", "vit_tiny_patch16_224",
    "--no_pretrained",
    "--model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--r", "2", "--hypernet_hidden_dim", "16", "--task_embedding_dim", "8", "--module_embedding_dim", "8",
    "--h_embedding_steps", "20", "--h_score_samples", "32",
    "--num_train_epochs", "1", "--max_steps_per_task", "2", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--report_to", "none", "--no_plots",
]  # fmt: skip


def write_image_folder(root: Path, num_classes: int, per_class: int, seed: int = 0) -> Path:
    """``root/class_XX/N.png``: each class a bright band at its own height over noise."""
    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            pixels = rng.integers(0, 60, size=(16, 16, 3))
            row = (label * 3) % 13
            pixels[row : row + 3, :, label % 3] = 255
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    """ImageNet-R style: one pool of 4 classes x 10 images, no test split."""
    return write_image_folder(tmp_path_factory.mktemp("flat") / "images", num_classes=4, per_class=10)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """CIFAR style: train/ and test/ of 4 classes; 5 test images each, so 2 processes cannot split a task evenly."""
    root = tmp_path_factory.mktemp("split") / "images"
    write_image_folder(root / "train", num_classes=4, per_class=8, seed=1)
    write_image_folder(root / "test", num_classes=4, per_class=5, seed=2)
    return root


def read(path: Path):
    return json.loads(path.read_text())


def test_imagenet_r_recipe_holds_out_a_seeded_fifth_and_averages_seeds(flat_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset_name", str(flat_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    summary = runner.run(imagenet_r.DEFAULTS, [*argv, *TINY, "--num_tasks", "2", "--num_seeds", "2"])

    protocol = read(out / "protocol.json")
    expected_order = np.random.RandomState(1993).permutation(4).tolist()
    assert protocol["class_order"] == expected_order
    assert [task["classes"] for task in protocol["tasks"]] == [sorted(expected_order[:2]), sorted(expected_order[2:])]
    assert protocol["split"]["test_fraction"] == 0.2
    assert len(protocol["split"]["test_indices"]) == 8  # 2 of the 10 images of each of 4 classes
    assert [(task["train"], task["test"]) for task in protocol["tasks"]] == [(16, 4), (16, 4)]

    runs = [read(out / f"seed-{seed}" / "metrics.json") for seed in (0, 1)]
    finals = [run["class_incremental"]["final_accuracy"] for run in runs]
    cil = summary["class_incremental"]["faa"]
    assert summary["seeds"] == [0, 1]
    # the summary against numpy, from the per-seed files
    faas = [run["class_incremental"]["faa"] for run in runs]
    assert cil["mean"] == pytest.approx(np.mean(faas)) and cil["std"] == pytest.approx(np.std(faas, ddof=1))
    assert all(0.0 <= a <= 1.0 for a in finals)
    assert read(out / "summary.json") == json.loads(json.dumps(summary))
    assert "| faa |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("recipe", [cifar100, domainnet], ids=["cifar100", "domainnet"])
def test_recipe_uses_the_datasets_own_test_split(recipe, split_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset_name", str(split_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    runner.run(recipe.DEFAULTS, [*argv, *TINY, "--num_tasks", "2", "--num_seeds", "1"])
    protocol = read(out / "protocol.json")
    assert protocol["split"] == {"train_split": "train", "test_split": "test"}
    metrics = read(out / "seed-0" / "metrics.json")
    assert metrics["evaluated_samples"] == [10, 10]
    assert len(metrics["class_incremental"]["accuracy_matrix"]) == 2


def test_config_file_is_overridden_by_the_command_line_and_recorded(split_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"num_tasks": 2, "r": 3, "learning_rate": 0.5, "class_order": [3, 2, 1, 0]}))
    data, model, hyper, training = runner.parse_arguments(
        cifar100.DEFAULTS, ["--config", str(config), "--dataset_name", str(split_folder), "--learning_rate", "0.01"]
    )
    assert (data.num_tasks, hyper.r, training.learning_rate, data.class_order) == (2, 3, 0.01, [3, 2, 1, 0])
    assert (data.image_column, training.num_train_epochs) == ("img", cifar100.DEFAULTS["num_train_epochs"])
    assert model.create_model  # the default backbone is ViT-B/16 in21k, created only when a run starts
    assert runner.WEIGHTS[model.weights] == "vit_base_patch16_224.augreg_in21k"


def test_recorded_arguments_are_a_valid_config_file(split_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset_name", str(split_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    runner.run(
        cifar100.DEFAULTS, [*argv, *TINY, "--num_tasks", "2", "--num_seeds", "1", "--class_order", "0", "1", "2", "3"]
    )
    recorded = yaml.safe_load((out / "arguments.yaml").read_text())
    assert recorded["class_order"] == [0, 1, 2, 3] and recorded["r"] == 2
    data, _, hyper, training = runner.parse_arguments({}, ["--config", str(out / "arguments.yaml")])
    assert (data.dataset_name, hyper.r, training.max_steps_per_task) == (str(split_folder), 2, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"num_taks": 2}, "unknown arguments ['num_taks']"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("r: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_files_are_named(content, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        runner.parse_arguments(cifar100.DEFAULTS, ["--config", str(path)])


def test_wrong_columns_and_uneven_tasks_are_named(tmp_path, split_folder):
    from datasets import Dataset, DatasetDict

    from hyperlora.data.protocol import class_order, load_image_dataset, split_into_tasks, standardise_columns

    with pytest.raises(ValueError, match="7 classes cannot be cut into 2 tasks"):
        split_into_tasks(None, None, 2, list(range(7)))
    with pytest.raises(ValueError, match=r"missing \[3\].*repeated \[1\]"):
        class_order([0, 1, 2, 3], order=[0, 1, 1, 2])
    splits = load_image_dataset(str(split_folder), cache_dir=str(tmp_path / "cache"))
    assert set(splits) == {"train", "test"} and splits["train"].column_names == ["image", "label"]
    with pytest.raises(ValueError, match="split 'train' has no column 'fine_label'"):
        standardise_columns(DatasetDict({"train": Dataset.from_dict({"img": [0]})}), "img", "fine_label")
    # string labels (ImageNet-R's WordNet ids) become integers in sorted order
    wnids = DatasetDict({"test": Dataset.from_dict({"image": [0, 1, 2], "wnid": ["n02", "n01", "n02"]})})
    assert standardise_columns(wnids, "image", "wnid")["test"]["label"] == [1, 0, 1]


@pytest.fixture(scope="module")
def disjoint_folder(tmp_path_factory) -> Path:
    """train/ with 4 classes; test/ with other images of them and of a fifth class that train/ lacks."""
    root = tmp_path_factory.mktemp("disjoint") / "images"
    write_image_folder(root / "train", num_classes=4, per_class=6, seed=3)
    write_image_folder(root / "test", num_classes=5, per_class=3, seed=4)
    return root


def test_a_folders_train_and_test_are_used_whatever_the_recipe_says(disjoint_folder, tmp_path, monkeypatch):
    """imagenet_r's defaults (train_split "test", no test split) describe its Hub copy, not a local folder."""
    from datasets import Image

    from hyperlora.trainer import ContinualTrainer

    trained, fit = [], ContinualTrainer.fit

    def spy(self, tasks):
        for task in tasks:
            trained.extend(
                Path(x["path"]).resolve() for x in task.train.cast_column("image", Image(decode=False))["image"]
            )
        return fit(self, tasks)

    monkeypatch.setattr(ContinualTrainer, "fit", spy)
    out = tmp_path / "run"
    argv = ["--dataset_name", str(disjoint_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    runner.run(imagenet_r.DEFAULTS, [*argv, *TINY, "--num_tasks", "2", "--num_seeds", "1"])

    protocol = read(out / "protocol.json")
    assert protocol["split"] == {"train_split": "train", "test_split": "test"}
    assert sorted(trained) == sorted(p.resolve() for p in (disjoint_folder / "train").rglob("*.png"))
    assert [(task["train"], task["test"]) for task in protocol["tasks"]] == [(12, 6), (12, 6)]


def test_report_to_tensorboard_writes_each_seeds_events_under_the_output_folder(split_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--dataset_name", str(split_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    runner.run(cifar100.DEFAULTS, [*argv, *TINY, "--num_tasks", "2", "--num_seeds", "1", "--report_to", "tensorboard"])
    (events,) = (out / "seed-0" / "hyperlora").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload()
    assert [e.value for e in logged.Scalars("eval/task_il_accuracy")] == pytest.approx(
        [np.nanmean(row[: t + 1]) for t, row in enumerate(read(out / "seed-0" / "metrics.json")["accuracy_matrix"])]
    )
    assert len(logged.Scalars("train/loss")) == 2  # the last step of each task (2 steps, logging_steps 20)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_resume_or_rerun_leaves_the_run_as_it_was(split_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset_name", str(split_folder), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    argv += [*TINY, "--num_tasks", "2", "--num_seeds", "1"]
    runner.run(cifar100.DEFAULTS, argv)
    before = snapshot(out)
    assert {"arguments.yaml", "protocol.json"} <= set(before)
    deeper = TINY[TINY.index("--model_kwargs") + 1].replace('"depth": 1', '"depth": 2')
    resume = "--resume_from_checkpoint"
    refusals = [
        (["--num_tasks", "1", resume], "protocol.json tasks"),
        (["--r", "3", resume], "HyperLoraConfig.r: 2 in the checkpoint, 3 now"),
        (["--learning_rate", "0.5", resume], "learning_rate: 0.001 in the checkpoint, 0.5 now"),
        (["--class_order_seed", "7", resume], "protocol.json class_order"),  # the same task names, other classes
        (["--model_kwargs", deeper, resume], "model_kwargs: .* recorded"),
        ([], "overwrite_output_dir"),  # a fresh run into a folder holding checkpoints
    ]
    for change, named in refusals:
        with pytest.raises(SystemExit, match=named):
            runner.run(cifar100.DEFAULTS, [*argv, *change])
        assert snapshot(out) == before, change


def test_bad_data_and_targets_are_one_line_errors_that_write_nothing(split_folder, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the Hub answers at once, offline
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    one_class = write_image_folder(tmp_path / "one-class", num_classes=1, per_class=3)
    out = tmp_path / "run"
    cases = [
        ([str(one_class)], "one-class has no classes to learn: put its images in one sub-folder per class"),
        ([str(tmp_path / "data6")], "data6 does not exist$"),
        (["data/imagenet-r"], "data/imagenet-r does not exist$"),  # data/ is here: a path, not a Hub id
        (["data6"], "data6 does not exist, and the Hub did not give the dataset: Couldn't reach 'data6'"),
        (["uoft-cs/cifar100"], "Couldn't reach 'uoft-cs/cifar100' on the Hub"),  # a Hub id is still one
        ([str(split_folder), "--target_modules", "no_such_module"], "no_such_module"),
    ]
    for (dataset, *extra), message in cases:
        argv = ["--dataset_name", dataset, *extra, "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
        with pytest.raises(SystemExit, match=message) as refused:
            runner.run(imagenet_r.DEFAULTS, [*argv, *TINY, "--num_tasks", "2"])
        assert "\n" not in str(refused.value) and not out.exists(), dataset


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("recipe", "folder", "extra"),
    [
        ("cifar100", "split_folder", []),
        ("domainnet", "split_folder", []),
        ("imagenet_r", "flat_folder", ["--gradient_accumulation_steps", "2"]),
    ],
)
def test_two_cpu_processes_evaluate_every_test_sample_once_and_write_one_set_of_results(
    recipe, folder, extra, request, tmp_path
):
    out = tmp_path / "run"
    env = os.environ | {
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    precision = "bf16" if extra else "no"  # one of the runs in bf16 autocast with gradient accumulation
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    dataset = request.getfixturevalue(folder)
    argv = ["--dataset_name", str(dataset), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    result = subprocess.run(
        [*launch, str(RECIPES / f"{recipe}.py"), *argv, *TINY, *extra, "--num_tasks", "2", "--num_seeds", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read(out / "seed-0" / "metrics.json")
    # split_folder: 5 test images per class, so 2 processes must pad a batch that gather_for_metrics then drops;
    # flat_folder: 2 of 10 held out per class
    assert metrics["evaluated_samples"] == ([10, 10] if folder == "split_folder" else [4, 4])
    assert [task["test"] for task in read(out / "protocol.json")["tasks"]] == metrics["evaluated_samples"]
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    assert names.count("seed-0/metrics.json") == 1 and names.count("summary.json") == 1
    assert not [name for name in names if ".tmp" in name or "rank" in name]
    assert result.stdout.count("| faa |") == 1, result.stdout  # one job, summarised once by the main process


def test_resume_reads_finished_seeds_back_and_trains_the_missing_one(split_folder, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--dataset_name",
        str(split_folder),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(out),
        *TINY,
    ]
    runner.run(cifar100.DEFAULTS, [*argv, "--num_tasks", "2", "--num_seeds", "1"])
    first = read(out / "seed-0" / "metrics.json")
    adapter = (out / "seed-0" / "final" / "adapter" / "adapter_model.safetensors").read_bytes()
    summary = runner.run(cifar100.DEFAULTS, [*argv, "--num_tasks", "2", "--num_seeds", "2", "--resume_from_checkpoint"])
    assert read(out / "seed-0" / "metrics.json")["accuracy_matrix"] == first["accuracy_matrix"]
    assert (out / "seed-0" / "final" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (out / "seed-1" / "metrics.json").exists() and summary["seeds"] == [0, 1]


def test_accuracy_benchmark_runs_every_method_on_the_imagenet_r_protocol(flat_folder, tmp_path):
    """benchmarks/accuracy.py --benchmark imagenet_r: the recipe's data path and split, every method, one report."""
    import accuracy

    out = tmp_path / "accuracy"
    model_kwargs = '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}'
    argv = ["--benchmark", "imagenet_r", "--dataset_name", str(flat_folder), "--cache_dir", str(tmp_path / "cache"),
            "--num_tasks", "2", "--seeds", "0", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
            "--model_name_or_path", "vit_tiny_patch16_224", "--no_pretrained", "--model_kwargs", model_kwargs,
            "--ranpac_dim", "64", "--output_dir", str(out)]  # fmt: skip
    accuracy.main(argv)

    report = read(out / "accuracy.json")
    assert report["benchmark"] == "imagenet_r-2"
    assert report["budget"] == {"epochs": 1, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2}
    assert set(report["runs"]) == set(accuracy.ROWS)  # "frozen" reports four classifiers
    for method in ("joint", "frozen_ncm", "frozen_lda", "frozen_ranpac", "hyperlora"):
        accuracy_all_classes = report["runs"][method][0]["class_il_faa"]
        assert np.isclose(accuracy_all_classes * 8, round(accuracy_all_classes * 8)), method  # of 8 test images
    for method, (run,) in report["runs"].items():
        if run["accuracy_matrix"] is None:  # the class-incremental frozen classifiers have no task heads
            assert method in ("frozen_ncm", "frozen_lda", "frozen_ranpac")
            continue
        matrix = np.array(run["accuracy_matrix"], dtype=float)
        assert matrix.shape == (2, 2), method
        # each accuracy is a count of the 4 held-out images of a task's 2 classes
        finite = matrix[~np.isnan(matrix)]
        assert np.allclose(finite * 4, np.round(finite * 4)), method
    # every task-incremental method stores its task's head (2 classes, weights and bias); HyperLoRA adds its 32-d
    # task embedding, a LoRA per task its adapter
    head = report["runs"]["frozen_probe"][0]["bytes_per_task"]
    assert head % (4 * 2) == 0 and head > 4 * 2
    assert report["runs"]["hyperlora"][0]["bytes_per_task"] == 32 * 4 + head
    assert report["runs"]["lora_per_task"][0]["bytes_per_task"] > head
    assert report["runs"]["lora_sequential"][0]["bytes_per_task"] == head
    assert (out / "accuracy.png").stat().st_size > 0

    # runs made apart combine only under the same budget
    with pytest.raises(SystemExit, match="budget"):
        accuracy.main(["--benchmark", "imagenet_r", "--num_tasks", "2", "--merge", str(out / "accuracy.json"),
                       "--num_train_epochs", "3", "--output_dir", str(tmp_path / "merged")])  # fmt: skip


def test_lora_baselines_adapt_the_same_modules_as_hyperlora():
    import accuracy
    import timm
    from peft import get_peft_model

    from hyperlora import HyperLoraConfig
    from hyperlora.tuner.layer import HyperLoraLayer

    def vit():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)

    config = HyperLoraConfig(r=4, lora_alpha=8)
    hyper = get_peft_model(vit(), config)
    lora = accuracy._lora(vit(), config, "cpu")
    hyper_names = {name for name, m in hyper.base_model.model.named_modules() if isinstance(m, HyperLoraLayer)}
    lora_names = {name for name, m in lora.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert hyper_names == lora_names and len(hyper_names) == 8
    assert lora.peft_config["default"].r == 4 and lora.peft_config["default"].lora_alpha == 8


def test_quickstart_backbone_pads_inside_its_convolutions_with_the_same_features():
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    from hyperlora import demo as quickstart

    folded = quickstart.PooledEfficientNet().eval()
    reference = EfficientNet.from_name("efficientnet-lite0").eval()  # the package's own padded convolutions
    reference.load_state_dict(folded.net.state_dict())
    pads = [m.static_padding for m in folded.net.modules() if hasattr(m, "static_padding")]
    assert sum(isinstance(p, nn.ZeroPad2d) for p in pads) == 5  # only the asymmetric stride-2 ones are left
    assert sum(isinstance(getattr(m, "static_padding", None), nn.ZeroPad2d) for m in reference.modules()) == 17
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), reference.extract_features(x).mean(dim=(2, 3)), rtol=0, atol=1e-6)


def test_accuracy_benchmark_on_the_structured_sequence_reports_frozen_baselines_headroom_and_relations(tmp_path):
    """benchmarks/accuracy.py --benchmark structured: the quickstart's backbone and sequence, tiny."""
    import accuracy

    out = tmp_path / "structured-2"
    accuracy.main(["--num_tasks", "2", "--train_per_class", "4", "--test_per_class", "2", "--num_train_epochs", "1",
                   "--seeds", "0", "--methods", "hyperlora", "joint", "frozen", "--ranpac_dim", "16",
                   "--eval_curve_points", "1", "--output_dir", str(out)])  # fmt: skip
    report = read(out / "accuracy.json")
    assert report["benchmark"] == "structured-2"
    assert report["budget"]["train_per_class"] == 4 and report["budget"]["epochs"] == 1
    assert set(report["runs"]) == {"hyperlora", "joint", "frozen_probe", "frozen_ncm", "frozen_lda", "frozen_ranpac"}
    hyper = report["runs"]["hyperlora"][0]
    assert hyper["steps_to_95"] == 1.0  # one curve point per task: the end of its training
    assert set(hyper["frozen_baselines"]) >= {"linear_probe", "lda", "ncm"}
    # the trainer's own frozen probe is the benchmark's: same backbone, images and classifier
    probe = report["runs"]["frozen_probe"][0]["faa"]
    assert hyper["frozen_baselines"]["linear_probe"] == pytest.approx(probe)
    text = (out / "accuracy.md").read_text()
    joint, lda = report["runs"]["joint"][0]["class_il_faa"], report["runs"]["frozen_lda"][0]["class_il_faa"]
    assert f"{100 * (joint - lda):+.2f} points" in text
    # the conflict sequence: task 0's distractor colour is task 1's target colour
    assert read(out / "relations.json") == {"tasks": ["orientation-d00", "count-d01"], "relation": [[1, -1], [-1, 1]]}

    lengths = accuracy.write_lengths_table(tmp_path)
    assert lengths is not None and "| 2 | [0] |" in lengths and (tmp_path / "lengths.md").is_file()
    variant = tmp_path / "structured-2-embedding-lr"  # a variant of the same length is not a row of its own
    variant.mkdir()
    (variant / "accuracy.json").write_text((out / "accuracy.json").read_text())
    assert accuracy.write_lengths_table(tmp_path) == lengths


def test_steps_to_95_is_the_first_step_at_95_percent_of_the_final_accuracy_averaged_over_later_tasks():
    import accuracy

    first = [[10, 0.2], [20, 1.0]]  # the first task does not count: it inherits nothing
    later = [[[10, 0.5], [20, 0.96], [30, 1.0]], [[10, 0.76], [20, 0.7], [30, 0.8]]]  # 95%: 0.95 and 0.76
    assert accuracy.steps_to_95([first, *later]) == 15.0
    assert accuracy.steps_to_95([first]) is None


def test_accuracy_budget_records_the_embedding_learning_rate_only_when_it_is_set():
    """So that runs from before --embedding_learning_rate still merge with runs that leave it at its default."""
    import accuracy

    assert "embedding_lr" not in accuracy.budget_of(accuracy.parse_args([]))
    budget = accuracy.budget_of(accuracy.parse_args(["--embedding_learning_rate", "0.02"]))
    assert budget["embedding_lr"] == 0.02
    assert accuracy.Setup(lambda: None, **budget).embedding_lr == 0.02


def test_recipe_trial_writes_the_structured_tasks_as_a_folder_and_runs_the_recipe_on_its_splits(tmp_path):
    """benchmarks/recipe_trial.py, the GPU check, on the CPU with a one-block ViT."""
    import recipe_trial

    recipe_trial.main(["--model_name_or_path", "vit_tiny_patch16_224", "--image_size", "32", "--num_tasks", "2",
                       "--train_per_class", "4", "--test_per_class", "2", "--mixed_precision", "no", "--quick",
                       "--model_kwargs", '{"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}',
                       "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path)])  # fmt: skip
    metrics = read(tmp_path / "recipe_trial_metrics.json")
    assert metrics["evaluated_samples"] == [8, 8]  # 2 tasks x 4 classes x 2 test images: the folder's test/
    text = (tmp_path / "recipe_trial.md").read_text()
    assert "train_split='train', test_split='test'" in text and "peak GPU memory" in text


def test_relations_ground_truth_rates_features_that_carry_the_label_above_noise():
    """benchmarks/relations.py's transfer: a logistic probe's held-out accuracy on each old task's features."""
    import relations
    import torch

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.integers(0, 4, size=400))
    signal = torch.as_tensor(np.eye(4)[labels.numpy()] * 3.0 + rng.normal(size=(400, 4)))
    informative = torch.cat([signal, torch.as_tensor(rng.normal(size=(400, 60)))], dim=1)
    noise = torch.as_tensor(rng.normal(size=(400, 64)))
    train, test = slice(0, 200), slice(200, 400)
    good = relations.linear_transfer((informative[train], labels[train]), (informative[test], labels[test]))
    bad = relations.linear_transfer((noise[train], labels[train]), (noise[test], labels[test]))
    assert good[1] > 0.8 and bad[1] < 0.4 and good[0] > bad[0]
    assert all(value <= 0 for value in (good[0], bad[0]))  # mean log-likelihoods
    x = torch.tensor([[-1.0], [1.0]]).repeat(20, 1)
    wrong = relations.linear_transfer((x, torch.tensor([0, 1]).repeat(20)), (torch.tensor([[1e4]]), torch.tensor([0])))
    assert wrong[0] == pytest.approx(np.log(1e-12)) and wrong[1] == 0.0  # certain and wrong: finite, not -inf


def test_relations_report_gives_each_probe_its_own_ceiling_and_the_command_its_options(tmp_path):
    """benchmarks/relations.py's per-probe table: the seed-to-seed Spearman of one probe's ground truth (scipy)."""
    import relations
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    keys = [key for key, _ in relations.SCORES.values()] + ["transfer_accuracy"]
    num_probes = len(relations.RELATION_FACTORS)

    def run(seed: int) -> dict:
        pairs = [
            [dict(zip(keys, rng.random(len(keys)), strict=True)) | {"old_task": f"old-{k}"} for k in range(6)]
            for _ in range(num_probes)
        ]
        probes = [{"probe": f"probe-{p}", "pairs": rows} for p, rows in enumerate(pairs)]
        cosines = {"related": 0.5, "unrelated": 0.3}
        correlations = relations.correlations(probes, "lda")
        return {"seed": seed, "h_score_features": "lda", "probes": probes, "delta_w_cosine": cosines, **correlations}

    runs = [run(0), run(1)]
    args = relations.parse_args(["--seeds", "0", "1", "--probe_per_class", "300", "--output_dir", str(tmp_path)])
    text = relations.write_report(tmp_path, runs, args)
    assert "`python benchmarks/relations.py --seeds 0 1 --probe_per_class 300`" in text
    for p in range(num_probes):
        expected = spearmanr(*([row["transfer_accuracy"] for row in r["probes"][p]["pairs"]] for r in runs)).statistic
        assert relations.ceiling(runs, p) == pytest.approx([expected])
        assert f"| probe-{p} | {expected:.2f} |" in text
    assert relations.ceiling(runs) == pytest.approx([relations.ceiling(runs, p)[0] for p in range(num_probes)])


def test_relations_top_ranked_counts_only_old_tasks_that_transfer_beyond_seed_noise():
    """An old task with a positive mean transfer within twice its standard error over seeds is not "positive"; the
    share counts, per seed, whether the score's first pick is a positive one; a probe with none reports how far its
    H-embedding starts, over tau."""
    import relations

    def run(seed, transfers, scores, distances=(3.0, 4.0, 5.0), tau=2.0):
        def pairs(t, s):
            return [{"old_task": f"old-{k}", "transfer_accuracy": t[k], "h_score_head": s[k],
                     "embedding_distance": distances[k]} for k in range(3)]  # fmt: skip

        return {"seed": seed, "probes": [{"probe": "a", "pairs": pairs(transfers, scores), "tau": tau},
                                         {"probe": "b", "pairs": pairs([-0.1, -0.2, 0.05 * (-1) ** seed],
                                                                       [0.1, 0.2, 0.3]), "tau": tau}]}  # fmt: skip

    # probe a: old-0 transfers +10 points every seed; old-1 +/-: noise; old-2 never
    runs = [
        run(0, [0.10, 0.30, -0.1], [0.9, 0.1, 0.5]),  # picks old-0: a hit
        run(1, [0.11, -0.30, -0.1], [0.1, 0.9, 0.5]),  # picks old-1: within noise, a miss
        run(2, [0.09, 0.20, -0.1], [0.1, 0.2, 0.7]),  # picks old-2: a miss
    ]
    result = relations.top_ranked(runs, "head")
    assert result["probes"]["a"]["positive"] == ["old-0"] and result["probes"]["a"]["top"] == [
        "old-0",
        "old-1",
        "old-2",
    ]
    assert result["share"] == pytest.approx(1 / 3) and result["pairs"] == 3
    assert result["probes"]["b"] == {"positive": [], "nearest_over_tau": [1.5, 1.5, 1.5]}
    assert result["related"] is None  # the runs judged no relatedness
    for seed, inherits in enumerate((True, False, True)):  # old-0 marked related in seeds 0 and 2; old-1 always
        for row in runs[seed]["probes"][0]["pairs"]:
            row["related_head"] = row["old_task"] == "old-1" or (inherits and row["old_task"] == "old-0")
    assert relations.top_ranked(runs, "head")["related"] == [2, 3]  # old-1 does not transfer: not counted


def test_scale_benchmark_times_the_estimator_it_is_given():
    """benchmarks/scale.py --h_score_features head: the row says which estimator it timed, and it is that one."""
    import scale

    quick = ["--samples", "16", "--warmup", "1", "--repeats", "1", "--threads", "1"]
    assert scale.measure(2, scale.parse_args(quick))["h_score_features"] == "head"  # the library default
    row = scale.measure(2, scale.parse_args([*quick, "--h_score_features", "lda"]))
    assert row["h_score_features"] == "lda" and row["h_embedding_s"] > 0


def test_h_score_samples_benchmark_agrees_with_itself_on_every_image(tmp_path):
    """benchmarks/h_score_samples.py, tiny: a "subsample" of all the new task's images ranks the old tasks exactly as
    all of them do; a smaller one is measured against it, and the report has a row per size."""
    import h_score_samples

    args = ["--sequences", "split", "--sizes", "8", "16", "--draws", "2", "--train_per_class", "4"]
    args += ["--later_train_per_class", "4", "--output_dir", str(tmp_path)]
    h_score_samples.main(args)
    entry = json.loads((tmp_path / "h_score_samples.json").read_text())["sequences"]["split"]
    assert entry["images"] == 16 and len(entry["scores"]) == 4 and len(entry["related"]) == 4
    everything = entry["sizes"]["16"]
    assert everything["top_agrees"] == 1.0 and everything["spearman"] == pytest.approx(1.0)
    assert everything["top_among_finalists"] == 1.0
    assert 0.0 <= entry["sizes"]["8"]["top_agrees"] <= 1.0
    assert "| split | 16 | 8 |" in (tmp_path / "h_score_samples.md").read_text()


def test_transfer_benchmark_compares_each_related_later_task_from_scratch_and_from_its_old_task(tmp_path):
    """benchmarks/transfer.py: plain LoRA, tiny; each later task of the mixed sequence that asks an earlier task's
    question starts once more from that task's adapter, and the difference is read on validation images."""
    import transfer

    result = transfer.main(["--sequence", "mixed", "--num_tasks", "4", "--seeds", "0", "--train_per_class", "4",
                            "--later_train_per_class", "2", "--validation_per_class", "2", "--num_train_epochs", "1",
                            "--output_dir", str(tmp_path)])  # fmt: skip
    rows = result["runs"][0]
    assert [(row["task"], row["source"]) for row in rows] == [(3, 0)]  # orientation, count, size, orientation
    for row in rows:
        assert row["transfer"] == pytest.approx(100 * (row["from_source"] - row["scratch"]))
        assert np.isclose(row["scratch"] * 8, round(row["scratch"] * 8))  # of 2 validation images x 4 classes
    assert result["forward_transfer_lora"]["mean"] == pytest.approx(rows[0]["transfer"])
    assert (tmp_path / "transfer-mixed-orientation-count-size-4.md").is_file()

    # seeds run apart combine, only under the same setting
    tiny = ["--sequence", "split", "--num_tasks", "2", "--train_per_class", "2", "--later_train_per_class", "2",
            "--validation_per_class", "1", "--num_train_epochs", "1"]  # fmt: skip
    files = []
    for seed in (0, 1):
        transfer.main([*tiny, "--seeds", str(seed), "--output_dir", str(tmp_path / f"seed{seed}")])
        files.append(str(tmp_path / f"seed{seed}" / "transfer-split-glyph-2.json"))
    merged = transfer.main([*tiny, "--merge", *files, "--output_dir", str(tmp_path / "merged")])
    assert sorted(merged["runs"]) == [0, 1] and len(merged["commands"]) == 2
    assert merged["forward_transfer_lora"]["seeds"] == 2
    with pytest.raises(SystemExit, match="was run with"):
        transfer.main([*tiny, "--later_train_per_class", "3", "--merge", *files, "--output_dir", str(tmp_path)])


def test_accuracy_benchmark_can_choose_on_validation_images_and_times_per_task_lora_too(tmp_path):
    """--evaluate_on validation: every method reads a validation split drawn for the purpose, never the test
    images; per-task LoRA gets learning curves (steps to 95%) as HyperLoRA does."""
    import accuracy

    from hyperlora.structured import structured_tasks

    cli = accuracy.parse_args(["--num_tasks", "2", "--train_per_class", "3", "--test_per_class", "2",
                               "--evaluate_on", "validation", "--sequence", "split"])  # fmt: skip
    tasks, _ = accuracy.build_benchmark(cli, seed=0)
    drawn = structured_tasks(2, seed=0, train_per_class=3, test_per_class=2, validation_per_class=2, kind="split")
    for task, reference in zip(tasks, drawn, strict=True):
        assert task.validation is None
        assert [np.asarray(image).tobytes() for image in task.test["image"]] == [
            np.asarray(image).tobytes() for image in reference.validation["image"]
        ]
    assert accuracy.data_of(cli)["evaluate_on"] == "validation"  # never merged with runs on the test images
    assert "evaluate_on" not in accuracy.data_of(accuracy.parse_args([]))

    out = tmp_path / "lora"
    accuracy.main(["--num_tasks", "2", "--train_per_class", "4", "--test_per_class", "2", "--num_train_epochs", "2",
                   "--seeds", "0", "--methods", "lora_per_task", "--eval_curve_points", "2",
                   "--output_dir", str(out)])  # fmt: skip
    lora = read(out / "accuracy.json")["runs"]["lora_per_task"][0]
    assert lora["steps_to_95"] in (1.0, 2.0)  # one step per epoch, a curve point after each
    assert "code " in read(out / "accuracy.json")["machine"]


def test_guidance_report_judges_each_target_on_paired_seeds(tmp_path):
    """benchmarks/guidance.py's report, from accuracy.json and transfer results laid out as its runs write them:
    the contract's keys, and each target met or missed as the numbers say."""
    import guidance

    def run(seed, faa, steps):
        return {"seed": seed, "faa": faa / 100, "steps_to_95": steps}

    def write(kind, methods, num_tasks=5):
        folder = tmp_path / f"{kind}-{num_tasks}"
        folder.mkdir()
        runs = {m: [run(s, f + s * 0.1, st) for s in range(3)] for m, (f, st) in methods.items()}
        (folder / "accuracy.json").write_text(json.dumps({"runs": runs, "machine": "cpu", "budget": {"epochs": 8}}))

    # split: ahead of no_guidance by 2 points, of minmax only in steps (40 vs 60), behind random_init in both
    write("split", {"hyperlora": (90, 40), "no_guidance": (88, 40), "minmax": (89.5, 60), "random_init": (91, 30),
                    "lora_per_task": (70, 50)})  # fmt: skip
    write("mixed", {"hyperlora": (80, 20), "no_guidance": (80.2, 20), "random_init": (81, 20)})
    (tmp_path / "transfer-split-glyph-5.json").write_text(
        json.dumps({"forward_transfer_lora": {"mean": 14.0, "std": 2.0, "seeds": 3}})
    )
    result = guidance.write_report(tmp_path, "python benchmarks/guidance.py --report_only")
    split = result["split"]
    assert split["hyperlora"]["faa"]["mean"] == pytest.approx(90.1) and split["hyperlora"]["steps_to_95"]["mean"] == 40
    assert split["forward_transfer_lora"]["mean"] == 14.0 and result["mixed"]["forward_transfer_lora"] is None
    checks = split["criteria"]
    assert checks["faa >= no_guidance + 1.0 or steps <= 0.8 x"]["met"]
    assert checks["faa >= minmax + 1.0 or steps <= 0.8 x"]["met"]  # 40 / 60 steps
    assert checks["faa >= minmax + 1.0 or steps <= 0.8 x"]["steps_ratio"] == pytest.approx(2 / 3)
    assert not checks["faa >= random_init + 1.0 or steps <= 0.8 x"]["met"]
    assert checks["faa >= lora_per_task"]["met"]
    mixed = result["mixed"]["criteria"]
    assert mixed["faa >= no_guidance - 0.3"]["met"] and not mixed["faa >= random_init - 0.3"]["met"]
    assert mixed["faa >= no_guidance - 0.3"]["faa_gap"]["mean"] == pytest.approx(-0.2)
    assert "domain" not in result
    text = (tmp_path / "guidance.md").read_text()
    assert "| faa >= random_init + 1.0 or steps <= 0.8 x | NO |" in text
    assert result["split_scaling"] == {"tasks": {"5": result["split_scaling"]["tasks"]["5"]}, "grows": None}

    write("split", {"hyperlora": (85, None), "lora_per_task": (60, None)}, num_tasks=10)  # 25 points ahead, not 20
    grown = guidance.write_report(tmp_path, "python benchmarks/guidance.py --report_only")["split_scaling"]
    assert grown["tasks"]["10"]["difference"]["mean"] == pytest.approx(25.0) and grown["grows"]
    assert grown["beyond_noise"]  # every seed's difference is 20 at 5 tasks and 25 at 10: no noise at all
    assert grown["first_to_last"] == {"difference": pytest.approx(5.0), "beyond_noise": True}
    assert "it grows beyond the seeds' noise" in (tmp_path / "guidance.md").read_text()
