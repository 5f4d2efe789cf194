import json

import pytest

from factory.dataset.manifest import VersionSpec, load_manifest, verify_version
from factory.dataset.publisher import publish_samples
from factory.versions import main
from tests.factory.conftest import make_samples


@pytest.fixture
def root(storage_config, storage):
    publish_samples(storage, VersionSpec(dataset="demo", version="v1", kind="bootstrap",
                                         thresholds={"clip_t": 0.3, "dino": 0.6}, config={"filter": {}}),
                    make_samples(10), shard_max_samples=4)
    args = ["--set", f"storage.root={storage_config.root}"]
    if storage_config.endpoint_url:
        args += ["--set", f"storage.endpoint_url={storage_config.endpoint_url}"]
    return args


def test_list_show_verify(root, capsys):
    assert main(root + ["list"]) == 0
    assert "v1" in capsys.readouterr().out
    assert main(root + ["show", "v1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["samples"] == 10 and "config" not in shown
    assert main(root + ["verify", "v1"]) == 0
    assert "OK (10 samples, 3 shards)" in capsys.readouterr().out


def test_list_of_a_dataset_without_versions_says_so_and_where_it_looked(root, capsys):
    assert main(root + ["--set", "dataset=nothere", "list"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and "no versions of dataset 'nothere' in " in said.err and "datasets/nothere" in said.err


def test_verify_fails_with_exit_code_naming_the_shard(root, storage, capsys):
    storage.write_bytes("datasets/demo/v1/shards/v1-000002.tar", b"garbage")
    assert main(root + ["verify", "v1"]) == 1
    assert "shards/v1-000002.tar" in capsys.readouterr().out


def test_union_and_unknown_version(root, capsys):
    assert main(root + ["union", "u1", "v1"]) == 0
    assert main(root + ["show", "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rethreshold_selects_the_stricter_subset(root, storage):
    # the one-process passes: the Ray job is tested in tests/factory/test_publisher.py
    local = ["--set", "publish.executor=local"]
    assert main(root + local + ["rethreshold", "v1", "v1-strict", "--threshold", "clip_t=0.305"]) == 0
    child = load_manifest(storage, "demo", "v1-strict")
    parent_index = storage.read_parquet("datasets/demo/v1/index.parquet").to_pylist()
    expected = sorted(row["key"] for row in parent_index if row["clip_t"] >= 0.305)
    child_index = storage.read_parquet("datasets/demo/v1-strict/index.parquet").to_pylist()
    assert sorted(row["key"] for row in child_index) == expected and 0 < len(expected) < 10
    assert child["kind"] == "rethreshold" and child["parents"] == ["v1"]
    assert child["thresholds"] == {"clip_t": 0.305, "dino": 0.6}
    assert child["funnel"]["rejections"] == {"rethreshold:clip_t_below_threshold": 10 - len(expected)}
    assert verify_version(storage, "demo", "v1-strict") == []


def test_rethreshold_refuses_looser_thresholds(root, capsys):
    assert main(root + ["rethreshold", "v1", "v1-loose", "--threshold", "dino=0.5"]) == 2
    assert "looser" in capsys.readouterr().err


def test_a_union_holds_its_loosest_parents_thresholds_and_a_rethreshold_of_it_compares_with_them(root, storage,
                                                                                                 capsys):
    looser_clip = VersionSpec(dataset="demo", version="v2", kind="sid", thresholds={"clip_t": 0.25, "dino": 0.7},
                              config={"filter": {}})
    publish_samples(storage, looser_clip, make_samples(10, start=10), shard_max_samples=4)
    assert main(root + ["union", "u", "v1", "v2"]) == 0
    assert load_manifest(storage, "demo", "u")["thresholds"] == {"clip_t": 0.25, "dino": 0.6}
    local = ["--set", "publish.executor=local"]
    loosest = ["--threshold", "clip_t=-1", "--threshold", "dino=-1"]
    assert main(root + local + ["rethreshold", "u", "u-loose", *loosest]) == 2
    assert "looser" in capsys.readouterr().err
    assert main(root + local + ["rethreshold", "u", "u-strict", "--threshold", "clip_t=0.305"]) == 0  # one rule alone
    child = load_manifest(storage, "demo", "u-strict")
    assert child["thresholds"] == {"clip_t": 0.305, "dino": 0.6} and child["samples"] == 15  # n >= 5 of 0..19
