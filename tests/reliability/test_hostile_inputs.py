"""Hostile input at every command line: names that try to leave their folder, numbers out of range,
malformed `--set`, `--threshold` and files, damaged manifests.

Each case runs a CLI's `main(argv)` in this process against one published tiny version (built once
per module, no Ray) and asserts the exit code, a message fragment that names the problem, no
traceback, no new manifest anywhere and not one file written or removed under the storage root's
parent folder or in the current folder. Property-based tests (hypothesis) then throw random names,
`--set` values and `--threshold` strings at the same commands.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factory.run
import factory.versions
import jobs.__main__
from factory.dataset.manifest import VersionSpec
from factory.dataset.publisher import publish_samples
from factory.framework.config import FactoryConfig, demo_config_path
from factory.framework.layout import BadName, check_name
from factory.framework.storage import LocalStorage
from factory.rethreshold import ThresholdError, parse_thresholds
from tests.factory.conftest import make_samples

REPO = Path(__file__).resolve().parents[2]
LONG = "x" * 300
# Names that break the rule (none starts with '-': argparse would read those as options)
BAD_NAMES = ["../x", "x/../../evil2", "../../evilds", "a/b", "", LONG, ".", "..", ".hidden", "a..b", "a\x00b",
             "a\\b", "/abs", "a b", "é", "v1\n", "~root", "a:b", "$HOME", "*"]


# --- the published version every case acts on ------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A storage root holding `demo/v1` (10 samples), `demo/v2` (4) and a `broken` dataset with one
    good version, one manifest that is not JSON, one without `shards` and one that lists a shard of
    another dataset; a `nested` dataset whose one manifest nests too deeply for json; a run config file on it."""
    base = tmp_path_factory.mktemp("hostile")
    storage = LocalStorage(base / "root")
    publish(storage, "demo", "v1", make_samples(10))
    publish(storage, "demo", "v2", make_samples(4, start=100))
    publish(storage, "broken", "good", make_samples(3))
    storage.write_bytes("datasets/broken/notjson/manifest.json", b'{"dataset": "broken", "version": ')
    shardless = json.loads(storage.read_bytes("datasets/broken/good/manifest.json"))
    del shardless["shards"]
    storage.write_bytes("datasets/broken/noshards/manifest.json", json.dumps(shardless).encode())
    elsewhere = json.loads(storage.read_bytes("datasets/broken/good/manifest.json"))
    elsewhere["version"] = "elsewhere"  # lists a shard of another dataset, root-relative
    elsewhere["shards"][0]["path"] = "datasets/demo/v1/shards/v1-000000.tar"
    storage.write_bytes("datasets/broken/elsewhere/manifest.json", json.dumps(elsewhere).encode())
    storage.write_bytes("datasets/nested/deep/manifest.json", b"[" * 100_000 + b"]" * 100_000)  # past json's recursion
    config = yaml.safe_load(demo_config_path().read_text())
    config["storage"]["root"] = storage.root
    config["publish"] = {"executor": "local"}
    (base / "run.yaml").write_text(yaml.safe_dump(config))
    (base / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (base / "bad-specs.yaml").write_text("jobs: [unclosed\n")
    return base


def publish(storage, dataset: str, version: str, samples) -> None:
    spec = VersionSpec(dataset=dataset, version=version, kind="bootstrap", thresholds={"clip_t": 0.3, "dino": 0.6},
                       config={"filter": {"thresholds": {"clip_t": 0.3, "dino": 0.6}}})
    publish_samples(storage, spec, samples, shard_max_samples=4)


def listing(folder: Path) -> dict[str, int]:
    """Every file and folder under `folder` (hidden ones too), with file sizes."""
    return {str(path.relative_to(folder)): path.stat().st_size if path.is_file() else -1
            for path in folder.rglob("*")}


@pytest.fixture
def in_repo(no_work, monkeypatch):
    """No work may start (tests/conftest.py's tripwires), in the checkout's folder: jobs read
    jobs/specs.yaml's configs/ paths from here."""
    monkeypatch.chdir(REPO)


def call(cli: str, argv: list[str], base: Path) -> int:
    """Run one CLI's main in this process and return its exit code (the caller reads its output)."""
    root = str(base / "root")
    if cli == "run":
        argv = ["--config", str(base / "run.yaml"), *argv]
    elif cli == "versions":
        argv = ["--set", f"storage.root={root}", "--set", "publish.executor=local", *argv]
    main = {"run": factory.run.main, "versions": factory.versions.main, "jobs": jobs.__main__.main}[cli]
    argv = [item.replace("{base}", str(base)) for item in argv]
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse refusals
        return int(exit_.code)


# --- the table --------------------------------------------------------------------------------


def named(cli, argv, code, fragment, case_id):
    return pytest.param(cli, argv, code, fragment, id=case_id)


def name_cases():
    cases = []
    for number, bad in enumerate(BAD_NAMES):
        cases.append(named("versions", ["union", bad, "v1"], 2, "union NAME", f"union-name-{number}"))
    for number, bad in enumerate(BAD_NAMES[:8]):
        cases.append(named("versions", ["union", "u-ok", "v1", bad], 2, "union PARENT", f"union-parent-{number}"))
        cases.append(named("versions", ["rethreshold", "v1", bad, "--threshold", "clip_t=0.4"], 2,
                           "rethreshold NAME", f"rethreshold-name-{number}"))
        cases.append(named("run", ["--stage", "publish", "--set", f"publish.version={bad}"], 2, "publish.version",
                           f"publish-version-{number}"))
    for number, bad in enumerate(BAD_NAMES[:5]):
        cases.append(named("versions", ["show", bad], 2, "VERSION", f"show-{number}"))
        cases.append(named("versions", ["review", "import", "v1", "--name", bad], 2, "review import --name",
                           f"review-import-name-{number}"))
    for number, bad in enumerate(BAD_NAMES[:4]):
        cases.append(named("versions", ["verify", bad], 2, "VERSION", f"verify-{number}"))
        cases.append(named("versions", ["report", bad], 2, "VERSION", f"report-{number}"))
        cases.append(named("versions", ["rethreshold", bad, "child", "--threshold", "clip_t=0.4"], 2,
                           "rethreshold VERSION", f"rethreshold-parent-{number}"))
    for number, bad in enumerate(["../x", "a/b/c", "demo/../v1", "/v1", "demo/", "x" * 200 + "/v1"]):
        cases.append(named("versions", ["review", "export", bad], 2, "review", f"review-export-{number}"))
    for key in ("dataset", "run_id", "references.set", "sid.pool", "sid.parent", "train.version", "eval.name",
                "promptnet.reference_set"):
        cases.append(named("run", ["--stage", "publish", "--set", f"{key}=../../evil"], 2, key, f"run-{key}"))
    cases.append(named("versions", ["--set", "dataset=../x", "list"], 2, "dataset", "versions-dataset"))
    cases.append(named("versions", ["--set", "dataset=a/b", "show", "v1"], 2, "dataset", "versions-dataset-slash"))
    return cases


def threshold_cases():
    refusals = [("clip_t=nan", "finite"), ("clip_t=inf", "finite"), ("dino=-inf", "finite"),
                ("clip_t=1.5", "[-1, 1]"), ("dino=-3", "[-1, 1]"), ("clip_t", "RULE=VALUE"),
                ("=0.4", "unknown rule"), ("foo=0.4", "unknown rule"), ("clip_t=abc", "not a number"),
                ("clip_t=", "not a number"), ("clip_t=0.4,dino=0.7", "not a number"), ("dino=0.5", "looser"),
                ("clip_t=0.1", "looser"), ("CLIP_T=0.4", "unknown rule"), ("clip_t=0x1p-2", "not a number")]
    cases = [named("versions", ["rethreshold", "v1", "child", "--threshold", text], 2, fragment, f"threshold-{n}")
             for n, (text, fragment) in enumerate(refusals)]
    cases.append(named("versions", ["rethreshold", "v1", "child", "--threshold", "clip_t=0.4", "--threshold",
                                    "clip_t=0.5"], 2, "twice", "threshold-twice"))
    cases.append(named("versions", ["rethreshold", "v1", "child", "--threshold=--"], 2, "RULE=VALUE",
                       "threshold-dashes"))  # found by hypothesis: argparse gives an empty list
    return cases


def config_number_cases():
    bad = {"filter.thresholds.clip_t=1.5": "filter.thresholds.clip_t", "filter.thresholds.clip_t=.nan": "finite",
           "filter.thresholds.dino=-3": "filter.thresholds.dino", "filter.thresholds.dino=.inf": "finite",
           "filter.thresholds.foo=0.3": "unknown threshold rule", "dialogue.temperature=3": "dialogue.temperature",
           "dialogue.temperature=-1": "dialogue.temperature", "dialogue.top_p=0": "dialogue.top_p",
           "dialogue.top_p=1.5": "dialogue.top_p", "sid.alphas=[1.5]": "alphas", "plan.unit_size=0": "plan.unit_size",
           "plan.seed=-1": "plan.seed", "plan.seed=4294967296": "plan.seed",
           "storage.max_attempts=0": "storage.max_attempts", "train.condition_dropout=2": "condition_dropout",
           "dialogue.gpu_memory_utilization=0": "gpu_memory_utilization", "generate.num_gpus=-1": "num_gpus",
           "filter.resources={gpu: -1}": "filter.resources.gpu", "storage.read_timeout_s=0": "read_timeout_s",
           "publish.shard_max_samples=0": "shard_max_samples", "train.generator_lr=.nan": "finite"}
    return [named("run", ["--stage", "publish", "--set", item], 2, fragment, f"config-number-{n}")
            for n, (item, fragment) in enumerate(bad.items())]


def malformed_cases():
    run = "run"
    return [
        named(run, ["--stage", "publish", "--set", "novalue"], 2, "key=value", "set-no-equals"),
        named(run, ["--stage", "publish", "--set", "=x"], 2, "empty key", "set-empty-key"),
        named(run, ["--stage", "publish", "--set", "a..b=1"], 2, "empty key", "set-empty-segment"),
        named(run, ["--stage", "publish", "--set", "dataset.x=1"], 2, "not a section", "set-into-a-value"),
        named(run, ["--stage", "publish", "--set", "dataset=[1, 2]"], 2, "dataset", "set-list-as-name"),
        named(run, ["--stage", "publish", "--set", "nosuch.key=1"], 2, "unknown key", "set-unknown-key"),
        named(run, ["--stage", "nope"], 2, "--stage", "run-unknown-stage"),
        named(run, ["--stage", "train", "--set", "train.version=nope"], 2, "demo/nope does not exist",
              "train-missing-version"),
        named(run, ["--stage", "sid", "--set", "sid.parent=nope"], 2, "demo/nope does not exist", "sid-missing-parent"),
        named(run, ["--stage", "train", "--set", "dataset=broken", "--set", "train.version=notjson"], 2,
              "not valid JSON", "train-on-a-malformed-manifest"),
        named("versions", ["--config", "{base}", "list"], 2, "cannot be read", "versions-config-is-a-folder"),
        named("versions", ["--config", "{base}/binary.yaml", "list"], 2, "binary.yaml", "versions-config-binary"),
        named("versions", ["--config", "{base}/missing.yaml", "list"], 2, "not found", "versions-config-missing"),
        named("versions", ["show", "nope"], 2, "does not exist", "show-missing"),
        named("versions", ["verify", "nope"], 2, "does not exist", "verify-missing"),
        named("versions", ["union", "v1", "v2"], 2, "already exists", "union-over-existing"),
        named("versions", ["union", "u-ok", "v1", "nope"], 2, "does not exist", "union-missing-parent"),
        named("versions", ["union", "u-ok", "v1", "v1"], 2, "twice", "union-parent-twice"),
        named("versions", ["rethreshold", "v1", "v2", "--threshold", "clip_t=0.4"], 2, "already exists",
              "rethreshold-over-existing"),
        named("versions", ["rethreshold", "nope", "child", "--threshold", "clip_t=0.4"], 2, "does not exist",
              "rethreshold-missing-parent"),
        named("versions", ["review", "export", "v1", "--margin", "nan"], 2, "--margin", "review-margin-nan"),
        named("versions", ["review", "export", "v1", "--margin", "-1"], 2, "--margin", "review-margin-negative"),
        named("versions", ["review", "export", "v1", "--rejected", "-1"], 2, "--rejected", "review-rejected"),
        named("versions", ["review", "export", "v1", "--seed", "-1"], 2, "--seed", "review-seed"),
        named("versions", ["review", "import", "v1", "--project", "0"], 2, "--project", "review-project"),
        named("versions", ["--set", "dataset=broken", "show", "notjson"], 2, "notjson/manifest.json is not valid JSON",
              "show-manifest-not-json"),
        named("versions", ["--set", "dataset=broken", "verify", "noshards"], 2, "noshards/manifest.json is malformed",
              "verify-manifest-without-shards"),
        named("versions", ["--set", "dataset=broken", "union", "u-ok", "good", "notjson"], 2, "not valid JSON",
              "union-of-a-malformed-manifest"),
        named("versions", ["--set", "dataset=broken", "list"], 1, "BAD noshards: manifest", "list-marks-bad"),
        named("versions", ["--set", "dataset=nested", "show", "deep"], 2, "deep/manifest.json is not valid JSON: it "
              "is nested too deeply", "show-manifest-nested-too-deeply"),
        named("versions", ["--set", "dataset=nested", "list"], 1, "BAD deep: manifest", "list-marks-nested-bad"),
        named("versions", ["--set", "dataset=broken", "verify", "elsewhere"], 2, "leaves its folder 'datasets/broken'",
              "verify-a-shard-of-another-dataset"),
        named("versions", ["--set", "dataset=broken", "union", "u-ok", "elsewhere"], 2, "leaves its folder",
              "union-of-a-shard-of-another-dataset"),
    ]


def jobs_cases():
    return [
        named("jobs", ["submit", "../x"], 2, "no job named", "jobs-unknown-name"),
        named("jobs", ["submit", "bootstrap", "--set", "novalue"], 2, "--set expects key=value", "jobs-set-no-equals"),
        named("jobs", ["submit", "bootstrap", "--set", "=x"], 2, "--set expects key=value", "jobs-set-empty-key"),
        named("jobs", ["submit", "bootstrap", "--set", "publish.version=../x"], 2, "publish.version",
              "jobs-set-bad-version"),
        named("jobs", ["submit", "nightly-sid", "--set", "filter.thresholds.clip_t=.nan"], 2, "finite",
              "jobs-set-nan-threshold"),
        named("jobs", ["submit", "bootstrap", "--set", "dataset=a/b"], 2, "dataset", "jobs-set-bad-dataset"),
        named("jobs", ["--specs", "{base}", "list"], 2, "cannot be read", "jobs-specs-is-a-folder"),
        named("jobs", ["--specs", "{base}/binary.yaml", "list"], 2, "cannot be read", "jobs-specs-binary"),
        named("jobs", ["--specs", "{base}/missing.yaml", "list"], 2, "not found", "jobs-specs-missing"),
        named("jobs", ["--specs", "{base}/bad-specs.yaml", "list"], 2, "not valid YAML", "jobs-specs-bad-yaml"),
        named("jobs", ["token"], 2, "--ssm-parameter", "jobs-token-without-parameter"),
    ]


CASES = name_cases() + threshold_cases() + config_number_cases() + malformed_cases() + jobs_cases()


def test_the_table_has_at_least_80_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize(("cli", "argv", "code", "fragment"), CASES)
def test_hostile_input_is_refused_cleanly(world, in_repo, capsys, cli, argv, code, fragment):
    before, cwd_before = listing(world), sorted(os.listdir(REPO))
    exit_code = call(cli, argv, world)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert exit_code == code, said
    assert fragment in said
    assert "Traceback" not in said
    assert listing(world) == before, "a hostile input wrote or removed a file"
    assert sorted(os.listdir(REPO)) == cwd_before, "a hostile input wrote into the current folder"


def test_list_shows_the_good_versions_beside_the_bad_ones(world, capsys):
    assert call("versions", ["--set", "dataset=broken", "list"], world) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in out[:2]) == ["elsewhere", "good"] and "3 samples" in out[0]
    assert out[2].startswith("BAD noshards: manifest ") and "'shards' is missing" in out[2]
    assert out[3].startswith("BAD notjson: manifest ") and "notjson/manifest.json is not valid JSON" in out[3]


