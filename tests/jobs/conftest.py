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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import S3_TEST_KEYS
from tests.reliability.harness import pids_with_env

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


def worker_command(root: Path, gcs_address: str, resources: dict[str, float], temp_name: str = "ray-node") -> list[str]:
    """A second node on this machine joining the head at `gcs_address` with custom `resources`.
    Its own temp dir, as on another machine: a node cleans up its runtime-env files (the job's
    working dir among them) when it is done with them, and must not delete the head's."""
    return [
        str(BIN / "ray"), "start", f"--address={gcs_address}", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000",
        f"--resources={json.dumps(resources)}", *node_ports(), f"--temp-dir={root / temp_name}",
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


# --- the staging cluster: configs/staging.yaml's bucket, a head and one 'GPU' worker node ----------

BUCKET = "cafe-staging"
GPU_TYPES = {"a100_40g": 2, "a100_80g": 2}  # stand-ins for cluster.yaml's gpu_a100 and gpu_llm nodes
MODEL_FOLDERS = {  # demo model -> where staging.yaml names it
    "tiny-sd": "models/tiny-sd", "tiny-clip": "models/tiny-clip", "tiny-dino": "models/tiny-dino",
    "tiny-llama": "models/tiny-llama", "tiny-cafe-clip": "models/tiny-cafe-clip",
    "tiny-dinov2": "models/tiny-dinov2", "tiny-promptnet": "checkpoints/promptnet/tiny",
    "tiny-ip-adapter": "models/tiny-ip-adapter",
}
NODE_VARIABLE = "STAGING_NODE"  # in a worker node's environment: finds every process of that node


def upload_folder(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="session")
def staging_bucket(s3_server, tmp_path_factory):
    """The staging bucket: the tiny models, a trained-PromptNet stand-in and a few face photos.
    Session-wide: the rehearsal and the node-loss tests each write under their own storage root."""
    import io

    import boto3
    import numpy as np
    from PIL import Image

    from factory.demo import prepare_demo
    from factory.framework.config import load_config

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    build = tmp_path_factory.mktemp("staging-models")
    here = Path.cwd()
    os.chdir(build)
    try:
        prepare_demo(load_config(str(REPO / "configs" / "staging.yaml")))  # the tiny models staging names
    finally:
        os.chdir(here)
    for name, prefix in MODEL_FOLDERS.items():
        upload_folder(client, build / "factory-data" / "models" / name, prefix)
    rng = np.random.default_rng(3)
    for n in range(3):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (72, 60, 3), dtype=np.uint8)).save(out, format="PNG")
        client.put_object(Bucket=BUCKET, Key=f"inputs/faces/face-{n}.png", Body=out.getvalue())
    shutil.rmtree(build)
    return s3_server


@dataclass
class StagingCluster:
    """A token-auth head (job drivers, light stages) and one 'GPU' worker node that can be lost:
    `kill_worker` SIGKILLs every process of the worker node, `start_worker` joins a fresh one."""

    head: RayHead
    gcs: str
    worker_env: dict[str, str]
    caches: dict[str, Path]
    nodes: list[subprocess.Popen] = field(default_factory=list)
    workers: int = 0

    def start_worker(self) -> None:
        self.workers += 1
        name = f"{self.head.root.name}-worker-{self.workers}"
        command = worker_command(self.head.root, self.gcs, GPU_TYPES, temp_name=f"ray-node-{self.workers}")
        env = {**self.worker_env, NODE_VARIABLE: name}
        self.nodes.append(start_node(command, env, self.head.root / f"{name}.log"))

    def kill_worker(self) -> None:
        """SIGKILL the worker node's `ray start`, raylet, agents and workers at once, as a lost machine."""
        name = f"{self.head.root.name}-worker-{self.workers}"
        for pid in pids_with_env(NODE_VARIABLE, name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[-1].wait(timeout=30)


@contextmanager
def staging_cluster(bucket_url: str, prefix: str) -> Iterator[StagingCluster]:
    """A head and one worker node, each with its own model cache as two machines would have;
    S3 settings come from the nodes' environment."""
    root = short_root(prefix)
    env, token = token_env(root)
    env.update(S3_TEST_KEYS, AWS_ENDPOINT_URL=bucket_url, AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1")
    command, url, gcs = head_command(root)
    caches = {"head": root / "cache-head", "worker": root / "cache-worker"}
    head = start_node(command, {**env, "FACTORY_MODEL_CACHE": str(caches["head"])}, root / "head.log")
    cluster = StagingCluster(RayHead(url=url, env=env, token=token, root=root), gcs,
                             {**env, "FACTORY_MODEL_CACHE": str(caches["worker"])}, caches, [head])
    try:
        wait_until_serving(cluster.head, head, root / "head.log")
        cluster.start_worker()
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def start_submit(head: RayHead, job: str, label: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """`python -m jobs submit JOB --config configs/staging.yaml --follow [--set ...]`, started; its
    output goes to a file under the cluster's folder, to `tail -f` while it runs."""
    command = [sys.executable, "-m", "jobs", "submit", job, "--config", "configs/staging.yaml",
               "--address", head.url, "--poll-s", "1", "--follow"]
    for override in overrides:
        command += ["--set", override]
    log = head.root / f"{label}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=head.client_env(), stdout=out, stderr=subprocess.STDOUT)
    return process, log


def submit(head: RayHead, job: str, label: str, *overrides: str) -> tuple[int, str]:
    """Submit JOB and wait for its end: (exit code, its output)."""
    process, log = start_submit(head, job, label, *overrides)
    return process.wait(timeout=600), log.read_text()
