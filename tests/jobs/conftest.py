"""A real local Ray head with token authentication, private to this test module.

`ray start --head --block` runs in its own process group under a short temp dir with
free ports, so it clashes with no other Ray on the machine; stopping it terminates that
process (Ray then stops its own children) and kills what is left of its group, never
`ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


@dataclass
class RayHead:
    url: str  # the job server (dashboard) address
    env: dict[str, str]  # what `ray start` ran with: token mode, token file, this venv first on PATH
    token: str
    root: Path

    def client(self):
        from jobs.submit import connect

        return connect(self.url, self.token)

    def client_env(self, **changes: str | None) -> dict[str, str]:
        """The environment for a submitting process (RAY_AUTH_MODE unset: our client needs only the token)."""
        env = {key: value for key, value in self.env.items() if key != "RAY_AUTH_MODE"}
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def head_command(root: Path) -> tuple[list[str], str]:
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--object-store-memory=200000000",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--temp-dir={root / 'ray'}",
    ]
    return command, f"http://127.0.0.1:{dashboard}"


def wait_until_serving(head: RayHead, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            head.client().list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def stop_head(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # our own group: whatever Ray left behind
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    root = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    token = secrets.token_urlsafe(24)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command, url = head_command(root)
    log = root / "ray-start.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(url=url, env=env, token=token, root=root)
    try:
        wait_until_serving(head, process, log)
        yield head
    finally:
        stop_head(process)
        shutil.rmtree(root, ignore_errors=True)
