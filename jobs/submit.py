"""Submit a job spec through Ray's `JobSubmissionClient`, wait for it, map its end to an exit code.

Token auth: Ray heads started with `RAY_AUTH_MODE=token` (or with a token already at
~/.ray/auth_token) refuse requests without `Authorization: Bearer <token>`. The token is
looked up where Ray looks (`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`,
~/.ray/auth_token), sent only in that header, and never printed: every message that
leaves this module goes through `redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ray.job_submission import JobSubmissionClient

from factory.framework.config import ConfigError, load_config
from jobs.auth_token import default_token_path
from jobs.spec import JobSpec, SpecError, plain_address, secret_in_text

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_ERROR, EXIT_STOPPED = 0, 1, 2, 3
LOG_TAIL_LINES = 40
STATUS_ATTEMPTS = 8  # status requests in a row that may fail before the submitter gives up on its job


class SubmitError(RuntimeError):
    """The job could not be submitted or followed (cluster unreachable, refused, ...)."""


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: str  # a ray.job_submission.JobStatus value, e.g. "SUCCEEDED"
    exit_code: int


# --- authentication -------------------------------------------------------------------


def find_token() -> str | None:
    """The Ray auth token from the places Ray reads it, in Ray's order; None when absent."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        token = read_token_file(Path(named).expanduser())
        if token is None:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH is set but {named} is missing or empty")
        return token
    return read_token_file(default_token_path())


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, IsADirectoryError):
        return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text


class StreamRedactor:
    """Redact `token` from a text that arrives in chunks, also where a chunk boundary cuts it.

    Each `feed` holds back the last len(token) - 1 characters (they may be the start of a token
    the next chunk completes); `flush` releases them at the end of the stream, less a cut-off start
    of the token (a log cut mid-token) longer than 3 characters.
    """

    def __init__(self, token: str | None):
        self.token = token
        self.held = ""

    def feed(self, chunk: str) -> str:
        if not self.token:
            return chunk
        text = redact(self.held + chunk, self.token)
        cut = max(0, len(text) - (len(self.token) - 1))
        self.held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        held, self.held = self.held, ""
        cut = next((start for start in range(len(held) - 3)  # a start of 3 characters or fewer tells nothing
                    if self.token and self.token.startswith(held[start:])), None)
        return held if cut is None else held[:cut] + "<redacted>"


# --- building the submission ----------------------------------------------------------


def entrypoint_with_overrides(spec: JobSpec, overrides: list[str], config: str | None = None) -> str:
    """The spec's entrypoint with its `--config` replaced by `config` (a path inside the working
    dir: the same job against staging) and one `--set key=value` per override."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not key.strip():
            raise SpecError(f"--set expects key=value, got {override!r}" if not secret_in_text(override)
                            else "--set expects key=value")
        if secret_in_text(override):
            raise SpecError(f"--set {key} holds what looks like a secret, which the cluster stores and `jobs list` "
                            "prints: credentials come from the instance role or a secret store on the cluster")
    entrypoint = spec.entrypoint if config is None else with_config(spec.entrypoint, config)
    return entrypoint + "".join(f" --set {shlex.quote(item)}" for item in overrides)


def check_factory_config(spec: JobSpec, overrides: list[str], config: str | None = None) -> None:
    """A `factory.run` job's config and `--set` overrides validated here, as the job would on the
    cluster, so a bad name or number is refused before submitting (when the config is readable here)."""
    words = shlex.split(spec.entrypoint if config is None else with_config(spec.entrypoint, config))
    if "factory.run" not in words or "://" in spec.runtime_env.working_dir:
        return
    named = words[words.index("--config") + 1] if "--config" in words[:-1] else None
    path = Path(spec.runtime_env.working_dir).expanduser() / named if named else None
    if path is not None and not path.is_file():
        return  # only on the cluster (a file the working dir gets elsewhere): the job checks it there
    try:
        load_config(path, overrides)
    except ConfigError as err:
        raise SpecError(f"job {spec.name}: {err}") from None


def with_config(entrypoint: str, config: str) -> str:
    words = shlex.split(entrypoint)
    if "--config" in words[:-1]:
        words[words.index("--config") + 1] = config
    else:
        words += ["--config", config]
    return shlex.join(words)


def runtime_env(spec: JobSpec) -> dict[str, Any]:
    env = spec.runtime_env
    working_dir = env.working_dir
    if "://" not in working_dir:  # a local folder; remote URIs (s3://...zip) pass as they are
        folder = Path(working_dir).expanduser().resolve()
        if not folder.is_dir():
            raise SpecError(f"job {spec.name}: working_dir {working_dir!r} is not a folder ({folder})")
        working_dir = str(folder)
    result: dict[str, Any] = {"working_dir": working_dir, "excludes": list(env.excludes)}
    if env.env_vars:
        result["env_vars"] = dict(env.env_vars)
    if env.pip is not None:
        result["pip"] = list(env.pip)
    return result


def submission_id(spec: JobSpec) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{spec.name}-{stamp}-{secrets.token_hex(3)}"


def submit_kwargs(spec: JobSpec, overrides: list[str], config: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job`."""
    res = spec.resources
    return {
        "entrypoint": entrypoint_with_overrides(spec, overrides, config),
        "runtime_env": runtime_env(spec),
        "submission_id": submission_id(spec),
        "metadata": {"job_spec": spec.name, **spec.metadata},
        "entrypoint_num_cpus": res.entrypoint_num_cpus,
        "entrypoint_num_gpus": res.entrypoint_num_gpus,
        "entrypoint_memory": res.entrypoint_memory,
        "entrypoint_resources": dict(res.entrypoint_resources) or None,
    }


