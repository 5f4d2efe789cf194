"""Two publishers of one version name: one wins, the other fails clearly, nothing is mixed.

Runs `a` and `b` are whole copies of one finished run (plan and every stage's unit files)
except that every user text of `b` ends in " (b)", so each sample in the version tells which
run wrote it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from factory.dataset.manifest import load_manifest, version_dir
from factory.dataset.shards import read_shard
from factory.framework.storage import LocalStorage
from tests.reliability.harness import demo_args, sha256_tree, version_facts

LOSER_MESSAGES = ("being published by another run", "published by another run first", "already exists")


def race_root(publish_inputs: Path, dest: Path) -> Path:
    """Runs `a` and `b`: whole copies of the reference run (plan and every stage's unit files,
    each keeping its footer), b's dialogue texts marked; both share the reference set."""
    source, target = LocalStorage(publish_inputs), LocalStorage(dest)
    for key in source.list("references"):
        target.write_bytes(key, source.read_bytes(key))
    for key in source.list("runs/demo"):
        relative = key.removeprefix("runs/demo/")
        target.write_bytes(f"runs/a/{relative}", source.read_bytes(key))
        if not relative.startswith("dialogue/"):
            target.write_bytes(f"runs/b/{relative}", source.read_bytes(key))
            continue
        table = source.read_parquet(key)
        rows = table.to_pandas()
        rows["user"] = rows["user"].map(lambda text: None if text is None else f"{text} (b)")
        marked = pa.Table.from_pandas(rows, preserve_index=False).replace_schema_metadata(table.schema.metadata)
        target.write_parquet(f"runs/b/{relative}", marked)
    return dest


def publish_job(name: str, root: Path, version: str, logs: Path, faults: dict | None = None) -> dict:
    return {"id": name, "argv": demo_args("publish", str(root), f"run_id={name}", f"publish.version={version}"),
            "faults": faults or {}, "out": str(logs / f"{name}.out"), "err": str(logs / f"{name}.err")}


def writer_of(storage, version: str) -> set[str]:
    """Which runs the samples of a version came from, read from the shards themselves."""
    manifest = load_manifest(storage, "demo", version)
    runs = set()
    for shard in manifest["shards"]:
        for sample in read_shard(storage, f"{version_dir('demo', version)}/{shard['path']}"):
            runs.add("b" if sample.user.endswith(" (b)") else "a")
    return runs


def assert_one_winner(results: dict, logs: Path, storage, version: str) -> str:
    winners = [name for name, result in results.items() if result["rc"] == 0]
    losers = [name for name, result in results.items() if result["rc"] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    message = (logs / f"{losers[0]}.err").read_text()
    assert results[losers[0]]["rc"] == 1 and any(text in message for text in LOSER_MESSAGES), message[-1500:]
    facts = version_facts(storage, "demo", version)
    assert facts["problems"] == []
    assert writer_of(storage, version) == {winners[0]}, "the version mixes samples of both publishers"
    assert load_manifest(storage, "demo", version)["run_id"] == winners[0]
    return winners[0]


@pytest.mark.slow
def test_simultaneous_publishers_one_wins_and_nothing_is_mixed(fork_server, publish_inputs, tmp_path):
    root = race_root(publish_inputs, tmp_path / "root")
    storage = LocalStorage(root)
    for round_ in range(3):
        version, logs = f"race{round_}", tmp_path / f"logs{round_}"
        logs.mkdir()
        # Both reach their first write (the publish lock) and wait for each other, then go on
        # with slowed writes so their steps interleave.
        jobs = [publish_job(name, root, version, logs, {
            "gate_at_write": 1, "gate_marker": str(tmp_path / f"{version}-{name}"),
            "gate_file": str(tmp_path / f"{version}-{other}.reached"), "write_delay_s": 0.02 * (round_ + 1),
        }) for name, other in (("a", "b"), ("b", "a"))]
        assert_one_winner(fork_server.run(jobs), logs, storage, version)


@pytest.mark.slow
def test_publisher_that_checked_before_the_winner_finished_cannot_overwrite_it(
        fork_server, publish_inputs, tmp_path):
    """b checks that the version is free, then stalls; a publishes the whole version and
    releases its lock; b wakes up and must not write a byte into a's version."""
    root = race_root(publish_inputs, tmp_path / "root")
    storage = LocalStorage(root)
    folder = root / "datasets" / "demo" / "late"
    logs = tmp_path / "logs"
    logs.mkdir()
    late = publish_job("b", root, "late", logs, {
        "gate_at_write": 1, "gate_marker": str(tmp_path / "b"),
        "gate_file": str(folder / "manifest.json"), "gate_absent": str(folder / "_publishing.json"),
    })
    first = publish_job("a", root, "late", logs, {"gate_at_write": 1, "gate_file": str(tmp_path / "b.reached")})
    results = fork_server.run([first, late])
    assert results["a"]["rc"] == 0, (logs / "a.err").read_text()[-1500:]
    assert assert_one_winner(results, logs, storage, "late") == "a"


@pytest.mark.slow
def test_publishing_never_overwrites_an_existing_version(fork_server, publish_inputs, tmp_path):
    root = race_root(publish_inputs, tmp_path / "root")
    logs = tmp_path / "logs"
    logs.mkdir()
    assert fork_server.run([publish_job("a", root, "kept", logs)])["a"]["rc"] == 0
    folder = root / "datasets" / "demo" / "kept"
    before = sha256_tree(folder)
    other = fork_server.run([publish_job("b", root, "kept", logs)])["b"]
    assert other["rc"] == 2 and "already exists" in (logs / "b.err").read_text()  # a refusal: bad input
    again = fork_server.run([publish_job("a", root, "kept", logs)])["a"]
    assert again["rc"] == 0, (logs / "a.err").read_text()[-1500:]
    assert sha256_tree(folder) == before
    assert writer_of(LocalStorage(root), "kept") == {"a"}
