"""The Kubernetes path: every manifest is valid for the KubeRay and Kubernetes versions docs/cluster.md
supports, the RayJob's entrypoint is the whole Ray job once KubeRay has composed the submitter's
command, the CronJob's wait ends with the RayJob's result, and the sizes agree with cluster.yaml,
configs/production.yaml and the EC2 types' allocatable capacity."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from factory.framework.config import load_config
from jobs.spec import load_specs
from tests.jobs.conftest import HEAD_RESOURCES

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "jobs" / "k8s"
CRDS = Path(__file__).parent / "crds"
KUBERAY_VERSIONS = ("v1.6.2", "v1.7.0")
KUBERNETES_VERSIONS = ("1.33.0", "1.34.0", "1.35.0")
PROJECT_IMAGE = "REGISTRY/cafe-factory:TAG"
GROUP_TO_NODE_TYPE = {"gpu-a100": "gpu_a100", "gpu-llm": "gpu_llm"}
GiB = 2**30
MiB = 2**20


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (rayjob,) = documents("nightly-sid-rayjob.yaml")
    return rayjob


@pytest.fixture(scope="module")
def cronjob_documents() -> dict[str, dict]:
    """By kind; the two ServiceAccounts by name."""
    return {doc["metadata"]["name"] if doc["kind"] == "ServiceAccount" else doc["kind"]: doc
            for doc in documents("nightly-sid-cronjob.yaml")}


# --- schemas ------------------------------------------------------------------------------------


def closed(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as `kubectl create` (field validation Strict) does."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@functools.cache
def rayjob_schema(tag: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.3 MB of YAML
    crd = yaml.load(gzip.decompress((CRDS / f"ray.io_rayjobs-{tag}.yaml.gz").read_bytes()), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return closed(version["schema"]["openAPIV3Schema"])


def schema_errors(document: dict, schema: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(document)]


@pytest.mark.parametrize("tag", KUBERAY_VERSIONS)
def test_rayjob_is_valid_for_each_supported_kuberay(rayjob, tag):
    assert schema_errors(rayjob, rayjob_schema(tag)) == []


@pytest.mark.parametrize("tag", KUBERAY_VERSIONS)
def test_the_crd_check_refuses_what_the_operator_would(rayjob, tag):
    schema = rayjob_schema(tag)
    misspelt = copy.deepcopy(rayjob)
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    numbers = copy.deepcopy(rayjob)
    numbers["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["resources"] = {"a100_40g": 8}  # strings only
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(misspelt, schema))
    assert any("a100_40g" in e for e in schema_errors(numbers, schema))


def pod_templates(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def builtin_objects(rayjob: dict, cronjob_documents: dict[str, dict]) -> list[dict]:
    """The CronJob's documents, and the RayJob's pod templates as the PodTemplates they become."""
    templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{n}"}, "template": t}
                 for n, t in enumerate(pod_templates(rayjob))]
    return [*cronjob_documents.values(), *templates]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_are_valid_for_each_supported_kubernetes(rayjob, cronjob_documents, version):
    for document in builtin_objects(rayjob, cronjob_documents):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_builtin_check_refuses_an_unknown_field(cronjob_documents):
    broken = copy.deepcopy(cronjob_documents["CronJob"])
    broken["spec"]["jobTemplate"]["spec"]["activeDeadline"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def images(rayjob: dict, cronjob_documents: dict[str, dict]) -> list[str]:
    pods = [*pod_templates(rayjob), cronjob_documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]]
    return [container["image"] for pod in pods for container in pod["spec"]["containers"]]


def test_images_are_the_marked_placeholder_or_pinned_with_a_registry(rayjob, cronjob_documents):
    for image in images(rayjob, cronjob_documents):
        if image == PROJECT_IMAGE:
            continue
        name, _, tag = image.rpartition(":")
        assert "/" in name, f"{image}: name the registry or namespace"
        assert tag and tag != "latest" and tag[0].isdigit(), f"{image}: pin a version tag"
    assert PROJECT_IMAGE in images(rayjob, cronjob_documents)
    (account,) = [doc for doc in documents("nightly-sid-cronjob.yaml") if doc["metadata"]["name"] == "cafe-factory"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        "arn:aws:iam::ACCOUNT_ID:role/cafe-factory-worker"


# --- the submitter's command, composed as KubeRay does ------------------------------------------


def go_quote(text: str) -> str:
    """strconv.Quote for the ASCII text used here: JSON string quoting."""
    return json.dumps(text)


def kuberay_submitter_command(rayjob: dict, address: str, job_id: str) -> list[str]:
    """The submitter container's command in K8sJobMode, as KubeRay v1.7.0 builds it:
    BuildJobSubmitCommand (ray-operator/controllers/ray/common/job.go) joined with spaces into one
    `bash -ce` argument (configureSubmitterContainer in rayjob_controller.go). v1.6 differs only in
    the health wait."""
    spec = rayjob["spec"]
    health = (f"python -c \"import urllib.request; r=urllib.request.urlopen('{address}/api/gcs_healthz', "
              "timeout=10); exit(0 if b'success' in r.read() else 1)\"")
    words = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
             go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";", "sleep", "2", ";",
             "done", ";"]
    words += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    words += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), sort_keys=True, separators=(",", ":"))
        words += ["--runtime-env-json", go_quote(runtime_env)]
    words += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus", 0) > 0:
        words += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    if spec.get("entrypointResources"):
        words += ["--entrypoint-resources", go_quote(spec["entrypointResources"])]
    words += ["--", spec["entrypoint"].strip(), ";", "fi", ";", "ray", "job", "logs", "--address", address,
              "--follow", job_id]
    return ["/bin/bash", "-ce", "--", " ".join(words)]


def fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


RECORD = """import json, os, sys
with open(os.environ["CALLS"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""


def run_submitter(rayjob: dict, tmp_path: Path) -> list[list[str]]:
    """Run the composed command under bash with a `ray` and a `python` that record their argv
    (`ray job status` answers "no such job", as before the first submission)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "ray", RECORD + "sys.exit(1 if sys.argv[1:3] == ['job', 'status'] else 0)\n")
    fake_tool(bin_dir, "python", RECORD)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    command = kuberay_submitter_command(rayjob, "http://nightly-sid-head-svc.cafe-factory:8265", "nightly-sid-x7k2p")
    subprocess.run(command, env=env, cwd=tmp_path, check=True, timeout=60)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    for call in recorded:
        if call[:2] == ["ray", "job"]:
            ray_job_params(call)  # the fake `ray` takes any argv: Ray's own parser must take it too
    return recorded


def ray_job_params(call: list[str]) -> dict:
    """A recorded `ray job SUBCOMMAND ...` argv parsed by Ray's own click command: an option Ray does not
    know, a missing argument or a value of the wrong type raises click's UsageError."""
    from ray.dashboard.modules.job.cli import job_cli_group

    assert call[:2] == ["ray", "job"], call
    return job_cli_group.commands[call[2]].make_context(call[2], call[3:]).params


def submitted(calls: list[list[str]]) -> dict:
    (submit,) = [call for call in calls if call[:3] == ["ray", "job", "submit"]]
    return ray_job_params(submit)


def submitted_entrypoint(calls: list[list[str]]) -> list[str]:
    return list(submitted(calls)["entrypoint"])


def test_the_whole_pipeline_command_is_the_ray_job(rayjob, tmp_path):
    spec = load_specs()["nightly-sid"]
    calls = run_submitter(rayjob, tmp_path)
    assert submitted_entrypoint(calls) == shlex.split(spec.entrypoint)
    assert [call for call in calls if call[0] == "python" and call[1] != "-c"] == []  # nothing ran beside it
    assert calls[-1][:4] == ["ray", "job", "logs", "--address"]
    submit = submitted(calls)
    assert submit["submission_id"] == "nightly-sid-x7k2p" and submit["no_wait"] is True
    assert json.loads(submit["entrypoint_resources"]) == spec.resources.entrypoint_resources
    runtime_env = json.loads(submit["runtime_env_json"])
    assert runtime_env["working_dir"] == "/home/ray/cafe-factory"
    assert runtime_env["env_vars"] == spec.runtime_env.env_vars


def test_a_cd_and_entrypoint_would_run_the_pipeline_in_the_submitter_pod(rayjob, tmp_path):
    chained = copy.deepcopy(rayjob)
    chained["spec"]["entrypoint"] = "cd /home/ray/cafe-factory && " + rayjob["spec"]["entrypoint"]
    calls = run_submitter(chained, tmp_path)
    assert submitted_entrypoint(calls) == ["cd", "/home/ray/cafe-factory"]
    assert ["python", "-m", "factory.run"] in [call[:3] for call in calls]


def test_the_config_path_resolves_in_the_jobs_working_dir(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    words = shlex.split(rayjob["spec"]["entrypoint"])
    config = words[words.index("--config") + 1]
    assert (REPO / config).is_file() and config.split("/")[0] not in runtime_env["excludes"]
    assert rayjob["spec"]["activeDeadlineSeconds"] == load_specs()["nightly-sid"].timeout_s


# --- the CronJob's wait -------------------------------------------------------------------------


# kubectl as the CronJob's script uses it: the verbs and flags it knows (an unknown flag is kubectl's
# error), and `get -o jsonpath=` read from a RayJob whose status holds the scripted state: fields of
# KubeRay's RayJobStatus, a template key that names no field prints nothing (kubectl's
# --allow-missing-template-keys), so a misspelt field leaves the wait without a status.
FAKE_KUBECTL = """import json, os, re, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as log:
    log.write(json.dumps(args) + "\\n")
FLAGS = {"delete": {"-l", "--ignore-not-found", "--wait=false"}, "create": {"-f", "-o"}, "get": {"-o"}}
verb, words = args[0], args[1:]
for word in words:
    if word.startswith("-") and word.split("=")[0] not in {f.split("=")[0] for f in FLAGS.get(verb, ())}:
        sys.exit(f"error: unknown flag: {word}")
if verb == "create":
    assert words[words.index("-o") + 1] == "name", words
    print("rayjob.ray.io/nightly-sid-x7k2p")
elif verb == "get":
    assert words[0] == "rayjob.ray.io/nightly-sid-x7k2p" and words[1] == "-o", words
    states = Path(os.environ["STATES"])
    lines = states.read_text().splitlines()
    if "{.status.message}" != words[2].removeprefix("jsonpath="):
        if len(lines) > 1:
            states.write_text("\\n".join(lines[1:]) + "\\n")
        if lines[0] == "ERROR":
            sys.exit("The connection to the server was refused")
    deployment, job, reason = (lines[0].split("/") + ["", ""])[:3]
    status = {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason,
              "message": "the job's message", "jobId": "nightly-sid-x7k2p-abcde"}
    rayjob = {"kind": "RayJob", "status": {k: v for k, v in status.items() if v}}

    def field(path):
        value = rayjob
        for name in path.strip(".").split("."):
            value = value.get(name, "") if isinstance(value, dict) else ""
        return str(value)

    print(re.sub(r"\\{([^}]*)\\}", lambda m: field(m[1]), words[2].removeprefix("jsonpath=")), end="")
"""


def run_wait(cronjob_documents: dict[str, dict], tmp_path: Path, states: list[str], wait_s: int = 60):
    """The CronJob's script under bash with a `kubectl` that answers the RayJob's status from `states`
    (`ERROR`: the call fails), repeating the last one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "kubectl", FAKE_KUBECTL)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    container = cronjob_documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "POLL_S": "0.05",
           "WAIT_S": str(wait_s), "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "STATES": str(tmp_path / "states")}
    done = subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    return done.returncode, done.stdout, calls


def test_the_wait_retries_a_failed_get_and_succeeds_with_the_ray_job(cronjob_documents, tmp_path):
    states = ["/", "Initializing//", "ERROR", "ERROR", "Running/RUNNING/", "Complete/SUCCEEDED/"]
    code, out, calls = run_wait(cronjob_documents, tmp_path, states)
    assert code == 0 and "Complete/SUCCEEDED" in out and out.count("failed, retrying") == 2
    assert calls[0][:4] == ["delete", "rayjobs", "-l", "cafe-factory/job=nightly-sid"]  # last night's first
    assert calls[1][:3] == ["create", "-f", "/manifests/rayjob.yaml"]
    assert sum(call[0] == "get" for call in calls) == len(states)


@pytest.mark.parametrize("final", [
    "Failed//DeadlineExceeded",              # activeDeadlineSeconds: KubeRay leaves jobStatus unset
    "Failed//PreRunningDeadlineExceeded",    # the head never scheduled
    "Complete/FAILED/AppFailed",
    "Complete/STOPPED/",
    "ValidationFailed//ValidationFailed",
])
def test_the_wait_fails_with_the_ray_job(cronjob_documents, tmp_path, final):
    code, out, _ = run_wait(cronjob_documents, tmp_path, ["Initializing//", final])
    assert code == 1 and f"ended: {final}" in out and "the job's message" in out


def test_the_wait_gives_up_at_its_own_deadline(cronjob_documents, tmp_path):
    code, out, _ = run_wait(cronjob_documents, tmp_path, ["Initializing//"], wait_s=4)  # room for a loaded machine
    assert code == 1 and "still not finished after 4s (last status: Initializing//)" in out


def test_the_deadlines_nest_and_the_role_has_the_verbs_the_script_uses(rayjob, cronjob_documents, tmp_path):
    job = cronjob_documents["CronJob"]["spec"]["jobTemplate"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    wait_s = int({e["name"]: e["value"] for e in container["env"]}["WAIT_S"])
    assert rayjob["spec"]["activeDeadlineSeconds"] < wait_s < job["activeDeadlineSeconds"]
    _, _, calls = run_wait(cronjob_documents, tmp_path, ["Complete/SUCCEEDED/"])
    used = {call[0] for call in calls} | {"list" for call in calls if call[0] == "delete" and "-l" in call}
    (rule,) = cronjob_documents["Role"]["rules"]
    assert set(rule["verbs"]) == used == {"create", "get", "list", "delete"}
    assert rule["resources"] == ["rayjobs"] and rule["apiGroups"] == ["ray.io"]


# --- sizes: cluster.yaml, production.yaml, the RayJob and the instance types -------------------

# Nominal capacity of the EC2 types (AWS instance type pages) and EKS max-pods (the EKS AMI's
# eni-max-pods.txt).
INSTANCES = {
    "m6i.2xlarge": {"cpu": 8, "memory": 32 * GiB, "max_pods": 58},
    "p4d.24xlarge": {"cpu": 96, "memory": 1152 * GiB, "max_pods": 737},
    "p4de.24xlarge": {"cpu": 96, "memory": 1152 * GiB, "max_pods": 737},
}
DAEMONSETS = {"cpu": 0.5, "memory": 1 * GiB}  # aws-node, kube-proxy, EBS CSI, NVIDIA device plugin


def eks_allocatable(cpu: int, memory: int, max_pods: int) -> tuple[float, int]:
    """Allocatable CPU and memory with the EKS AMI's kube-reserved and the kubelet's 100 MiB eviction."""
    reserved_cpu = 0.06 + 0.01 * (cpu > 1) + 0.005 * min(max(cpu - 2, 0), 2) + 0.0025 * max(cpu - 4, 0)
    reserved_memory = (255 + 11 * max_pods) * MiB + 100 * MiB
    return cpu - reserved_cpu, memory - reserved_memory


def quantity(text: str) -> float:
    units = {"Gi": GiB, "Mi": MiB, "m": 0.001}
    for suffix, factor in units.items():
        if str(text).endswith(suffix):
            return float(str(text)[: -len(suffix)]) * factor
    return float(text)


def groups(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def test_every_pod_fits_its_instance_types_allocatable_capacity(rayjob):
    for name, group in groups(rayjob).items():
        pod = group["template"]["spec"]
        instance = INSTANCES[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
        cpu, memory = eks_allocatable(**instance)
        requests = pod["containers"][0]["resources"]["requests"]
        assert quantity(requests["cpu"]) <= cpu - DAEMONSETS["cpu"], name
        assert quantity(requests["memory"]) <= memory - DAEMONSETS["memory"], name


def ray_resources(group: dict) -> dict[str, float]:
    """What Ray on a pod of the group offers: num-cpus or the CPU limit, the GPUs, the custom resources."""
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    offered = {"CPU": quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))}
    if "nvidia.com/gpu" in limits:
        offered["GPU"] = quantity(limits["nvidia.com/gpu"])
    offered.update({name: float(value) for name, value in group.get("resources", {}).items()})
    return offered


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_and_the_rayjob_name_the_same_node_types_and_resources(rayjob, cluster):
    node_types = cluster["available_node_types"]
    names = {"head": cluster["head_node_type"], **GROUP_TO_NODE_TYPE}
    for group_name, group in groups(rayjob).items():
        node = node_types[names[group_name]]
        instance = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert node["node_config"]["InstanceType"].split()[0] == instance, group_name
        assert ray_resources(group) == {k: float(v) for k, v in node["resources"].items()}, group_name
        if group_name != "head":
            assert group["maxReplicas"] == node["max_workers"] and group["minReplicas"] == node["min_workers"]


def pools(config) -> dict[str, dict]:
    """The Ray resources one actor (or training worker) of each production pool asks for."""
    asks = {name: getattr(config, name).ray_options()
            for name in ("references", "generate", "filter", "dialogue", "eval")}
    for name in ("train", "promptnet"):
        settings = getattr(config, name)
        asks[name] = {"num_gpus": 1.0 if settings.use_gpu else 0.0, "resources": dict(settings.resources_per_worker),
                      "memory": settings.memory_per_worker}
    return asks


def pinned_node_type(ask: dict, node_types: dict[str, dict]) -> str | None:
    wanted = set(ask.get("resources", {}))
    names = [name for name, node in node_types.items() if wanted and wanted <= set(node["resources"])]
    return names[0] if len(names) == 1 else None


@pytest.fixture(scope="module")
def production():
    return load_config(REPO / "configs" / "production.yaml")


def test_every_production_pool_fits_the_node_type_its_resources_pin_it_to(cluster, production):
    node_types = cluster["available_node_types"]
    for name, ask in pools(production).items():
        node_type = pinned_node_type(ask, node_types)
        assert node_type is not None, f"{name}: its custom resources {ask.get('resources')} pin it to no one node type"
        node = node_types[node_type]
        assert ask["num_gpus"] <= node["resources"].get("GPU", 0), name
        for resource, amount in ask["resources"].items():
            assert amount <= node["resources"][resource], name


def test_a_node_full_of_a_pools_actors_fits_in_its_ray_memory(rayjob, cluster, production):
    """As many actors as the node's GPUs hold, each reserving its memory, within the memory Ray offers on
    the group's pod: the container limit less Ray's default object store (30%)."""
    workers = {name: group for name, group in groups(rayjob).items() if name != "head"}
    limits = {GROUP_TO_NODE_TYPE[name]: quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                                 ["memory"]) for name, group in workers.items()}
    node_types = cluster["available_node_types"]
    for name, ask in pools(production).items():
        node_type = pinned_node_type(ask, node_types)
        per_node = int(node_types[node_type]["resources"]["GPU"] // ask["num_gpus"])
        assert ask.get("memory", 0) > 0, f"{name} reserves no memory"
        assert per_node * ask["memory"] <= 0.7 * limits[node_type], name
    assert 0 < production.publish.task_memory


def test_job_drivers_run_only_on_the_head(rayjob, cluster):
    """Every job's driver asks for `job_driver`, which only the head offers, so losing a worker node
    never takes a driver with it (docs/reliability.md, "Node loss")."""
    assert {name: spec.resources.entrypoint_resources for name, spec in load_specs().items()} == \
        {name: {"job_driver": 1.0} for name in load_specs()}
    offering = {name for name, node in cluster["available_node_types"].items() if "job_driver" in node["resources"]}
    assert offering == {cluster["head_node_type"]}
    assert [name for name, group in groups(rayjob).items() if "job_driver" in group.get("resources", {})] == ["head"]
    assert json.loads(rayjob["spec"]["entrypointResources"]) == {"job_driver": 1}
    assert HEAD_RESOURCES["job_driver"] >= 1  # the staging and test heads offer it as well
