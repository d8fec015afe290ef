"""The layout issue #14 asked for, held: the import graph keeps its layers and has no cycles
(the contracts in pyproject.toml, checked by import-linter), no module of src/ is over 500
lines and no function over 60."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "labrunner"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_imports_keep_their_layers_and_have_no_cycles() -> None:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.fail("lint-imports is not installed (import-linter is a dependency: run "
                    "scripts/setup.sh)", pytrace=False)
    done = subprocess.run([command], cwd=SRC.parent.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (
        "an import runs back up a layer or closes a circle (see [tool.importlinter] in "
        "pyproject.toml):\n" + done.stdout[-4000:] + done.stderr[-2000:])


def _sizes() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(SRC.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_no_module_over_500_lines_and_no_function_over_60() -> None:
    modules, functions = _sizes()
    assert not modules and not functions, (
        f"split along the seams (docs/ARCHITECTURE.md): modules over {MAX_MODULE_LINES} "
        f"lines: {modules}; functions over {MAX_FUNCTION_LINES} lines: {functions}")
