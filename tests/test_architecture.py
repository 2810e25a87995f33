"""The house rules of docs/architecture.md, checked: stage layers, no circles, small pieces.

import-linter holds the layers and the circles (pyproject.toml, `make lint`); these tests show
that its contracts pass on the tree and fail on a tree that breaks them, and check what no
contract states: private names stay in their package, every package says what lives there,
modules and functions stay small enough to read.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnaudit"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
STAGES = [p.name for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file()]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the tree at `root`, which is the one imported (PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def broken_copy(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package and its contracts with `line` added to `module`."""
    shutil.copytree(PACKAGE, tmp_path / "bnaudit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "bnaudit" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_contracts_hold_on_this_tree() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_an_import_up_a_layer_breaks_the_lint(tmp_path: Path) -> None:
    # Type-only: a circle or an upward import is one even where it never runs.
    line = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bnaudit.cli import app"
    result = lint(broken_copy(tmp_path, "core/errors.py", line))
    assert result.returncode != 0
    assert "bnaudit.core is not allowed to import bnaudit.cli" in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_a_circle_inside_a_stage_breaks_the_lint(tmp_path: Path) -> None:
    # measure.passes imports measure.probe: probe importing passes back closes a circle.
    result = lint(broken_copy(tmp_path, "measure/probe.py", "import bnaudit.measure.passes"))
    assert result.returncode != 0
    assert "No cycles are allowed in bnaudit.measure" in result.stdout


def test_no_module_imports_another_packages_private_names() -> None:
    found = []
    for path in modules():
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:2])
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnaudit")):
                continue
            private_module = any(p.startswith("_") for p in node.module.split(".")[1:])
            private_names = [a.name for a in node.names if a.name.startswith("_")]
            own = node.module == package or node.module.startswith(package + ".")
            if not own and (private_module or [n for n in private_names if n != "__version__"]):
                found.append(f"{path.relative_to(ROOT)}: from {node.module} import {private_names}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("stage", STAGES)
def test_every_package_says_in_one_line_what_lives_there(stage: str) -> None:
    package = importlib.import_module(f"bnaudit.{stage}")
    doc = package.__doc__ or ""
    assert doc.strip() and "\n" not in doc.strip(), f"bnaudit.{stage}: one-line docstring"
    for name in getattr(package, "__all__", ()):
        try:
            assert getattr(package, name) is not None  # every export resolves
        except ImportError as missing:  # or names the optional framework it needs
            assert "pip install" in str(missing), f"bnaudit.{stage}.{name}: {missing}"


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in modules():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                    too_long.append(f"{where}: {length} lines")
    assert not too_long, "\n".join(too_long)