# --- talking to the cluster -----------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else the local dashboard."""
    return plain_address(
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


@contextlib.contextmanager
def api_server_address(address: str) -> Iterator[None]:
    """Ray's client lets $RAY_API_SERVER_ADDRESS override its argument: make it say `address`."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(address: str | None, token: str | None):
    target = resolve_address(address)
    try:
        with api_server_address(target):
            return JobSubmissionClient(target, headers=auth_headers(token))
    except Exception as err:
        raise SubmitError(redact(f"cannot reach the Ray job server at {target}: {err}", token)) from None


def log(out: TextIO, message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=out, flush=True)


def unfinished_runs(client, spec: JobSpec) -> list[str]:
    """The submission ids of this spec's jobs that the cluster has not finished (pending or running)."""
    return sorted(job.submission_id or job.job_id for job in client.list_jobs()
                  if (job.metadata or {}).get("job_spec") == spec.name and not job.status.is_terminal())


def refuse_overlap(client, spec: JobSpec) -> None:
    """A spec's job never runs twice at once: two nightly SID drivers would redo the same round, publish
    the same versions and train the same runs (the cron guard lasts only while its submitter waits)."""
    running = unfinished_runs(client, spec)
    if running:
        raise SubmitError(f"job {spec.name} is still running on the cluster ({', '.join(running)}); not "
                          f"submitting another. Wait for it, or stop it: ray job stop {running[0]}")


def job_status(client, job_id: str, poll_s: float):
    """The job's status, asking again through a few failed requests (a dashboard restart, a dropped
    connection): the job goes on meanwhile, and a watcher that gave up would stop enforcing its timeout."""
    for attempt in range(STATUS_ATTEMPTS):
        try:
            return client.get_job_status(job_id)
        except Exception:
            if attempt == STATUS_ATTEMPTS - 1:
                raise
            time.sleep(min(60.0, poll_s * 2**attempt))


def wait_for_end(client, job_id: str, timeout_s: int | None, poll_s: float, out: TextIO) -> str:
    """Poll until the job is terminal, printing each status change; stop it past `timeout_s`."""
    started, last, stop_sent = time.monotonic(), None, False
    while True:
        status = job_status(client, job_id, poll_s)
        if status != last:
            log(out, f"{job_id}: {status.value}")
            last = status
        if status.is_terminal():
            return status.value
        if timeout_s and not stop_sent and time.monotonic() - started > timeout_s:
            log(out, f"{job_id}: still running after {timeout_s}s, stopping it")
            client.stop_job(job_id)
            stop_sent = True
        time.sleep(poll_s)


async def stream_logs(client, job_id: str, out: TextIO, token: str | None) -> None:
    redactor = StreamRedactor(token)
    try:
        async for chunk in client.tail_job_logs(job_id):
            out.write(redactor.feed(chunk))
            out.flush()
    finally:
        out.write(redactor.flush())
        out.flush()


def follow(client, job_id: str, timeout_s: int | None, poll_s: float, out: TextIO, token: str | None) -> str:
    """Stream the job's logs until it ends (stopping it past `timeout_s`); return its status."""
    try:
        asyncio.run(asyncio.wait_for(stream_logs(client, job_id, out, token), timeout_s))
    except asyncio.TimeoutError:
        log(out, f"{job_id}: still running after {timeout_s}s, stopping it")
        client.stop_job(job_id)
    return wait_for_end(client, job_id, None, poll_s, out)


def log_tail(client, job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(client.get_job_logs(job_id).rstrip("\n").splitlines()[-lines:])


EXIT_BY_STATUS = {"SUCCEEDED": EXIT_SUCCEEDED, "FAILED": EXIT_FAILED, "STOPPED": EXIT_STOPPED}


def submit_spec(
    spec: JobSpec,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    config: str | None = None,
    wait: bool = True,
    stream: bool = False,
    poll_s: float = 2.0,
    out: TextIO = sys.stdout,
) -> SubmitResult:
    """Submit `spec`, and (unless `wait` is False) wait for its end and report it."""
    kwargs = submit_kwargs(spec, overrides or [], config)
    check_factory_config(spec, overrides or [], config)
    token = find_token()
    client = connect(address, token)
    try:
        refuse_overlap(client, spec)
        job_id = client.submit_job(**kwargs)
    except SubmitError as err:
        raise SubmitError(redact(str(err), token)) from None
    except Exception as err:
        raise SubmitError(redact(f"the cluster refused job {spec.name}: {err}", token)) from None
    log(out, f"submitted {spec.name} as {job_id}: {kwargs['entrypoint']}")
    if not wait:
        return SubmitResult(job_id, "PENDING", EXIT_SUCCEEDED)
    try:
        if stream:
            status = follow(client, job_id, spec.timeout_s, poll_s, out, token)
        else:
            status = wait_for_end(client, job_id, spec.timeout_s, poll_s, out)
        if status != "SUCCEEDED" and not stream:
            tail = redact(log_tail(client, job_id), token)
            print(f"--- last {LOG_TAIL_LINES} lines of the logs of {job_id} ---\n{tail}", file=out, flush=True)
    except Exception as err:
        message = f"lost track of job {job_id} (it may still be running; `ray job status {job_id}`): {err}"
        raise SubmitError(redact(message, token)) from None
    return SubmitResult(job_id, status, EXIT_BY_STATUS.get(status, EXIT_FAILED))