def test_failed_work_exits_1_with_one_line_and_no_traceback(world, monkeypatch, capsys):
    # each double takes the real function's parameters, so a wrong call raises TypeError and the lines differ
    def broken_verify(storage, dataset, version):
        raise RuntimeError("the disk went away")

    def broken_fetch(parameter, region=None, endpoint_url=None):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(factory.versions, "verify_version", broken_verify)
    assert call("versions", ["verify", "v1"], world) == 1
    monkeypatch.setattr("jobs.auth_token.fetch_token", broken_fetch)
    assert call("jobs", ["token", "--ssm-parameter", "/cluster/token"], world) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: verify failed: RuntimeError: the disk went away",
                                "error: token failed: RuntimeError: the disk went away"]


@pytest.mark.parametrize("options", [{"refine_guidance_scale": math.nan}, {"class_guidance_scale": math.inf},
                                     {"finetune_seed": -1}, {"finetune_seed": 2**32}, {"finetune_min_crop": 0}])
def test_generator_options_out_of_range_are_refused_naming_the_generator(options):
    from models.base import parse_options
    from models.profusion import ProFusionOptions

    with pytest.raises(ValueError, match="generator 'profusion': invalid options"):
        parse_options("profusion", ProFusionOptions, options)


# --- files others can read ----------------------------------------------------------------


