"""The command line of every script (recipes, quickstart, benchmarks), parsed one way.

transformers' argument names; defaults, then a ``--config file.yaml|json``, then the command line, each overriding
the last; ``--no_<flag>`` for every boolean flag, whatever its default (a config file can turn any of them on);
``--a-b`` accepted for ``--a_b``; and no prefix matching, so a mistyped ``--num_epoch`` is an error instead of
silently meaning ``--num_train_epochs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

# ContinualTrainingArguments' fields before they took transformers' names; still accepted on the command line and
# in config files by the scripts that parse those arguments.
TRAINING_ALIASES = {
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "num_workers": "dataloader_num_workers",
    "resume": "resume_from_checkpoint",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each argument's default, and the script's docstring as written."""


def parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) over ``defaults`` and the ``--config`` file it names.

    ``aliases`` maps old spellings to argument names (``{"num_epochs": "num_train_epochs"}``): each becomes a flag
    listed in ``--help``, and a config-file key.
    """
    aliases = dict(aliases or {})
    argv = [_underscored(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    parser.allow_abbrev = False
    parser.formatter_class = HelpFormatter
    parser.add_argument("--config", help="A YAML or JSON file of arguments; the command line overrides it.")
    named = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    for old, new in aliases.items():
        _add_alias(parser, old, named[new])
    _add_negations(parser)

    config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config.add_argument("--config", type=Path)
    path = config.parse_known_args(argv)[0].config
    values = dict(defaults or {})
    if path is not None:
        values |= {aliases.get(key, key): value for key, value in read_config(path).items()}
    unknown = sorted(set(values) - {action.dest for action in parser._actions} - {"help", "config"})
    if unknown:
        raise SystemExit(f"unknown arguments {unknown} in {path or 'the defaults'}")
    for action in parser._actions:  # aliases and negations keep no default of their own, so --help shows one
        if action.dest in values and action.default is not argparse.SUPPRESS:
            action.default = values[action.dest]
            action.required = False
    return parser.parse_args(argv)


def to_dataclasses(namespace: argparse.Namespace, types: Iterable[type]) -> tuple:
    """One instance of each dataclass, from the namespace's values of its fields (as HfArgumentParser does)."""
    return tuple(cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init}) for cls in types)


def read_config(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise SystemExit(f"cannot read --config {path}: {error}") from None
    kind = "JSON" if Path(path).suffix == ".json" else "YAML"
    try:
        values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SystemExit(f"--config {path} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path} must hold a mapping of argument names to values")
    return values


def _underscored(arg: str) -> str:
    """``--image-size=64`` -> ``--image_size=64``; values and single-dash arguments are left alone."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def _is_flag(action: argparse.Action) -> bool:
    """``store_true``, or HfArgumentParser's ``--flag [true|false]``."""
    return action.const is True and action.nargs in (0, "?")


def _add_alias(parser: argparse.ArgumentParser, old: str, target: argparse.Action) -> None:
    """``--old`` parses as ``target`` (same type, count and constant) and writes the same destination."""
    if target.nargs == 0:
        kwargs = {"action": "store_const", "const": target.const}
    else:
        kwargs = {"type": target.type, "nargs": target.nargs, "const": target.const, "choices": target.choices}
    name = target.option_strings[0]
    parser.add_argument(
        f"--{old}", dest=target.dest, default=argparse.SUPPRESS, help=f"old spelling of {name}", **kwargs
    )


def _add_negations(parser: argparse.ArgumentParser) -> None:
    taken = {option for action in parser._actions for option in action.option_strings}
    for action in list(parser._actions):
        negation = f"--no_{action.dest}"
        if _is_flag(action) and negation not in taken:
            taken.add(negation)
            hidden = action.help == argparse.SUPPRESS
            text = argparse.SUPPRESS if hidden else f"sets {action.dest} to false"
            parser.add_argument(negation, dest=action.dest, action="store_false", default=argparse.SUPPRESS, help=text)
