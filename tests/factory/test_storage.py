import threading

import pyarrow as pa
import pytest

from factory.framework.config import StorageConfig
from factory.framework.storage import AlreadyExists, StorageError, open_storage


def test_write_read_list_delete(storage):
    storage.write_bytes("a/b/one.bin", b"1")
    storage.write_bytes("a/two.bin", b"22")
    assert storage.read_bytes("a/b/one.bin") == b"1"
    assert storage.list("a") == ["a/b/one.bin", "a/two.bin"]
    assert storage.exists("a/two.bin") and not storage.exists("a/three.bin")
    assert storage.size("a/two.bin") == 2
    storage.delete("a/two.bin")
    assert storage.list("a") == ["a/b/one.bin"]
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes("a/two.bin")


def test_deleting_a_folders_last_file_leaves_no_empty_folder(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path / "root")))
    storage.write_bytes("v/_written/a/one.bin", b"1")
    storage.write_bytes("v/_written/two.bin", b"2")
    storage.write_bytes("v/keep.bin", b"3")
    storage.delete("v/_written/a/one.bin")
    assert not (tmp_path / "root/v/_written/a").exists() and (tmp_path / "root/v/_written").is_dir()
    storage.delete("v/_written/two.bin")
    assert sorted(p.name for p in (tmp_path / "root/v").iterdir()) == ["keep.bin"]
    storage.delete("v/keep.bin")
    storage.delete("v/keep.bin")  # a second delete of a gone key is no error
    assert (tmp_path / "root").is_dir() and not any((tmp_path / "root").iterdir())
    storage.write_bytes("v/_written/two.bin", b"2")  # a pruned folder is made again on write
    assert storage.read_bytes("v/_written/two.bin") == b"2"


def test_create_only_refuses_an_existing_object(storage):
    storage.write_bytes("m.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists):
        storage.write_bytes("m.json", b"second", create_only=True)
    assert storage.read_bytes("m.json") == b"first"


def test_concurrent_create_only_has_exactly_one_winner(storage):
    outcomes = []

    def attempt(payload):
        try:
            storage.write_bytes("race.json", payload, create_only=True)
            outcomes.append(("won", payload))
        except AlreadyExists:
            outcomes.append(("lost", payload))

    threads = [threading.Thread(target=attempt, args=(bytes([65 + n]) * 10,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [payload for outcome, payload in outcomes if outcome == "won"]
    assert len(winners) == 1
    assert storage.read_bytes("race.json") == winners[0]


def test_parquet_round_trip(storage):
    table = pa.table({"key": ["a", "b"], "image": [b"\x00\x01", b""]})
    storage.write_parquet("t/x.parquet", table)
    assert storage.read_parquet("t/x.parquet").equals(table)


def test_a_missing_column_is_refused_by_read_parquet_and_left_out_by_read_present_columns(storage):
    table = pa.table({"key": ["a", "b", "c"], "score": [0.1, 0.5, 0.9]})
    storage.write_parquet("t/x.parquet", table)
    with pytest.raises(StorageError, match="no column image"):
        storage.read_parquet("t/x.parquet", columns=["key", "image"])
    assert storage.read_present_columns("t/x.parquet", ["image", "score"]).equals(table.select(["score"]))
    kept = storage.read_present_columns("t/x.parquet", ["key", "image"], filters=[("key", "in", ["a", "c"])])
    assert kept.to_pydict() == {"key": ["a", "c"]}


def test_keys_cannot_escape_the_root(storage):
    for bad in ["../outside", "a/../../outside", "x\x00y"]:
        with pytest.raises(StorageError):
            storage.write_bytes(bad, b"x")


def test_large_object_goes_multipart_and_reads_back(storage_config, tmp_path):
    storage_config.multipart_threshold_mb = 5
    storage_config.multipart_chunk_mb = 5
    storage = open_storage(storage_config)
    payload = bytes(range(256)) * (12 * 2**20 // 256)
    storage.write_bytes("big.bin", payload)
    local = tmp_path / "big-upload.bin"
    local.write_bytes(payload[::-1])
    storage.upload_file(local, "big2.bin")
    assert storage.read_bytes("big.bin") == payload
    assert storage.read_bytes("big2.bin") == payload[::-1]


def test_local_writes_leave_no_temp_files(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    for n in range(5):
        storage.write_bytes("d/f.bin", bytes([n]) * 100)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.bin"]


def test_missing_bucket_is_a_clear_error_without_secrets(s3_server, monkeypatch):
    storage = open_storage(StorageConfig(root="s3://no-such-bucket-here/x", endpoint_url=s3_server, max_attempts=1))
    with pytest.raises(StorageError) as caught:
        storage.check()
    message = str(caught.value)
    assert "bucket does not exist: s3://no-such-bucket-here" in message
    assert "testing-secret-key" not in message and "testing-key-id" not in message


def test_an_unreachable_endpoint_from_the_environment_is_named_without_its_credentials(monkeypatch):
    # boto3 reads it; the config never saw it
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:pw1secret@127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    storage = open_storage(StorageConfig(root="s3://bucket/x", max_attempts=1))
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("key")
    assert "S3 get failed for s3://bucket/x/key: EndpointConnectionError" in str(caught.value)
    assert "pw1secret" not in str(caught.value)


def test_unsupported_scheme_is_refused():
    with pytest.raises(StorageError, match="unsupported storage root"):
        open_storage(StorageConfig(root="gs://bucket/x"))


def test_listing_a_missing_bucket_names_the_bucket(s3_server):
    storage = open_storage(StorageConfig(root="s3://missing-bucket-xyz", endpoint_url=s3_server, max_attempts=1))
    with pytest.raises(StorageError, match="bucket does not exist: s3://missing-bucket-xyz"):
        storage.list("")


def test_a_local_listing_passes_over_a_folder_another_process_deletes_meanwhile(tmp_path, monkeypatch):
    """A training's keep_steps deletes old steps while eval or SID lists the checkpoints."""
    import os
    import shutil

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    for step in (1, 2, 3):
        storage.write_bytes(f"checkpoints/g/run/step-{step}/meta.json", b"{}")
    real_scandir = os.scandir

    def deleted_just_before_it_is_read(path="."):
        if str(path).endswith("step-2"):
            shutil.rmtree(path)  # the other process's delete lands between the parent's listing and this one
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deleted_just_before_it_is_read)
    assert storage.list("checkpoints/g/run") == ["checkpoints/g/run/step-1/meta.json",
                                                 "checkpoints/g/run/step-3/meta.json"]


def test_a_local_key_that_cannot_be_read_is_a_storage_error_naming_it(tmp_path):
    """As S3's 403 is: `versions list` then marks that version BAD and lists the others."""
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    (tmp_path / "datasets" / "d" / "v1" / "manifest.json").mkdir(parents=True)  # a folder where a file belongs
    with pytest.raises(StorageError, match=r"cannot read .*datasets/d/v1/manifest.json: Is a directory"):
        storage.read_bytes("datasets/d/v1/manifest.json")


def test_a_storage_root_that_is_a_file_is_refused_naming_it(tmp_path):
    """Else every read says "not found" and every listing "no versions"."""
    (tmp_path / "afile").write_text("not a root")
    with pytest.raises(StorageError, match=r"storage root .*afile is a file, not a folder"):
        open_storage(StorageConfig(root=str(tmp_path / "afile")))
    storage = open_storage(StorageConfig(root=str(tmp_path / "new")))
    storage.check()  # made, written to and left empty
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())
