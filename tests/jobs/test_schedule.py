"""Schedule wiring: cron.txt and the Kubernetes manifests agree with jobs/specs.yaml."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from jobs.schedule import cron_lines
from jobs.spec import load_specs

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "jobs" / "k8s"


def test_cron_txt_is_what_the_generator_prints():
    printed = subprocess.run(
        [sys.executable, "-m", "jobs", "cron"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert (REPO / "jobs" / "cron.txt").read_text() == printed, "regenerate: python -m jobs cron > jobs/cron.txt"


def test_one_cron_line_per_scheduled_job():
    specs = load_specs()
    lines = [line for line in cron_lines(specs) if line and not line.startswith("#") and "=" not in line.split()[0]]
    scheduled = {name: spec for name, spec in specs.items() if spec.schedule}
    assert len(lines) == len(scheduled)
    for line in lines:
        name = re.search(r"-m jobs submit (\S+)", line).group(1)
        assert line.startswith(scheduled[name].schedule + " ")
        assert f"flock -n /tmp/cafe-jobs-{name}.lock" in line and "2>&1" in line


def test_plain_cron_lines_are_valid_shell_with_escaped_percent(tmp_path):
    specs = load_specs()
    project = str(tmp_path / "odd 100% dir")
    lines = cron_lines(specs, project_dir=project, python="/opt/venv/bin/python", container=None)
    line = next(line for line in lines if "nightly-sid" in line)
    assert "%" not in line.replace("\\%", "")
    command = line.split(" ", 5)[5].replace("\\%", "%")
    words = shlex.split(command)
    assert words[:2] == ["cd", project]
    assert words[words.index("-m") + 1 : words.index("-m") + 4] == ["jobs", "submit", "nightly-sid"]


def k8s_documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def test_rayjob_runs_the_nightly_sid_entrypoint_and_cleans_up():
    spec = load_specs()["nightly-sid"]
    (rayjob,) = k8s_documents("nightly-sid-rayjob.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    body = rayjob["spec"]
    assert body["entrypoint"] == spec.entrypoint  # one command: KubeRay pastes it unquoted after `--`
    assert body["shutdownAfterJobFinishes"] is True
    assert body["activeDeadlineSeconds"] == spec.timeout_s
    assert yaml.safe_load(body["runtimeEnvYAML"])["env_vars"] == spec.runtime_env.env_vars
    groups = {group["groupName"]: group for group in body["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-a100", "gpu-llm"}
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 4


def test_cronjob_has_the_spec_schedule_and_waits_for_the_rayjob():
    spec = load_specs()["nightly-sid"]
    documents = {doc["kind"]: doc for doc in k8s_documents("nightly-sid-cronjob.yaml")}
    cronjob = documents["CronJob"]
    assert cronjob["spec"]["schedule"] == spec.schedule
    assert cronjob["spec"]["timeZone"] == "Etc/UTC" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["RAYJOB_MANIFEST"] == "/manifests/rayjob.yaml"  # the wait itself: tests/jobs/test_k8s_manifests.py
    assert pod["volumes"][0]["configMap"]["name"] == "nightly-sid-rayjob"


def test_no_inline_credentials_in_the_wiring():
    for path in [*K8S.glob("*.yaml"), REPO / "jobs" / "specs.yaml", REPO / "jobs" / "cron.txt"]:
        text = path.read_text()
        assert not re.search(r"aws_(access_key_id|secret_access_key|session_token)", text, re.I), path
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
