"""The checks CI runs on the code's shape: ruff, and import-linter's contracts (both set in pyproject.toml).

The contracts: jobs and stages sit on models, models on factory, factory on filters; no stage
imports another stage; factory imports no stage.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
