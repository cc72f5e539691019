"""The README is what a newcomer runs first, so what it shows must work as written.

Its Python examples run here, offline, in a scratch folder (so that whatever they save lands there); its shell lines
that start a recipe or a benchmark have their flags parsed by that script's own parser, which rejects a flag the
script does not know (running ``--help`` would not: argparse prints help before it looks at the other flags). It also
stays short and free of references that only make sense to someone who read the project's history.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
MAX_BYTES = 15 * 1024

# The two set-up commands, word for word (.ci/run runs the second); split only to fit the line length.
_VENV = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1"
SETUP_COMMANDS = (
    _VENV + ' && pip install -e ".[demo]" && python recipes/quickstart.py --output_dir outputs/quickstart',
    _VENV + ' && pip install -e ".[test]" && pytest -n 2',
)

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not run\b.*?-->\s*$")
SCRIPT = re.compile(r"^(recipes|benchmarks)/\w+\.py$")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def blocks(language: str) -> list[tuple[int, str, bool]]:
    """(line number, code, preceded by a ``<!-- not run ... -->`` line) for each fenced block in ``language``."""
    found = []
    for match in FENCE.finditer(TEXT):
        if match.group(1) != language:
            continue
        before = TEXT[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((TEXT.count("\n", 0, match.start()) + 1, match.group(2), bool(NOT_RUN.search(before))))
    return found


def commands(code: str) -> list[list[str]]:
    """Each simple command of a shell block, comments and environment assignments dropped."""
    result = []
    for line in code.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                while current and re.match(r"^\w+=", current[0]):
                    current.pop(0)
                if current:
                    result.append(current)
                current = []
            else:
                current.append(token)
    return result


def script_invocations() -> list[tuple[str, list[str], list[str]]]:
    """(script, its flags, accelerate launch's flags) for every shell line that runs a recipe or a benchmark."""
    found = []
    for _, code, _ in blocks("bash"):
        for command in commands(code):
            if command[:2] == ["accelerate", "launch"]:
                index = next((i for i, token in enumerate(command) if SCRIPT.match(token)), None)
                if index is not None:
                    found.append((command[index], command[index + 1 :], command[2:index]))
            elif command[0] in ("python", "python3") and len(command) > 1 and SCRIPT.match(command[1]):
                found.append((command[1], command[2:], []))
    return found


PYTHON_BLOCKS = [(line, code) for line, code, skipped in blocks("python") if not skipped]
INVOCATIONS = script_invocations()


def test_readme_is_short_and_tells_no_history():
    assert len(TEXT.encode("utf-8")) <= MAX_BYTES, "README.md is over 15 KB: move detail to docs/"
    hashes = [
        token
        for token in re.findall(r"\b[0-9a-f]{7,40}\b", TEXT)
        if re.search(r"\d", token) and re.search(r"[a-f]", token)
    ]
    assert not hashes, f"commit-hash-like tokens in README.md: {hashes}"
    assert not re.findall(r"#\d+", TEXT), "issue references (#N) in README.md"
    assert not re.findall(r"\bissues?\b", TEXT, re.IGNORECASE), "the word 'issue' in README.md"


def test_the_two_setup_commands_are_the_ones_ci_runs():
    for command in SETUP_COMMANDS:
        assert f"```bash\n{command}\n```" in TEXT
    ci = (ROOT / ".ci" / "run").read_text()
    assert SETUP_COMMANDS[1] in ci.splitlines()


def test_relative_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_readme_has_runnable_examples_and_commands():
    assert len(PYTHON_BLOCKS) >= 3
    assert ("recipes/quickstart.py", ["--output_dir", "outputs/quickstart"], []) in INVOCATIONS


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"line-{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize(
    "script, flags, launch_flags", INVOCATIONS, ids=[" ".join([*lf, s, *f]) for s, f, lf in INVOCATIONS]
)
def test_command_flags_are_ones_the_script_knows(script, flags, launch_flags, tmp_path, monkeypatch):
    assert (ROOT / script).is_file(), f"README.md runs {script}, which does not exist"
    monkeypatch.chdir(tmp_path)
    for option, value in itertools.pairwise(flags):
        if option == "--config":  # an example file name: give the parser an empty one to read
            (tmp_path / value).write_text("{}\n")
    if launch_flags:
        from accelerate.commands.launch import launch_command_parser

        parsed = launch_command_parser().parse_args([*launch_flags, script, *flags])
        assert parsed.training_script == script and parsed.training_script_args == flags
    module = importlib.import_module(Path(script).stem)  # pytest's pythonpath holds recipes/ and benchmarks/
    if hasattr(module, "parse_args"):
        module.parse_args(flags)
    elif hasattr(module, "parse"):  # benchmarks/speed.py
        module.parse(flags)
    else:  # a recipe: its DEFAULTS under the shared recipe runner's parser
        runner = sys.modules[module.run.__module__]
        runner.parse_arguments(module.DEFAULTS, flags)
