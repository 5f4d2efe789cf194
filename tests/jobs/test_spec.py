"""Job specs: the shipped file loads, and a bad spec fails with an error naming the job and key."""

from __future__ import annotations

import textwrap

import pytest

from jobs.schedule import cron_lines
from jobs.spec import DEFAULT_SPECS, SpecError, check_cron, get_spec, load_specs
from jobs.submit import entrypoint_with_overrides, resolve_address, submit_kwargs


def write_specs(tmp_path, text: str):
    path = tmp_path / "specs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD_JOB = """
jobs:
  - name: hello
    schedule: "*/15 1-5 * * 1,3"
    entrypoint: python -c "print(1)"
    runtime_env: {working_dir: ".", env_vars: {TOKENIZERS_PARALLELISM: "false"}}
    resources: {entrypoint_num_cpus: 0.5, entrypoint_resources: {a100_40g: 1}}
"""


def test_shipped_specs_load_with_the_scheduled_jobs():
    specs = load_specs(DEFAULT_SPECS)
    assert {"bootstrap", "nightly-sid", "weekly-eval"} <= set(specs)
    assert "--stage sid" in specs["nightly-sid"].entrypoint
    assert "--stage eval" in specs["weekly-eval"].entrypoint
    assert specs["nightly-sid"].schedule and specs["weekly-eval"].schedule
    for spec in specs.values():
        assert spec.entrypoint.startswith("python -m factory.run --stage ")
        assert {".git", "factory-data", ".venv"} <= set(spec.runtime_env.excludes)


def test_a_good_spec_gives_typed_values(tmp_path):
    spec = load_specs(write_specs(tmp_path, GOOD_JOB))["hello"]
    assert spec.resources.entrypoint_num_cpus == 0.5
    assert spec.resources.entrypoint_resources == {"a100_40g": 1.0}
    assert spec.runtime_env.working_dir == "."


@pytest.mark.parametrize(
    "change, expected",
    [
        (("entrypoint_num_cpus: 0.5", "entrypoint_num_cpu: 0.5"),
         "job hello: resources.entrypoint_num_cpu: unknown key"),
        (("*/15 1-5 * * 1,3", "0 25 * * *"), "job hello: schedule: cron hour field '25'"),
        (("*/15 1-5 * * 1,3", "0 2 * *"), "needs 5 fields"),
        (("TOKENIZERS_PARALLELISM", "HF_TOKEN"), "'HF_TOKEN' looks like a secret"),
        (('"false"', '"AKIAABCDEFGHIJKLMNOP"'), "looks like a secret"),
        (("TOKENIZERS_PARALLELISM", "OPENAI_KEY"), "'OPENAI_KEY' looks like a secret"),
        (("TOKENIZERS_PARALLELISM", "APIKEY"), "'APIKEY' looks like a secret"),
        (("TOKENIZERS_PARALLELISM", "GH_PAT"), "'GH_PAT' looks like a secret"),
        (('"false"', '"ghp_0123456789abcdefghijABCDEFGHIJ"'), "looks like a secret"),
        (('"false"', '"sk-proj-0123456789abcdefghijKLMN"'), "looks like a secret"),
        (('"false"', '"https://rev:pw@studio.internal"'), "looks like a secret"),
        (('python -c "print(1)"', 'HF_TOKEN=hf_0123456789abcdefghijKLMN python -c "print(1)"'),
         "job hello: entrypoint: holds what looks like a secret"),
        (('python -c "print(1)"', 'DB_PASSWORD=x python -c "print(1)"'),
         "entrypoint: holds what looks like a secret"),
        (('python -c "print(1)"', "python -m factory.run --set ray.address=http://admin:pw1@head:8265"),
         "entrypoint: holds what looks like a secret"),
        (('working_dir: "."', 'working_dir: "https://user:pw1@git.internal/wd.zip"'),
         "runtime_env.working_dir: holds what looks like a secret"),
        (("    resources:", "    metadata: {owner_token: abc}\n    resources:"),
         "metadata: 'owner_token' looks like a secret"),
        (("entrypoint_num_cpus: 0.5", "entrypoint_num_cpus: -1"), "greater than or equal to 0"),
        (("name: hello", "name: Hello_World"), "job Hello_World: name: String should match pattern"),
        (('    entrypoint: python -c "print(1)"\n', ""), "job hello: entrypoint: required field is missing"),
    ],
)
def test_a_bad_spec_names_the_job_and_the_key(tmp_path, change, expected):
    old, new = change
    assert old in GOOD_JOB
    with pytest.raises(SpecError) as err:
        load_specs(write_specs(tmp_path, GOOD_JOB.replace(old, new)))
    assert expected in str(err.value)


def test_an_override_or_a_job_server_address_with_a_secret_is_refused_without_repeating_it(monkeypatch):
    spec = load_specs(DEFAULT_SPECS)["nightly-sid"]
    for override in ["ray.address=http://admin:pw1secret@head:8265", "plan.instructions=hf_0123456789abcdefghijKLMN"]:
        with pytest.raises(SpecError) as caught:
            entrypoint_with_overrides(spec, [override])
        assert f"--set {override.split('=')[0]} holds what looks like a secret" in str(caught.value)
        assert "pw1secret" not in str(caught.value) and "hf_0123" not in str(caught.value)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://admin:pw1secret@head:8265")
    with pytest.raises(SpecError) as caught:
        resolve_address(None)
    assert "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS) has a user name or password" in str(caught.value)
    assert "pw1secret" not in str(caught.value)
    with pytest.raises(SpecError, match="has a user name or password"):
        cron_lines({"nightly-sid": spec}, address="http://admin:pw1secret@127.0.0.1:8265")
    assert resolve_address("http://head:8265") == "http://head:8265"


def test_repeated_names_and_missing_files_are_errors(tmp_path):
    doubled = GOOD_JOB + GOOD_JOB.split("jobs:\n", 1)[1]
    with pytest.raises(SpecError, match="repeated: hello"):
        load_specs(write_specs(tmp_path, doubled))
    with pytest.raises(SpecError, match="not found"):
        load_specs(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="no job named 'nope'; known: hello"):
        get_spec(load_specs(write_specs(tmp_path, GOOD_JOB)), "nope")


@pytest.mark.parametrize("expression", ["0 2 * * *", "*/5 * * * *", "0 0 1,15 * 0-6", "30 4 * 1-12/2 7"])
def test_valid_cron_expressions(expression):
    check_cron(expression)


@pytest.mark.parametrize("expression", ["60 * * * *", "* * 0 * *", "*/0 * * * *", "5-1 * * * *", "@daily", "a * * * *"])
def test_invalid_cron_expressions(expression):
    with pytest.raises(ValueError):
        check_cron(expression)


def test_overrides_are_appended_shell_quoted(tmp_path):
    spec = load_specs(write_specs(tmp_path, GOOD_JOB))["hello"]
    line = entrypoint_with_overrides(spec, ["storage.root=s3://b/p", "plan.generator=my gen"])
    assert line.endswith(" --set storage.root=s3://b/p --set 'plan.generator=my gen'")
    with pytest.raises(SpecError, match="key=value"):
        entrypoint_with_overrides(spec, ["no-equals-sign"])


def test_config_replaces_the_specs_config_or_is_added():
    from jobs.spec import get_spec

    nightly = get_spec(load_specs(), "nightly-sid")
    line = entrypoint_with_overrides(nightly, ["sid.rounds=2"], config="configs/staging.yaml")
    assert line == "python -m factory.run --stage sid --config configs/staging.yaml --set sid.rounds=2"
    bare = nightly.model_copy(update={"entrypoint": "python -m factory.run --stage eval"})
    line = entrypoint_with_overrides(bare, [], config="my config.yaml")
    assert line.endswith("--stage eval --config 'my config.yaml'")


def test_submit_kwargs_resolve_the_working_dir(tmp_path, monkeypatch):
    spec = load_specs(write_specs(tmp_path, GOOD_JOB))["hello"]
    monkeypatch.chdir(tmp_path)
    kwargs = submit_kwargs(spec, [])
    assert kwargs["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert kwargs["entrypoint_resources"] == {"a100_40g": 1.0}
    assert kwargs["submission_id"].startswith("hello-")
    assert kwargs["metadata"]["job_spec"] == "hello"
    monkeypatch.chdir(tmp_path.parent)
    missing = spec.model_copy(update={"runtime_env": spec.runtime_env.model_copy(update={"working_dir": "nowhere"})})
    with pytest.raises(SpecError, match="is not a folder"):
        submit_kwargs(missing, [])
