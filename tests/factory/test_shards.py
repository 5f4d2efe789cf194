import hashlib
import os

import pytest

from factory.dataset.shards import Sample, cut_shards, encode_shard, read_shard, write_shards
from tests.factory.conftest import make_samples


def test_shards_cut_by_count_and_bytes(samples):
    by_count = list(cut_shards(samples, max_bytes=10**9, max_samples=4))
    assert [len(group) for group in by_count] == [4, 4, 3]
    by_bytes = list(cut_shards(samples, max_bytes=2 * 4096 + 3000, max_samples=100))
    assert all(len(group) <= 2 for group in by_bytes) and sum(map(len, by_bytes)) == len(samples)


def test_same_samples_give_byte_identical_shards(samples):
    assert encode_shard(samples) == encode_shard(list(make_samples(11)))


def test_write_and_stream_back_all_members(storage, samples):
    infos = write_shards(storage, "datasets/d/v1", "v1", samples, max_bytes=10**9, max_samples=5)
    assert [info.path for info in infos] == ["shards/v1-000000.tar", "shards/v1-000001.tar", "shards/v1-000002.tar"]
    back = [s for info in infos for s in read_shard(storage, f"datasets/d/v1/{info.path}")]
    assert back == samples
    for info in infos:
        data = storage.read_bytes(f"datasets/d/v1/{info.path}")
        assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()


def test_dotted_key_is_refused():
    bad = Sample("a.b", b"x", b"y", "u", "a", {})
    with pytest.raises(ValueError, match="no dots"):
        encode_shard([bad])


def test_shards_load_with_webdataset_and_hf_datasets(tmp_path, samples):
    import webdataset as wds

    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    infos = write_shards(storage, "v", "v1", samples, max_bytes=10**9, max_samples=6)
    urls = [str(tmp_path / "v" / info.path) for info in infos]
    loaded = list(wds.WebDataset(urls, shardshuffle=False))
    assert [item["__key__"] for item in loaded] == [s.key for s in samples]
    first = loaded[0]
    assert first["input.jpg"] == samples[0].input_image and first["target.jpg"] == samples[0].target_image
    assert first["user.txt"].decode() == samples[0].user and first["assistant.txt"].decode() == samples[0].assistant

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import datasets

    hf = datasets.load_dataset("webdataset", data_files={"train": str(tmp_path / "v" / "shards" / "*.tar")},
                               split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(hf) == len(samples)
    row = hf[0]
    assert row["__key__"] == samples[0].key
    assert row["input.jpg"].size == (24, 24) and row["target.jpg"].size == (24, 24)
    assert row["user.txt"] == samples[0].user and row["assistant.txt"] == samples[0].assistant
    assert row["json"]["scores"]["clip_t"] == pytest.approx(samples[0].meta["scores"]["clip_t"])
