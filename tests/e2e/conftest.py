import os
import subprocess
import sys

import pytest


def run_cli(cwd, *args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "factory.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def machine_cache(tmp_path_factory):
    """The environment of one machine for this session's demos: one model cache
    (`$FACTORY_MODEL_CACHE`), so SmolLM2 is converted once (about a minute, by the first demo) and a
    demo in a new folder copies it, as on a machine (`factory.demo.smollm2`). Not the per-test cache
    of tests/conftest.py, which made every demo in a new folder convert it again."""
    return {**os.environ, "FACTORY_MODEL_CACHE": str(tmp_path_factory.mktemp("machine-model-cache"))}


@pytest.fixture(scope="session")
def demo(tmp_path_factory, machine_cache):
    """The README's demo command, run once in an empty folder: (folder, completed process)."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_cli(cwd, "--stage", "all", env=machine_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result
