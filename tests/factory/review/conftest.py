"""A real Label Studio server on 127.0.0.1 for the review tests, and two reviewers with tokens.

Label Studio pins numpy and pyarrow below the versions this project runs on and brings about 1 GB
of Django and cloud clients, so it lives in its own virtual environment, built once per machine
under a stable path (`$FACTORY_LABEL_STUDIO_HOME`, default ~/.cache/cafe-factory/label-studio-1.23.2)
with pip from the same package index as the project (a few minutes, once; CI builds it on its
first run, and again when `LABEL_STUDIO_REQUIREMENTS` change). The project itself needs only
`label-studio-sdk` (the `review` and `dev` extras).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

LABEL_STUDIO_VERSION = "1.23.2"
# what its venv is built from: sentry-sdk 3.0 (2026-12) refuses the `send_default_pii` option that
# Label Studio 1.23.2 passes at start, and its dependencies are otherwise unpinned
LABEL_STUDIO_REQUIREMENTS = (f"label-studio=={LABEL_STUDIO_VERSION}", "sentry-sdk<3")
START_TIMEOUT_S = 300
REVIEWERS = ("reviewer-one@example.com", "reviewer-two@example.com")
OFFLINE = {"LATEST_VERSION_CHECK": "false"}  # no look-up of the newest release on start


def label_studio_home() -> Path:
    default = Path.home() / ".cache" / "cafe-factory" / f"label-studio-{LABEL_STUDIO_VERSION}"
    return Path(os.environ.get("FACTORY_LABEL_STUDIO_HOME", default))


def provision_label_studio() -> tuple[Path, Path]:
    """The `label-studio` executable of the cached venv and a migrated data folder to start from,
    building either first if it is not complete (a fresh data folder spends 90 s in migrations)."""
    home = label_studio_home()
    home.parent.mkdir(parents=True, exist_ok=True)
    executable, template = home / "bin" / "label-studio", home / "data-template"
    with open(home.parent / f".{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine, however many sessions start at once
        built_from = " ".join(LABEL_STUDIO_REQUIREMENTS)
        complete = home / ".complete"
        if not complete.exists() or complete.read_text() != built_from:  # a venv built otherwise is rebuilt
            shutil.rmtree(home, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
            subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", *LABEL_STUDIO_REQUIREMENTS],
                           check=True)
            complete.write_text(built_from)
        if not (template / ".migrated").exists():
            shutil.rmtree(template, ignore_errors=True)
            migrated = subprocess.run([str(executable), "version", "--data-dir", str(template)],
                                      capture_output=True, text=True, env={**os.environ, **OFFLINE})
            if migrated.returncode != 0:
                raise RuntimeError(f"Label Studio could not start in {home}: {migrated.stderr[-2000:]}")
            (template / ".migrated").write_text(LABEL_STUDIO_VERSION)
    return executable, template


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if json.loads(answer.read()).get("status") == "UP":
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"Label Studio did not answer /health within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@dataclass
class LabelStudioServer:
    url: str
    tokens: dict[str, str]  # reviewer email -> personal access token


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    executable, template = provision_label_studio()
    data = tmp_path_factory.mktemp("label-studio") / "data"
    shutil.copytree(template, data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **OFFLINE, "LABEL_STUDIO_BASE_DATA_DIR": str(data)}
    log = data / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(executable), "start", "--no-browser", "--port", str(port), "--host", url, "--internal-host",
             "127.0.0.1", "--data-dir", str(data), "--username", REVIEWERS[0], "--password", secrets.token_hex(12)],
            stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_up(url, process, log)
        minted = subprocess.run([str(executable.parent / "python"), str(Path(__file__).with_name("mint_tokens.py")),
                                 str(data), *REVIEWERS], capture_output=True, text=True, env=env, check=True)
        yield LabelStudioServer(url, json.loads(minted.stdout.strip().splitlines()[-1]))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
