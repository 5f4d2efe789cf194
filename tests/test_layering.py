"""The checks CI runs on the code's shape: ruff, and import-linter's contracts (both set in pyproject.toml).

The contracts, from the top: the applications in factory (run, versions, report, review, ...), then
jobs | stages, models, factory.dataset, factory.framework, filters; no stage imports another stage.
They are true only if every module is in a layer and no module reaches another by string.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """The dev extra's console script: beside this interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def check(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    done = check(tool("ruff"), "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_import_contracts_hold():
    done = check(tool("lint-imports"), "--no-cache")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def layers() -> list[list[str]]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = next(contract for contract in contracts if contract["type"] == "layers")
    assert "ignore_imports" not in layered, "the layers contract must hold with no ignored import"
    return [[name.strip() for name in layer.replace(":", "|").split("|")] for layer in layered["layers"]]


def test_every_module_of_factory_is_in_a_layer():
    listed = [name for layer in layers() for name in layer]
    graph = grimp.build_graph("factory")
    outside = sorted(module for module in graph.modules if module != "factory"
                     and not any(module == name or module.startswith(name + ".") for name in listed))
    assert outside == [], f"modules in no layer of the contract (so unchecked): {outside}"


def test_no_module_is_imported_by_a_string():
    """`import_module("stages.x")` would hide an import from the contracts; optional heavy
    dependencies are imported inside functions instead, where grimp still sees them."""
    found = []
    for package in ("factory", "stages", "models", "filters", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                        "import_module", "__import__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
