"""A published version whose shard was changed afterwards: every reader refuses it, naming the shard.

One byte of one shard of v1 (the report fixture's SID version, 3 shards) is flipped; rethreshold,
union and training read v1 and must refuse before anything is published (review export is
in tests/factory/review/test_review_roundtrip.py, beside the Label Studio server it needs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.dataset.manifest import VersionError, list_versions, load_manifest, shard_key
from factory.framework.storage import LocalStorage
from factory.versions import main
from models.training.data import EpochPlan
from tests.factory.test_report import build_root


def flip_a_byte(storage, manifest, number: int = 1) -> str:
    """Flip one byte in the middle of the manifest's shard `number`; return its storage URL."""
    key = shard_key(manifest, manifest["shards"][number]["path"])
    path = Path(storage.url(key))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return storage.url(key)


@pytest.fixture
def tampered(tmp_path):
    storage = build_root(LocalStorage(tmp_path / "root"))
    shard = flip_a_byte(storage, load_manifest(storage, "demo", "v1"))
    return storage, shard


def versions(storage, capsys, *args) -> tuple[int, str]:
    code = main(["--set", f"storage.root={storage.root}", "--set", "dataset=demo",
                 "--set", "publish.executor=local", *args])
    out, err = capsys.readouterr()
    return code, out + err


def assert_refused(storage, code: int, said: str, shard: str, child: str) -> None:
    assert code == 2, said
    assert shard in said and "does not match its manifest" in said
    assert child not in [manifest["version"] for manifest in list_versions(storage, "demo")]
    assert not list(Path(storage.root).glob("datasets/**/_publishing.json"))


def test_rethreshold_refuses_a_tampered_parent(tampered, capsys):
    storage, shard = tampered
    code, said = versions(storage, capsys, "rethreshold", "v1", "v1strict", "--threshold", "clip_t=0.31")
    assert_refused(storage, code, said, shard, "v1strict")


def test_union_refuses_a_tampered_parent(tampered, capsys):
    storage, shard = tampered
    code, said = versions(storage, capsys, "union", "u2", "v0", "v1")
    assert_refused(storage, code, said, shard, "u2")


@pytest.mark.parametrize("world", [1, 4])  # 1: whole shards per rank; 4 ranks over 3 shards: samples dealt
def test_training_refuses_a_tampered_shard(tampered, world):
    storage, shard = tampered
    plan = EpochPlan.build(load_manifest(storage, "demo", "v1"), world, 0, seed=0)
    with pytest.raises(VersionError, match="does not match its manifest") as raised:
        for rank in range(world):
            list(plan.samples(storage, rank))
    assert shard in str(raised.value)


def test_a_union_of_a_tampered_parent_is_refused_when_trained_on(tampered):
    storage, shard = tampered
    union = load_manifest(storage, "demo", "u1")  # made before the byte flipped: it lists v1's shards
    plan = EpochPlan.build(union, 1, 0, seed=0)
    with pytest.raises(VersionError, match="does not match its manifest"):
        list(plan.samples(storage, 0))
