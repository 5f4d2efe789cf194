"""Helpers for the reliability suite: run the demo as a process group, kill it, compare versions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULTS_SCRIPT = Path(__file__).with_name("faults.py")
REPO = Path(__file__).resolve().parents[2]
DATASET = "demo"
VERSION = "demo"
# The tiny demo, made to keep some candidates and reject others (random-weight CLIP scores
# sit around -0.2..0.05), with small shards so a version has several.
DEMO_SETTINGS = (
    "plan.jobs_per_reference=2",
    "plan.unit_size=2",
    "filter.thresholds.clip_t=-0.1",
    "publish.shard_max_samples=2",
    "publish.executor=local",  # these tests kill the publishing process itself, at each of its writes
    # not the demo's SmolLM2 (these runs are many and timed): the tiny random Llama, with the text
    # bounds its random tokens meet often enough, so the demo keeps some candidates
    "dialogue.model=./factory-data/models/tiny-llama",
    "dialogue.max_new_tokens=128",
    "dialogue.max_user_chars=24",
    "dialogue.min_assistant_chars=8",
    "dialogue.max_assistant_chars=40",
)


def demo_args(stage: str, root: str, *extra: str) -> list[str]:
    args = ["--stage", stage, "--set", f"storage.root={root}"]
    for setting in (*DEMO_SETTINGS, *extra):
        args += ["--set", setting]
    return args


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})
    env.update(extra)
    return env


# --- the whole demo as one process group ------------------------------------------------------


@dataclass
class DemoRun:
    rc: int | None
    killed: bool
    seconds: float
    stdout: Path
    stderr: Path
    notes: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


def run_pids(token: str) -> list[int]:
    """Live processes of one demo run: the driver, Ray's daemons and its workers (Ray gives
    workers their own process groups, so they are found by a variable of their environment)."""
    return pids_with_env("RELIABILITY_RUN", token)


def pids_with_env(variable: str, value: str) -> list[int]:
    """Live processes whose environment holds `variable=value` (inherited by all they start)."""
    marker = f"{variable}={value}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def busy_actors(token: str) -> list[int]:
    """Ray Data map actors of the run that are inside a task right now (Ray retitles them
    `ray::MapWorker(...).submit` while a unit runs)."""
    return [pid for pid in run_pids(token)
            if cmdline(pid).startswith("ray::MapWorker") and cmdline(pid).endswith(".submit")]


def kill_all(pgid: int, token: str) -> None:
    """SIGKILL the driver's process group, then any process of the run outside it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in run_pids(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_demo(workdir: Path, args: list[str], env: dict[str, str], logs: Path, *,
             kill_when: Callable[[], bool] | None = None, kill_delay_s: float = 0.0,
             on_tick: Callable[[str, DemoRun], None] | None = None, timeout_s: float = 600) -> DemoRun:
    """Run `python -m factory.run ARGS` in its own session; SIGKILL the whole group when `kill_when()`.

    After the run, every process it started must be gone within seconds (Ray's workers and
    daemons die with their raylet); any left over is recorded in `notes`, then killed."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    token = uuid.uuid4().hex
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "factory.run", *args], cwd=workdir,
                                env={**env, "RELIABILITY_RUN": token}, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    run = DemoRun(None, False, 0.0, out, err)
    kill_at = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout_s:
                raise TimeoutError(f"demo run did not finish in {timeout_s}s; see {err}")
            if on_tick:
                on_tick(token, run)
            if kill_at is None and kill_when is not None and kill_when():
                kill_at = now + kill_delay_s
            if kill_at is not None and now >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                run.killed = True
                proc.wait()
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_all(proc.pid, token)
            proc.wait()
        deadline = time.monotonic() + 30
        while run_pids(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        run.notes.extend(f"left over: {pid} {cmdline(pid)[:80]}" for pid in run_pids(token))
        kill_all(proc.pid, token)  # nothing of a test run may outlive it
    run.rc = proc.returncode
    run.seconds = round(time.monotonic() - started, 1)
    return run


# --- the fork server (see faults.py) -----------------------------------------------------------


class ForkServer:
    """A long-lived `faults.py --serve` process; `run(jobs)` forks one child per job."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, str(FAULTS_SCRIPT), "--serve"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the fork server did not start")

    def run(self, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for job in jobs:
            job.setdefault("cwd", str(self.cwd))
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def run_one(self, logs: Path, argv: list[str], faults: dict[str, Any] | None = None,
                env: dict[str, str] | None = None, kill_after_s: float | None = None) -> ForkResult:
        logs.parent.mkdir(parents=True, exist_ok=True)
        job = {"id": "one", "argv": argv, "faults": faults or {}, "env": env or {}, "kill_after_s": kill_after_s,
               "out": str(logs.with_suffix(".out")), "err": str(logs.with_suffix(".err"))}
        result = self.run([job])["one"]
        return ForkResult(result["rc"], result["seconds"], logs.with_suffix(".out"), logs.with_suffix(".err"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class ForkResult:
    rc: int
    seconds: float
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


# --- versions ---------------------------------------------------------------------------------


def version_facts(storage, dataset: str = DATASET, version: str = VERSION) -> dict[str, Any]:
    """What must be identical between two publishes of the same inputs."""
    from factory.dataset.manifest import load_manifest, verify_version, version_dir

    manifest = load_manifest(storage, dataset, version)
    index = storage.read_parquet(f"{version_dir(dataset, version)}/index.parquet").to_pylist()
    return {
        "shards": [(s["path"], s["sha256"], s["bytes"], s["samples"]) for s in manifest["shards"]],
        "keys": [row["key"] for row in index],
        "samples": manifest["samples"],
        "problems": verify_version(storage, dataset, version),
    }


def visible_strays(storage, dataset: str = DATASET, version: str = VERSION) -> list[str]:
    """Objects a reader can see under the version folder that the manifest does not account for."""
    from factory.dataset.manifest import load_manifest, version_dir

    folder = version_dir(dataset, version)
    manifest = load_manifest(storage, dataset, version)
    expected = {f"{folder}/manifest.json", f"{folder}/index.parquet"}
    expected |= {f"{folder}/{name}" for name in manifest.get("card", [])}
    expected |= {f"{folder}/{s['path']}" for s in manifest["shards"]}
    return sorted(set(storage.list(folder)) - expected)


def hidden_temp_files(root: Path) -> list[str]:
    """Leftover temp files of interrupted local writes (invisible to `Storage.list`)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def accepted_keys(storage, run_id: str = "demo") -> set[str]:
    """Keys of the rows that survived every stage (what the version must hold)."""
    import pandas as pd

    frames = [storage.read_parquet(key).to_pandas()
              for key in storage.list(f"runs/{run_id}/dialogue") if key.endswith(".parquet")]
    rows = pd.concat(frames, ignore_index=True)
    return set(rows.loc[rows["reject_reason"].isna(), "key"])


def copy_tree(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
