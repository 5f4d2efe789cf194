"""The dataset card and Croissant metadata beside every manifest: parsed, checked against the
manifest, validated by mlcroissant, and read by `datasets.load_dataset(<version folder>)`."""

from __future__ import annotations

import datasets
import mlcroissant
import pytest
import yaml

from factory.dataset.card import FILES
from factory.dataset.manifest import VersionSpec, union_versions
from factory.dataset.publisher import publish_samples
from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from tests.factory.conftest import make_samples


@pytest.fixture
def local(tmp_path):
    return open_storage(StorageConfig(root=str(tmp_path)))


def spec(version, kind="bootstrap", parents=(), license_id="cc-by-nc-4.0"):
    return VersionSpec(dataset="d", version=version, kind=kind, parents=list(parents),
                       config={"publish": {"license": license_id}}, config_sha256="c",
                       thresholds={"clip_t": 0.3, "dino": 0.6},
                       funnel={"planned": 20, "generated": 19, "passed_clip": 14, "passed_dino": 12, "written": 0,
                               "rejections": {"filter:clip_t_below_threshold": 5}})


def front_matter(storage, version) -> dict:
    text = storage.read_bytes(f"datasets/d/{version}/README.md").decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_is_written_before_the_manifest_and_says_what_the_manifest_says(local):
    manifest = publish_samples(local, spec("v1"), make_samples(11), shard_max_samples=4)
    assert manifest["card"] == list(FILES)
    meta = front_matter(local, "v1")
    assert meta["license"] == "cc-by-nc-4.0" and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": [shard["path"] for shard in manifest["shards"]]}]}]
    body = local.read_bytes("datasets/d/v1/README.md").decode()
    assert f"{manifest['samples']} samples in 3 shards" in body
    assert "- passed_dino: 12" in body and "- rejected (filter:clip_t_below_threshold): 5" in body
    assert "score >= 0.3" in body and "score >= 0.6" in body


def test_croissant_validates_and_reads_every_sample_from_the_shards(local, tmp_path):
    manifest = publish_samples(local, spec("v1"), make_samples(7), shard_max_samples=3)
    path = tmp_path / "datasets/d/v1/croissant.json"
    assert mlcroissant.Metadata.from_file(mlcroissant.Context(), str(path)).issues.report() == ""
    records = list(mlcroissant.Dataset(jsonld=str(path)).records("user.txt"))
    assert len(records) == manifest["samples"] == 7
    assert sorted(record["user.txt/content"].decode() for record in records) == \
        sorted(sample.user for sample in make_samples(7))


def test_load_dataset_reads_a_version_and_a_union_by_folder_alone(local, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    publish_samples(local, spec("v1"), make_samples(5), shard_max_samples=2)
    publish_samples(local, spec("v2"), make_samples(4, start=5), shard_max_samples=2)
    union_versions(local, spec("u", kind="union", parents=["v1", "v2"]))

    cache = str(tmp_path / "hf-cache")  # datasets read HF_DATASETS_CACHE at import: the setenv is too late
    alone = datasets.load_dataset(str(tmp_path / "datasets/d/v1"), split="train", cache_dir=cache)
    together = datasets.load_dataset(str(tmp_path / "datasets/d/u"), split="train", cache_dir=cache)

    assert sorted(alone["__key__"]) == sorted(sample.key for sample in make_samples(5))
    assert sorted(together["__key__"]) == sorted(sample.key for sample in make_samples(9))
    assert front_matter(local, "u")["configs"][0]["data_files"][0]["path"][0].startswith("../v1/shards/")


def sid_like(samples):
    """The samples as a SID round writes them: generator `alpha` and `w` set where a bootstrap's are null."""
    for sample in samples:
        sample.meta["generator"] = {**sample.meta["generator"], "alpha": 0.3, "w": f"pool:{sample.key[:8]}"}
    return samples


def test_a_union_of_bootstrap_and_sid_samples_loads_by_folder_with_the_declared_features(local, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    publish_samples(local, spec("boot"), make_samples(4), shard_max_samples=2)
    publish_samples(local, spec("sid1", kind="sid", parents=["boot"]), sid_like(make_samples(3, start=10, round_=1)))
    union_versions(local, spec("u1", kind="union", parents=["boot", "sid1"]))

    loaded = datasets.load_dataset(str(tmp_path / "datasets/d/u1"), split="train", cache_dir=str(tmp_path / "hf-cache"))

    generators = {row["__key__"]: row["json"]["generator"] for row in loaded}
    assert len(generators) == 7
    assert sorted(g["w"] is None for g in generators.values()) == [False] * 3 + [True] * 4
    assert {g["alpha"] for g in generators.values()} == {None, 0.3}


def field_names(kind) -> dict:
    return {name: field_names(inner) for name, inner in kind.items()} if isinstance(kind, dict) else {}


def test_the_declared_json_fields_are_the_ones_publish_writes():
    from factory.dataset.card import META_FIELDS
    from factory.dataset.publisher import sample_from_row

    row = {"key": "k", "reference_id": "r", "reference_set": "s", "subject": "dog", "domain": "object",
           "instruction": "a dog", "instruction_id": "i", "category": "c", "style": "plain", "round": 1,
           "seed": 3, "alpha": 0.3, "w_id": "pool:x", "clip_t": 0.4, "dino": 0.7, "input_image": b"",
           "target_image": b"", "user": "u", "assistant": "a",
           "generator_info": '{"name": "g", "kind": "cafe", "checkpoint": "c", "steps": 2, "model": "m", "scale": 1}'}
    written = sample_from_row(row, "d", "v").meta
    assert field_names(written) == field_names(META_FIELDS)
