"""What a job uploads: Ray's own packager, on a project with the repo's ignore files and junk."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from jobs.spec import load_specs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in (".gitignore", ".rayignore"):
        shutil.copy(REPO / name, root / name)
    files = {
        "factory/run.py": b"print('run')\n",
        "configs/production.yaml": b"dataset: d\n",
        "factory-data/models/tiny-sd/model.safetensors": b"\0" * 4096,
        ".venv/lib/site.py": b"x",
        ".git/objects/ab/cdef": b"x",
        "factory/__pycache__/run.cpython-311.pyc": b"x",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def uploaded(project: Path, excludes: list[str], tmp_path: Path) -> set[str]:
    from ray._private.runtime_env.packaging import _zip_files  # what submit_job's upload zips

    archive = tmp_path / "pkg.zip"
    _zip_files(str(project), excludes, str(archive), include_gitignore=True)
    return set(zipfile.ZipFile(archive).namelist())


def assert_only_code(names: set[str]) -> None:
    assert {"factory/run.py", "configs/production.yaml"} <= names
    junk = [name for name in names if name.split("/")[0] in {"factory-data", ".venv", ".git"} or "__pycache__" in name]
    assert not junk


def test_spec_uploads_carry_code_and_config_only(project, tmp_path):
    spec = load_specs()["nightly-sid"]
    assert_only_code(uploaded(project, list(spec.runtime_env.excludes), tmp_path))


def test_plain_ray_job_submit_uploads_are_small_too(project, tmp_path):
    assert_only_code(uploaded(project, [], tmp_path))  # .gitignore + .rayignore alone
