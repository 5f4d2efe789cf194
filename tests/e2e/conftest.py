import subprocess
import sys

import pytest


def run_cli(cwd, *args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "factory.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The README's demo command, run once in an empty folder: (folder, completed process)."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_cli(cwd, "--stage", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result
