"""Process-death fault injector for `python -m factory.run`, and a fork server that runs trials fast.

`install(spec)` patches the storage backends of *this* process so that it SIGKILLs itself at
a chosen storage write (a fault injector: the real code runs, the process really dies):

- `die_at_write` N (1-based count of object writes) with `die_when`:
  `before` (the N-th write has not started), `torn` (local: half of the object's bytes are in
  its temp file), `commit` (local: the temp file is complete, not yet renamed or linked),
  `after` (the N-th write has returned);
- `write_delay_s`: sleep before every write (widens race windows between two processes);
- `gate_at_write` N: before the N-th write, create `gate_marker + ".reached"` (when given), then
  wait until `gate_file` exists and `gate_absent` does not (to order two processes);
- `log_file`: append one line `N<TAB>key` per write.

Run as `python faults.py ARGS...` it reads the spec from $FACTORY_FAULTS (JSON) and runs
`factory.run.main(ARGS)`. Run as `python faults.py --serve` it is a fork server: it imports
the factory once, then reads batches of jobs (one JSON line each) from stdin, forks one child
per job (each child installs its faults, runs `factory.run.main`, and exits with its code),
SIGKILLs children past their `kill_after_s`, and answers one JSON line of results. A child
costs a fork instead of a Python start with torch imported (seconds on a busy machine).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

WHEN = ("before", "torn", "commit", "after")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


class TornFile:
    """Stands in for the temp file of one write: keeps half the bytes, then the process dies."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data) -> None:
        self.handle.write(bytes(data[: len(data) // 2]))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        die()


class Injector:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.count = 0
        if spec.get("die_when", "before") not in WHEN:
            raise ValueError(f"die_when must be one of {WHEN}")

    def before(self, key: str) -> bool:
        """Called as a write starts; returns True when this write is the one to break."""
        self.count += 1
        spec = self.spec
        if spec.get("log_file"):
            with open(spec["log_file"], "a") as log:
                log.write(f"{self.count}\t{key}\n")
        if spec.get("write_delay_s"):
            time.sleep(spec["write_delay_s"])
        if spec.get("gate_at_write") == self.count:
            self.wait_at_gate()
        target = spec.get("die_at_write") == self.count
        if target and spec.get("die_when", "before") == "before":
            die()
        return target

    def wait_at_gate(self) -> None:
        spec = self.spec
        if spec.get("gate_marker"):
            Path(spec["gate_marker"] + ".reached").touch()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            present = not spec.get("gate_file") or os.path.exists(spec["gate_file"])
            absent = not spec.get("gate_absent") or not os.path.exists(spec["gate_absent"])
            if present and absent:
                return
            time.sleep(0.005)
        raise TimeoutError("the gate never opened")

    def after(self, target: bool) -> None:
        if target and self.spec.get("die_when") == "after":
            die()


def install(spec: dict[str, Any]) -> Injector:
    """Patch LocalStorage and S3Storage writes of this process per `spec`."""
    import factory.framework.storage as storage

    injector = Injector(spec)
    local_write = storage.LocalStorage.write_bytes
    local_commit = storage.LocalStorage.__dict__["_commit"]  # the staticmethod itself
    s3_write = storage.S3Storage.write_bytes
    s3_upload = storage.S3Storage.upload_file
    when = spec.get("die_when", "before")

    def local_write_bytes(self, key, data, *, create_only=False):
        target = injector.before(key)
        if target and when == "torn":
            real_fdopen = os.fdopen
            os.fdopen = lambda fd, mode="r", *a, **k: TornFile(real_fdopen(fd, mode, *a, **k))
        if target and when == "commit":
            storage.LocalStorage._commit = staticmethod(lambda tmp, target, create_only: die())
        try:
            local_write(self, key, data, create_only=create_only)
        finally:
            storage.LocalStorage._commit = local_commit
        injector.after(target)

    def local_upload_file(self, local_path, key):
        local_write_bytes(self, key, Path(local_path).read_bytes())

    def s3_write_bytes(self, key, data, *, create_only=False):
        target = injector.before(key)
        s3_write(self, key, data, create_only=create_only)
        injector.after(target)

    def s3_upload_file(self, local_path, key):
        target = injector.before(key)
        s3_upload(self, local_path, key)
        injector.after(target)

    storage.LocalStorage.write_bytes = local_write_bytes
    storage.LocalStorage.upload_file = local_upload_file
    storage.S3Storage.write_bytes = s3_write_bytes
    storage.S3Storage.upload_file = s3_upload_file
    return injector


def run_factory(argv: list[str], spec: dict[str, Any]) -> int:
    import factory.run

    install(spec)
    return factory.run.main(argv)


# --- fork server -------------------------------------------------------------------------


def preload() -> None:
    """Import what `--stage publish` needs, once, before any fork (no threads are started)."""
    import boto3  # noqa: F401

    import factory.dataset.manifest  # noqa: F401
    import factory.demo  # noqa: F401
    import factory.framework.executor  # noqa: F401
    import factory.run  # noqa: F401
    import stages.dialogue  # noqa: F401
    import stages.plan  # noqa: F401
    import stages.publish  # noqa: F401
    import stages.references  # noqa: F401


def child(job: dict[str, Any]) -> None:
    rc = 99
    try:
        os.chdir(job["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.update(job.get("env", {}))
        rc = run_factory(job["argv"], job.get("faults", {}))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run_batch(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    started = time.monotonic()
    running: dict[int, dict[str, Any]] = {}
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = job
    results: dict[str, Any] = {}
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic() - started
            for other, job in running.items():
                if job.get("kill_after_s") is not None and now >= job["kill_after_s"]:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.002)
            continue
        job = running.pop(pid)
        results[job["id"]] = {
            "rc": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - started, 3),
        }
    return results


def serve() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(run_batch(json.loads(line))), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(run_factory(sys.argv[1:], json.loads(os.environ.get("FACTORY_FAULTS", "{}"))))
