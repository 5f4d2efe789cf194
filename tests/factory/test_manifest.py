import json
from dataclasses import replace

import pyarrow as pa
import pytest

from factory.dataset import publisher
from factory.dataset.manifest import (
    SCHEMA,
    KeySet,
    PublishRefused,
    VersionError,
    VersionSpec,
    list_versions,
    load_manifest,
    score_stats,
    shard_key,
    union_versions,
    verify_version,
    version_exists,
)
from factory.dataset.publisher import publish_samples
from factory.dataset.shards import read_shard
from tests.factory.conftest import make_samples


def spec(version, kind="bootstrap", parents=(), sha="cfg-a"):
    return VersionSpec(dataset="d", version=version, kind=kind, parents=list(parents), config={"x": 1},
                       config_sha256=sha, thresholds={"clip_t": 0.3, "dino": 0.6}, funnel={"planned": 20})


def test_publish_writes_shards_index_and_manifest_last(storage, samples):
    manifest = publish_samples(storage, spec("v1"), list(reversed(samples)) + samples[:2], shard_max_samples=4)
    assert manifest["schema"] == SCHEMA and manifest["samples"] == len(samples)
    assert manifest["thresholds"] == {"clip_t": 0.3, "dino": 0.6}
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 3]
    assert load_manifest(storage, "d", "v1") == manifest
    index = storage.read_parquet("datasets/d/v1/index.parquet").to_pylist()
    assert [row["key"] for row in index] == sorted(s.key for s in samples)
    assert index[0]["clip_t"] is not None and index[0]["shard"] == "shards/v1-000000.tar"
    assert manifest["score_stats"]["dino"]["min"] == pytest.approx(0.6)
    assert verify_version(storage, "d", "v1") == []
    assert not storage.exists("datasets/d/v1/_publishing.json")


def test_score_stats_are_the_mean_extremes_and_deciles_of_the_scores_given():
    """Numpy's default (linear) quantiles of 0.0, 0.1, ..., 1.0 are the values themselves; None is no score."""
    scores = [0.3, None, 0.0, 1.0, 0.1, 0.9, 0.2, 0.8, 0.4, 0.6, 0.5, 0.7]
    assert score_stats(scores) == {"mean": 0.5, "min": 0.0, "p10": 0.1, "p50": 0.5, "p90": 0.9, "max": 1.0}
    assert score_stats([0.2, 0.2, 0.8]) == {"mean": 0.4, "min": 0.2, "p10": 0.2, "p50": 0.2, "p90": 0.68, "max": 0.8}
    assert score_stats([None]) == {}


def test_a_version_that_would_hold_no_sample_is_refused_and_leaves_no_lock(storage):
    """A run or rethreshold whose every candidate was rejected: a clear refusal, not an empty version."""
    empty = VersionSpec("d", "empty", "bootstrap", funnel={"rejections": {"filter:clip_t_below_threshold": 7,
                                                                         "filter:dino_below_threshold": 2}})
    with pytest.raises(PublishRefused, match=r"d/empty would hold no sample: every candidate was rejected \(most: "
                                             r"filter:clip_t_below_threshold 7, filter:dino_below_threshold 2\)"):
        publish_samples(storage, empty, [])
    assert storage.list("datasets/d/empty") == []


def test_a_key_set_answers_membership_exactly():
    """Keys of other lengths, prefixes and extensions of stored keys, unicode and non-strings."""
    column = pa.chunked_array([["b2", "a1", "ccc3"], ["a10", "é-key"]])
    keys = KeySet.of(column)
    assert len(keys) == 5
    assert all(key in keys for key in ["a1", "a10", "b2", "ccc3", "é-key"])
    assert not any(key in keys for key in ["a", "a100", "ccc", "ccc30", "b", "zz", "", "é"])
    assert 1 not in keys and None not in keys
    assert "x" not in KeySet.of(pa.chunked_array([], type=pa.string()))


def test_same_input_gives_identical_shards(storage, samples):
    first = publish_samples(storage, spec("a"), samples, shard_max_samples=5)
    second = publish_samples(storage, spec("b"), list(reversed(samples)), shard_max_samples=5)
    assert len(first["shards"]) == 3
    assert [(s["sha256"], s["bytes"]) for s in first["shards"]] == [(s["sha256"], s["bytes"]) for s in second["shards"]]


def published_users(storage, manifest) -> dict[str, str]:
    return {sample.key: sample.user for shard in manifest["shards"]
            for sample in read_shard(storage, shard_key(manifest, shard["path"]))}


def test_the_first_sample_of_a_repeated_key_is_kept(storage, samples):
    copy = replace(samples[3], user="a later copy")
    first = published_users(storage, publish_samples(storage, spec("v1"), [*samples, copy], shard_max_samples=4))
    second = published_users(storage, publish_samples(storage, spec("v2"), [copy, *samples], shard_max_samples=4))
    assert len(first) == len(second) == len(samples)
    assert first[copy.key] == samples[3].user and second[copy.key] == "a later copy"


def test_never_overwrites_and_other_publisher_is_refused(storage, samples):
    publish_samples(storage, spec("v1"), samples)
    with pytest.raises(VersionError, match="already exists"):
        publish_samples(storage, spec("v1"), samples[:3])
    lock = {"config_sha256": "other", "kind": "bootstrap"}
    storage.write_bytes("datasets/d/v2/_publishing.json", json.dumps(lock).encode())
    with pytest.raises(VersionError, match="being published by another run"):
        publish_samples(storage, spec("v2"), samples)
    assert not version_exists(storage, "d", "v2")


