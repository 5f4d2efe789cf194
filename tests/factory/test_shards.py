import hashlib
import os

import pytest

from factory.dataset.manifest import VersionSpec
from factory.dataset.publisher import publish_samples
from factory.dataset.shards import Sample, cut_points, encode_shard, estimated_bytes, read_shard
from factory.framework import layout
from tests.factory.conftest import make_samples


def shard_sizes(samples, max_bytes, max_samples) -> list[int]:
    """How many of `samples` (in key order) each shard gets under the cut rule."""
    starts = cut_points([estimated_bytes(sample.payload_bytes()) for sample in samples], max_bytes, max_samples)
    return [end - start for start, end in zip(starts, [*starts[1:], len(samples)])]


def test_shards_cut_by_count_and_bytes(samples):
    assert shard_sizes(samples, max_bytes=10**9, max_samples=4) == [4, 4, 3]
    by_bytes = shard_sizes(samples, max_bytes=2 * 4096 + 3000, max_samples=100)
    assert all(count <= 2 for count in by_bytes) and sum(by_bytes) == len(samples)
    assert cut_points([10, 500, 10, 10], max_bytes=100, max_samples=10) == [0, 1, 2]  # too big: a shard alone


def test_a_shard_takes_samples_up_to_exactly_max_bytes_and_closes_before_one_byte_more():
    """The contract's byte rule at its edge: estimates summing to max_bytes share a shard."""
    assert cut_points([40, 60, 30, 70, 1], max_bytes=100, max_samples=10) == [0, 2, 4]
    assert cut_points([40, 61, 30, 70], max_bytes=100, max_samples=10) == [0, 1, 3]
    assert cut_points([25] * 9, max_bytes=100, max_samples=3) == [0, 3, 6]  # the count closes first
    assert cut_points([25] * 9, max_bytes=50, max_samples=3) == [0, 2, 4, 6, 8]  # the bytes close first


def test_same_samples_give_byte_identical_shards(samples):
    assert encode_shard(samples) == encode_shard(list(make_samples(11)))


def test_shards_are_the_bytes_webdataset_writes_for_the_same_samples(samples):
    import io

    import webdataset as wds

    from factory.dataset.shards import TAR_MTIME

    written = io.BytesIO()
    with wds.TarWriter(written, encoder=False, mtime=TAR_MTIME) as writer:
        for sample in samples:
            writer.write(sample.members())
    assert encode_shard(samples) == written.getvalue()


def test_write_and_stream_back_all_members(storage, samples):
    shards = publish_samples(storage, VersionSpec("d", "v1", "bootstrap"), samples, shard_max_samples=5)["shards"]
    assert [shard["path"] for shard in shards] == [layout.shard_relative("v1", n) for n in range(3)]
    assert shards[0]["path"] == "shards/v1-000000.tar"
    back = [s for shard in shards for s in read_shard(storage, layout.shard("d", "v1", shard["path"]))]
    assert back == sorted(samples, key=lambda sample: sample.key)  # published in key order
    for shard in shards:
        data = storage.read_bytes(layout.shard("d", "v1", shard["path"]))
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()


def test_dotted_key_is_refused():
    bad = Sample("a.b", b"x", b"y", "u", "a", {})
    with pytest.raises(ValueError, match="no dots"):
        encode_shard([bad])


def test_shards_load_with_webdataset_and_hf_datasets(tmp_path, samples):
    import webdataset as wds

    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    samples = sorted(samples, key=lambda sample: sample.key)  # as they are published
    shards = publish_samples(storage, VersionSpec("d", "v1", "bootstrap"), samples, shard_max_samples=6)["shards"]
    urls = [str(tmp_path / layout.shard("d", "v1", shard["path"])) for shard in shards]
    loaded = list(wds.WebDataset(urls, shardshuffle=False))
    assert [item["__key__"] for item in loaded] == [s.key for s in samples]
    first = loaded[0]
    assert first["input.jpg"] == samples[0].input_image and first["target.jpg"] == samples[0].target_image
    assert first["user.txt"].decode() == samples[0].user and first["assistant.txt"].decode() == samples[0].assistant

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import datasets

    hf = datasets.load_dataset("webdataset", data_files={"train": urls},
                               split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(hf) == len(samples)
    row = hf[0]
    assert row["__key__"] == samples[0].key
    assert row["input.jpg"].size == (24, 24) and row["target.jpg"].size == (24, 24)
    assert row["user.txt"] == samples[0].user and row["assistant.txt"] == samples[0].assistant
    assert row["json"]["scores"]["clip_t"] == pytest.approx(samples[0].meta["scores"]["clip_t"])


def sparse_member_tar(name: str, real_size: int) -> bytes:
    """A tar of one GNU sparse member: 4 KiB stored, `real_size` bytes once read back."""
    import tarfile

    def octal(number: int) -> bytes:
        return f"{number:011o}".encode() + b"\0"

    info = tarfile.TarInfo(name)
    info.size = 4096
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:410] = octal(0) + octal(4096)  # the first (offset, bytes) of the sparse map
    header[483:495] = octal(real_size)  # the size it reads back as
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header) + b"\0" * (4096 + 1024)


def test_a_member_larger_than_its_shard_is_refused_before_it_is_read():
    """A tampered shard (verify reads it after a sha256 mismatch) must not make a reader allocate gigabytes."""
    from factory.dataset.shards import read_shard_bytes

    data = sparse_member_tar("k1.json", 3 * 2**30)
    with pytest.raises(ValueError, match=r"member k1.json says it holds 3221225472 bytes in a 5632-byte shard"):
        list(read_shard_bytes(data))
