"""Bad configuration is refused with a clear message before any work starts.

Per-file bad inputs live beside the code that reads them (see docs/reliability.md):
images, tar members and reference names in tests/stages/test_references.py, instruction
banks in tests/stages/test_instructions.py, LLM output in tests/stages/test_dialogue.py.
Here the whole CLI is run in-process with tripwires on the first pieces of work (starting
Ray, running a stage): a config error must stop the run before either.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import factory.run
from factory.framework.config import demo_config_path
from tests.reliability.conftest import CANARIES

MODEL_KEYS = {  # besides every generator's model and checkpoint
    "references.sd_model": "dir",
    "filter.clip_pretrained": "file",
    "filter.clip_model_config": "file",
    "filter.dino_model": "dir",
    "dialogue.model": "dir",
}


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Starting Ray or any stage before the config is found bad fails the test."""
    def trip(what):
        def tripped(*args, **kwargs):
            raise WorkStarted(f"{what} started before the bad config was reported")
        return tripped

    monkeypatch.setattr(factory.run, "init_ray", trip("Ray"))
    monkeypatch.setattr(factory.run, "timed", lambda label, entry, ctx: trip(f"stage {label}")())


def set_key(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def demo_config(tmp_path: Path, **changes) -> Path:
    """The embedded demo with every model path pointing at something that exists, and a
    local folder of references, so only the `changes` are wrong."""
    config = yaml.safe_load(demo_config_path().read_text())
    config["storage"]["root"] = str(tmp_path / "root")
    config["references"]["sources"] = [{"kind": "folder", "path": str(tmp_path / "images"), "subject": "dog"}]
    (tmp_path / "images").mkdir()
    keys = dict(MODEL_KEYS)
    for name, spec in config["generate"]["generators"].items():
        keys.update({f"generate.generators.{name}.{field}": "dir"
                     for field in ("model", "checkpoint") if field in spec})
    for dotted, kind in keys.items():
        path = tmp_path / "models" / dotted
        if kind == "dir":
            path.mkdir(parents=True)
            (path / "config.json").write_text("{}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        set_key(config, dotted, str(path))
    for dotted, value in changes.items():
        set_key(config, dotted.replace("__", "."), value)
    target = tmp_path / "config.yaml"
    target.write_text(yaml.safe_dump(config))
    return target


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = factory.run.main(argv)
    except WorkStarted as err:
        pytest.fail(str(err))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def nothing_written(root: Path) -> bool:
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_missing_bucket_exits_2_naming_the_bucket_and_no_secret(tmp_path, s3_server, monkeypatch, capsys,
                                                                tripwires):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    config = demo_config(tmp_path)
    rc, output = run_cli(["--stage", "all", "--config", str(config), "--set", "storage.root=s3://no-such-bucket-x/p",
                          "--set", f"storage.endpoint_url={s3_server}"], capsys)
    assert rc == factory.run.EXIT_CONFIG
    assert "bucket does not exist: s3://no-such-bucket-x" in output
    assert not any(secret in output for secret in CANARIES.values())


@pytest.mark.parametrize("key", ["filter.dino_model", "dialogue.model", "generate.generators.profusion.checkpoint"])
def test_missing_model_path_exits_2_before_any_work(key, tmp_path, capsys, tripwires):
    missing = tmp_path / "absent" / key
    config = demo_config(tmp_path, **{key.replace(".", "__"): str(missing)})
    rc, output = run_cli(["--stage", "all", "--config", str(config)], capsys)
    assert rc == factory.run.EXIT_CONFIG, output
    assert str(missing) in output and key in output, output
    assert nothing_written(tmp_path / "root")


def test_instruction_bank_with_bad_placeholders_exits_2_before_any_work(tmp_path, capsys, tripwires):
    bank = tmp_path / "bank.yaml"
    bank.write_text(yaml.safe_dump({"instructions": {"human": [], "object": [
        {"id": "o-ok", "category": "scene", "template": "a {subject} at home"},
        {"id": "o-missing", "category": "scene", "template": "a teapot at home"},
        {"id": "o-extra", "category": "scene", "template": "a {subject} in {city}"},
    ]}}))
    config = demo_config(tmp_path, plan__instructions=str(bank))
    rc, output = run_cli(["--stage", "all", "--config", str(config)], capsys)
    assert rc == factory.run.EXIT_CONFIG, output
    assert "o-missing" in output and "o-extra" in output and "o-ok" not in output
    assert nothing_written(tmp_path / "root")


def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys, tripwires):
    config = demo_config(tmp_path)
    rc, output = run_cli(["--stage", "all", "--config", str(config), "--set", "filter.thresholds.clip_t=high"], capsys)
    assert rc == factory.run.EXIT_CONFIG and "filter.thresholds.clip_t" in output
    assert nothing_written(tmp_path / "root")


@pytest.mark.parametrize("stage", ["all", "promptnet"])
def test_a_misspelt_generator_option_exits_2_before_any_work(stage, tmp_path, capsys, tripwires):
    """Actors (and PromptNet's days-long training) read the options; the run refuses them at its start."""
    config = demo_config(tmp_path)
    rc, output = run_cli(["--stage", stage, "--config", str(config),
                          "--set", "generate.generators.profusion.options.image_encodr=laion/x",
                          "--set", "generate.generators.profusion.options.finetune_steps=-1"], capsys)
    assert rc == factory.run.EXIT_CONFIG, output
    assert "generate.generators.profusion.options.image_encodr: unknown key" in output
    assert "generate.generators.profusion.options.finetune_steps: Input should be greater than" in output
    assert nothing_written(tmp_path / "root")