def test_union_copies_nothing_and_verifies(storage):
    publish_samples(storage, spec("v1"), make_samples(5), shard_max_samples=2)
    publish_samples(storage, spec("r1", kind="sid", parents=["v1"]), make_samples(4, start=100, round_=1))
    before = set(storage.list("datasets"))
    union = union_versions(storage, spec("u1", kind="union", parents=["v1", "r1"]))
    added = set(storage.list("datasets")) - before
    files = ("index.parquet", "manifest.json", "README.md", "croissant.json")
    assert added == {f"datasets/d/u1/{name}" for name in files}
    assert union["samples"] == 9 and union["parents"] == ["v1", "r1"]
    assert all(shard["path"].startswith("datasets/d/") for shard in union["shards"])
    assert verify_version(storage, "d", "u1") == []
    assert sorted(m["version"] for m in list_versions(storage, "d")) == ["r1", "u1", "v1"]


def test_union_refuses_repeated_samples(storage):
    publish_samples(storage, spec("v1"), make_samples(3))
    publish_samples(storage, spec("v2"), make_samples(3))
    with pytest.raises(VersionError, match="share 3 sample keys"):
        union_versions(storage, spec("u", kind="union", parents=["v1", "v2"]))


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_verify_names_the_damaged_shard(storage, samples, damage):
    publish_samples(storage, spec("v1"), samples, shard_max_samples=4)
    target = "datasets/d/v1/shards/v1-000001.tar"
    data = storage.read_bytes(target)
    if damage == "truncate":
        storage.write_bytes(target, data[: len(data) // 2])
    elif damage == "alter":
        storage.write_bytes(target, data[:700] + bytes([data[700] ^ 0xFF]) + data[701:])
    else:
        storage.delete(target)
    problems = verify_version(storage, "d", "v1")
    assert problems and all("v1-000001.tar" in p or "is in no shard" in p for p in problems)
    assert any("shards/v1-000001.tar" in p for p in problems)
    if damage == "delete":
        assert "shard shards/v1-000001.tar: missing" in problems


def test_verify_reports_missing_index_rows(storage, samples):

    publish_samples(storage, spec("v1"), samples)
    index = storage.read_parquet("datasets/d/v1/index.parquet")
    storage.write_parquet("datasets/d/v1/index.parquet", index.slice(0, 5))
    problems = verify_version(storage, "d", "v1")
    assert any("have no index row" in p for p in problems)
    assert any("index has 5 rows" in p for p in problems)


def test_missing_version_is_a_clear_error(storage):
    with pytest.raises(VersionError, match="does not exist"):
        load_manifest(storage, "d", "nope")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_manifest_holding_nan_or_infinity_is_refused_before_index_and_manifest(storage, samples, bad):
    nan_spec = spec("v1")
    nan_spec.cost = {"generate": {"gpu_seconds": bad}}
    with pytest.raises(VersionError, match="NaN or an infinity"):
        publish_samples(storage, nan_spec, samples)
    assert not storage.exists("datasets/d/v1/manifest.json") and not storage.exists("datasets/d/v1/index.parquet")


def test_a_dead_attempts_card_and_shards_do_not_outlive_the_version_published_after_it(storage, samples):
    """An attempt at v1 killed after its card and three shards (its lock then deleted by hand, say, to
    publish other samples): the version published next keeps none of them, and verify names a stray."""
    dead = publish_samples(storage, spec("dead"), samples, shard_max_samples=2)
    folder = "datasets/d/v1"
    for name in ("README.md", "croissant.json"):
        storage.write_bytes(f"{folder}/{name}", storage.read_bytes(f"datasets/d/dead/{name}"))
    for number in range(3):
        storage.write_bytes(f"{folder}/shards/v1-{number:06d}.tar",
                            storage.read_bytes(shard_key(dead, dead["shards"][number]["path"])))
    cards_while_writing = []

    class Passes(publisher.LocalPasses):
        def shards(self, *args):
            cards_while_writing.extend(storage.exists(f"{folder}/{name}") for name in ("README.md", "croissant.json"))
            return super().shards(*args)

    published = publisher.write_version(storage, spec("v1"), publisher.SampleList(samples[:3]), 2**20, 2, Passes())
    assert cards_while_writing == [False, False]  # removed when the lock was taken: no card names a half version
    listed = sorted(shard_key(published, shard["path"]) for shard in published["shards"])
    assert sorted(storage.list(f"{folder}/shards")) == listed
    assert "dead" not in storage.read_bytes(f"{folder}/README.md").decode()
    assert verify_version(storage, "d", "v1") == []
    storage.write_bytes(f"{folder}/shards/v1-000009.tar", b"left over")
    stray = "shard file v1-000009.tar in the version's folder is not in its manifest"
    assert verify_version(storage, "d", "v1") == [stray]


def test_a_union_run_again_after_it_was_killed_before_its_lock_went_says_so_and_removes_the_lock(storage):
    publish_samples(storage, spec("v1"), make_samples(3))
    publish_samples(storage, spec("r1", kind="sid"), make_samples(2, start=100))
    union = spec("u1", kind="union", parents=["v1", "r1"])
    union_versions(storage, union)
    lock = "datasets/d/u1/_publishing.json"
    storage.write_bytes(lock, b"{}")  # killed between its manifest and the lock's removal
    with pytest.raises(VersionError, match="u1 already exists, published by this same config from the same parents"):
        union_versions(storage, spec("u1", kind="union", parents=["v1", "r1"]))
    assert not storage.exists(lock)
    with pytest.raises(VersionError, match="u1 already exists; publishing never overwrites"):
        union_versions(storage, spec("u1", kind="union", parents=["r1", "v1"]))
