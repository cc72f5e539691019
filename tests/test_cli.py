"""One command line for every script: transformers' names, --config, old spellings, --no_<flag>, no prefixes."""

from __future__ import annotations

import dataclasses

import accuracy
import imagenet_r
import pytest
import quickstart
import recipe_trial
import relations
import scale
import speed
import yaml

import hyperlora.training.recipe as runner


def values(parsed) -> dict:
    """Every parsed value by name, from a namespace or a tuple of dataclasses."""
    if isinstance(parsed, tuple):
        return {f.name: getattr(group, f.name) for group in parsed for f in dataclasses.fields(group)}
    return vars(parsed)


# script: its parser, and one argument under its old spelling
SCRIPTS = {
    "imagenet_r": (lambda argv: runner.parse_arguments(imagenet_r.DEFAULTS, argv), "--num_epochs", "num_train_epochs"),
    "quickstart": (quickstart.parse_args, "--num_epochs", "num_train_epochs"),
    "accuracy": (accuracy.parse_args, "--epochs", "num_train_epochs"),
    "relations": (relations.parse_args, "--epochs", "num_train_epochs"),
    "recipe_trial": (recipe_trial.parse_args, "--num_epochs", "num_train_epochs"),
    "scale": (scale.parse_args, "--batch_size", "per_device_train_batch_size"),
    "speed": (speed.parse, "--batch-size", "per_device_train_batch_size"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reads_a_config_file_under_the_command_line_and_its_old_spellings(script, tmp_path):
    parse, old, name = SCRIPTS[script]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "from-file", name: 3}))
    assert {k: values(parse(["--config", str(config)]))[k] for k in ("output_dir", name)} == {
        "output_dir": "from-file",
        name: 3,
    }
    parsed = values(parse(["--config", str(config), old, "4", "--output-dir", "from-argv"]))
    assert (parsed["output_dir"], parsed[name]) == ("from-argv", 4)
    config.write_text(yaml.safe_dump({name.replace("_", "", 1): 3}))
    with pytest.raises(SystemExit, match=f"unknown arguments .'{name.replace('_', '', 1)}'."):
        parse(["--config", str(config)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_prefix_of_an_argument_is_an_error(script, capsys):
    parse, _, name = SCRIPTS[script]
    with pytest.raises(SystemExit):
        parse([f"--{name[:-1]}", "1"])  # --num_train_epoch would have meant --num_train_epochs
    assert "unrecognized arguments" in capsys.readouterr().err


def test_every_boolean_has_a_no_flag_whatever_its_default(tmp_path):
    assert values(runner.parse_arguments(imagenet_r.DEFAULTS, []))["augment"] is True  # the recipe's default
    assert values(runner.parse_arguments(imagenet_r.DEFAULTS, ["--no_augment"]))["augment"] is False
    assert values(runner.parse_arguments(imagenet_r.DEFAULTS, ["--augment", "false"]))["augment"] is False
    assert values(quickstart.parse_args(["--no_plots"]))["plots"] is False
    assert values(quickstart.parse_args(["--resume"]))["resume_from_checkpoint"] is True  # old spelling
    assert accuracy.parse_args([]).pretrained and not accuracy.parse_args(["--no_pretrained"]).pretrained
    config = tmp_path / "quick.yaml"
    config.write_text("quick: true\n")
    assert (
        speed.parse(["--config", str(config)]).quick and not speed.parse(["--config", str(config), "--no_quick"]).quick
    )


def test_target_modules_take_several_names_or_one_regex(make_timm_vit):
    from peft import get_peft_model

    from hyperlora.tuner.layer import HyperLoraLayer

    def adapted(argv: list[str]) -> list[str]:
        config = runner.parse_arguments(imagenet_r.DEFAULTS, argv)[2]
        model = get_peft_model(make_timm_vit(), config)
        return sorted(name for name, m in model.base_model.model.named_modules() if isinstance(m, HyperLoraLayer))

    names = ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv"]
    assert adapted(["--target_modules", "attn.qkv", "attn.proj"]) == names
    assert adapted(["--target_modules", r"blocks\.\d\.attn\.(qkv|proj)"]) == names
    assert adapted(["--target_modules", "attn.qkv"]) == names[1::2]  # one plain name is a name, not a regex
