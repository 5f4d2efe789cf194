"""A real local Ray head with token authentication, private to this test module.

`ray start --head --block` runs in its own process group under a short temp dir with
free ports, so it clashes with no other Ray on the machine; stopping it terminates that
process (Ray then stops its own children) and kills what is left of its group, never
`ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
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
HEAD_RESOURCES = {"job_driver": 4}  # as cluster.yaml's head: the job specs place their drivers there


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


def head_command(root: Path) -> tuple[list[str], str, str]:
    """`ray start --head` on free ports: (command, job server URL, GCS address)."""
    gcs, dashboard, client = free_ports(3)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--object-store-memory=200000000",
        f"--resources={json.dumps(HEAD_RESOURCES)}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        *node_ports(), f"--temp-dir={root / 'ray'}",
    ]
    return command, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}"


def worker_command(root: Path, gcs_address: str, resources: dict[str, float]) -> list[str]:
    """A second node on this machine joining the head at `gcs_address` with custom `resources`.
    Its own temp dir, as on another machine: a node cleans up its runtime-env files (the job's
    working dir among them) when it is done with them, and must not delete the head's."""
    return [
        str(BIN / "ray"), "start", f"--address={gcs_address}", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000",
        f"--resources={json.dumps(resources)}", *node_ports(), f"--temp-dir={root / 'ray-node'}",
    ]


def node_ports() -> list[str]:
    agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(6)
    return [
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
    ]


def start_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


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


def stop_node(process: subprocess.Popen) -> None:
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


def token_env(root: Path) -> tuple[dict[str, str], str]:
    """The environment `ray start` runs with: token auth with a fresh token, this venv first on PATH."""
    token = secrets.token_urlsafe(24)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env, token


def short_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes


@pytest.fixture(scope="module")
def ray_head():
    root = short_root("rj")
    env, token = token_env(root)
    command, url, _ = head_command(root)
    log = root / "ray-start.log"
    process = start_node(command, env, log)
    head = RayHead(url=url, env=env, token=token, root=root)
    try:
        wait_until_serving(head, process, log)
        yield head
    finally:
        stop_node(process)
        shutil.rmtree(root, ignore_errors=True)
