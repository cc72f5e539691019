"""The package's architecture, checked: the PEFT tuner stands alone, no module grows past a reader's size, and the
scripts import installed code rather than editing sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hyperlora"
MAX_LINES = 450


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved to absolute hyperlora.* names."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_imported_modules_resolves_relative_imports():
    assert "hyperlora.method.embedding" in imported_modules(PACKAGE / "training" / "trainer.py")
    assert "hyperlora.files" in imported_modules(PACKAGE / "tuner" / "config.py")


@pytest.mark.parametrize("path", sorted((PACKAGE / "tuner").glob("*.py")), ids=lambda p: p.name)
def test_the_tuner_imports_nothing_of_the_method_training_or_data(path):
    method = ("hyperlora.method", "hyperlora.training", "hyperlora.data", "hyperlora.evaluation", "hyperlora.demo")
    assert not [name for name in imported_modules(path) if name.startswith(method)]


def test_no_package_module_is_longer_than_a_reader_can_hold():
    long = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_scripts_and_tests_do_not_edit_sys_path():
    offenders = []
    for folder in ("recipes", "benchmarks", "tests"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
