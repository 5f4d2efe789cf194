"""Jobs on a real local Ray head with token auth: `python -m jobs submit` and `ray job submit`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.jobs.conftest import BIN, REPO

pytestmark = pytest.mark.slow


def spec_file(tmp_path: Path, name: str, entrypoint: str, working_dir: Path, **more) -> Path:
    job = {
        "name": name,
        "entrypoint": entrypoint,
        "runtime_env": {"working_dir": str(working_dir), "env_vars": {"GREETING": "hello-from-env"}},
        "resources": {"entrypoint_num_cpus": 0.5},
        **more,
    }
    path = tmp_path / "specs.yaml"
    path.write_text(yaml.safe_dump({"jobs": [job]}))
    return path


def submit(head, specs: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jobs", "--specs", str(specs), "submit", name,
               "--address", head.url, "--poll-s", "0.5", *extra]
    return subprocess.run(command, cwd=REPO, env=env or head.client_env(), capture_output=True, text=True, timeout=300)


def job_id(output: str) -> str:
    return re.search(r"submitted \S+ as (\S+):", output).group(1)


def test_submit_follows_the_logs_and_succeeds_with_the_working_dir_shipped(ray_head, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.py").write_text("import os, sys\nprint('hello', os.environ['GREETING'], sys.argv[1:])\n")
    specs = spec_file(tmp_path, "hello", "python hello.py", work)
    done = submit(ray_head, specs, "hello", "--follow", "--set", "storage.root=/x y")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "SUCCEEDED" in done.stdout
    assert ray_head.token not in output
    printed = "hello hello-from-env ['--set', 'storage.root=/x y']"
    assert printed in done.stdout  # streamed while the job ran
    assert printed in ray_head.client().get_job_logs(job_id(done.stdout))


def test_a_failing_job_ends_failed_with_its_error_printed(ray_head, tmp_path):
    specs = spec_file(tmp_path, "broken", "python -c \"raise SystemExit('boom: the input is bad')\"", tmp_path)
    done = submit(ray_head, specs, "broken")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout
    assert "boom: the input is bad" in done.stdout  # the log tail
    assert ray_head.client().get_job_status(job_id(done.stdout)).value == "FAILED"
    assert ray_head.token not in done.stdout + done.stderr


def test_a_job_past_its_timeout_is_stopped(ray_head, tmp_path):
    specs = spec_file(tmp_path, "slow", "python -c \"import time; time.sleep(300)\"", tmp_path, timeout_s=2)
    done = submit(ray_head, specs, "slow")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "still running after 2s, stopping it" in done.stdout
    assert ray_head.client().get_job_status(job_id(done.stdout)).value == "STOPPED"


def test_a_spec_whose_job_still_runs_is_not_submitted_again(ray_head, tmp_path):
    """Two nightly SID drivers at once would redo one round and write the same versions and runs."""
    specs = spec_file(tmp_path, "nightly", "python -c \"import time; time.sleep(300)\"", tmp_path)
    first = submit(ray_head, specs, "nightly", "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr
    running = job_id(first.stdout)
    try:
        second = submit(ray_head, specs, "nightly")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"job nightly is still running on the cluster ({running}); not submitting another" in second.stderr
        assert [job.submission_id for job in ray_head.client().list_jobs()
                if (job.metadata or {}).get("job_spec") == "nightly"] == [running]
    finally:
        ray_head.client().stop_job(running)


def test_without_the_token_the_head_refuses(ray_head, tmp_path):
    specs = spec_file(tmp_path, "hello", "python -c 1", tmp_path)
    env = ray_head.client_env(RAY_AUTH_TOKEN_PATH=None, HOME=str(tmp_path))
    done = submit(ray_head, specs, "hello", env=env)
    assert done.returncode == 2
    assert re.search(r"error: .*(Authentication|Unauthorized)", done.stderr), done.stderr


# The stages a `ray job submit` of the factory runs here, in order, on the embedded demo: the
# working dir ships and the factory runs from it. Whole nights (bootstrap, SID twice, eval) are
# submitted through Ray's job API by tests/jobs/test_staging_rehearsal.py.
FACTORY_STAGES = [("references", "references/demo/_complete.json"), ("plan", "runs/demo/plan.parquet")]
TINY_LLAMA = "./factory-data/models/tiny-llama"  # the demo's SmolLM2 drafts English, but slowly: not needed here


def ray_job_submit(head, *entrypoint: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", "submit", "--address", head.url, "--working-dir", str(REPO),
               "--", *entrypoint]
    return subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=900)


def submission_id(done: subprocess.CompletedProcess) -> str:
    return re.search(r"(raysubmit_\w+)", done.stdout + done.stderr).group(1)


def test_ray_job_submit_runs_the_factory_from_the_shipped_working_dir(ray_head, tmp_path):
    root = tmp_path / "store"
    for stage, written in FACTORY_STAGES:
        done = ray_job_submit(ray_head, "python", "-m", "factory.run", "--stage", stage, "--set",
                              f"storage.root={root}", "--set", f"dialogue.model={TINY_LLAMA}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert ray_head.client().get_job_status(submission_id(done)).value == "SUCCEEDED"
        assert (root / written).exists(), f"{stage} wrote nothing at {root / written}"


def test_ray_job_submit_with_a_bad_config_fails_with_the_error_in_the_logs(ray_head, tmp_path):
    done = ray_job_submit(ray_head, "python", "-m", "factory.run", "--stage", "plan",
                          "--set", f"storage.root={tmp_path}", "--set", "plan.unit_size=-1")
    assert done.returncode != 0
    submission = submission_id(done)
    assert ray_head.client().get_job_status(submission).value == "FAILED"
    logs = ray_head.client().get_job_logs(submission)
    assert "plan.unit_size" in logs and "greater than or equal to 1" in logs