def test_published_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    saved = os.umask(0o027)
    try:
        storage = LocalStorage(tmp_path / "root")
        publish(storage, "demo", "v1", make_samples(2))
    finally:
        os.umask(saved)
    files = [path for path in (tmp_path / "root").rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"manifest.json", "index.parquet", "v1-000000.tar"}
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o640}
    storage = LocalStorage(tmp_path / "other")
    storage.write_bytes("a/b.txt", b"x")
    assert stat.S_IMODE((tmp_path / "other" / "a" / "b.txt").stat().st_mode) == 0o666 & ~saved


# --- property-based --------------------------------------------------------------------------

HOSTILE_PIECES = st.sampled_from(["a", "b", "1", ".", "_", "-", "/", "\\", " ", "~", ":", "$", "*", "\x00", "\n", "é",
                                  "..", "../", "v1", "datasets"])
HOSTILE_TEXT = st.lists(HOSTILE_PIECES, max_size=12).map("".join) | st.text(max_size=130)
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A root of its own for the property tests (a valid random name publishes a real version)."""
    base = tmp_path_factory.mktemp("property")
    storage = LocalStorage(base / "root")
    publish(storage, "demo", "v1", make_samples(10))
    config = yaml.safe_load(demo_config_path().read_text())
    config["storage"]["root"] = storage.root
    (base / "run.yaml").write_text(yaml.safe_dump(config))
    return base


def new_files(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {name for name, size in after.items() if size >= 0 and before.get(name) != size}


@PROPERTY
@given(name=HOSTILE_TEXT)
def test_any_union_name_is_refused_or_stays_in_its_own_folder(sandbox, capsys, name):
    before = listing(sandbox)
    code = call("versions", ["union", "--", name, "v1"], sandbox)
    said = capsys.readouterr()
    assert "Traceback" not in said.out + said.err
    if code == 0:
        check_name(name)
        assert all(path.startswith(f"root/datasets/demo/{name}/") for path in new_files(before, listing(sandbox)))
        shutil.rmtree(sandbox / "root" / "datasets" / "demo" / name)
        return
    assert code == 2 and listing(sandbox) == before
    try:
        check_name(name)
    except BadName:
        return
    assert "already exists" in said.err  # a valid name is refused only when it is taken


SET_KEYS = st.sampled_from(["dataset", "run_id", "publish.version", "references.set", "sid.pool", "train.version",
                            "filter.thresholds.clip_t", "filter.thresholds.dino", "dialogue.temperature",
                            "dialogue.top_p", "sid.alphas", "plan.seed", "plan.unit_size", "eval.name"])


@PROPERTY
@given(key=SET_KEYS | st.text(max_size=20).filter(lambda text: not text.strip().startswith(("storage", "ray"))),
       value=HOSTILE_TEXT | st.floats().map(str) | st.integers().map(str))
def test_any_set_value_is_refused_or_gives_a_sound_config(sandbox, capsys, key, value):
    seen: list[FactoryConfig] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(factory.run, "init_ray", lambda config: None)
        patch.setattr(factory.run, "timed", lambda label, entry, ctx: seen.append(ctx.config) or {})
        before = listing(sandbox)
        code = call("run", ["--stage", "publish", "--set", f"{key}={value}"], sandbox)
    said = capsys.readouterr()
    assert "Traceback" not in said.out + said.err and listing(sandbox) == before
    assert code in (0, 2), said.err
    if code == 0:
        config = seen[0]
        for name in (config.dataset, config.run_id, config.publish.version or "v", config.references.set):
            check_name(name)
        assert all(math.isfinite(v) and -1 <= v <= 1 for v in config.filter.thresholds.values())


THRESHOLD_TEXT = st.builds("{}{}{}".format, st.sampled_from(["clip_t", "dino", "", "CLIP_T", "clip_t ", "x"]),
                           st.sampled_from(["=", "", "==", ":"]),
                           st.floats().map(str) | st.sampled_from(["nan", "inf", "-inf", "1e309", "", "0.4,0.5"])
                           | HOSTILE_TEXT) | HOSTILE_TEXT


@PROPERTY
@given(text=THRESHOLD_TEXT)
def test_any_threshold_string_is_refused_or_is_a_stricter_finite_threshold(sandbox, capsys, text):
    before = listing(sandbox)
    code = call("versions", ["rethreshold", "v1", "child", f"--threshold={text}"], sandbox)
    said = capsys.readouterr()
    assert "Traceback" not in said.out + said.err
    if code == 0:
        rule, value = next(iter(parse_thresholds([text]).items()))
        assert math.isfinite(value) and value >= {"clip_t": 0.3, "dino": 0.6}[rule]
        assert all(path.startswith("root/datasets/demo/child/") for path in new_files(before, listing(sandbox)))
        shutil.rmtree(sandbox / "root" / "datasets" / "demo" / "child")
    else:
        assert code == 2 and listing(sandbox) == before, said.err
        try:
            parsed = parse_thresholds([text])
        except ThresholdError:
            return
        assert any(value < {"clip_t": 0.3, "dino": 0.6}[rule] for rule, value in parsed.items())
