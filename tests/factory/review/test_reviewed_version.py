"""A reviewed version without Label Studio: publish from votes, verify, train on it, union it, report it."""

from __future__ import annotations

import pytest

from factory.dataset.manifest import VersionSpec, load_manifest, read_index, union_versions, verify_version
from factory.framework import layout
from factory.framework.storage import LocalStorage
from factory.report import write_report
from factory.review.publish import publish_reviewed
from factory.review.verdicts import PUBLISHED, REJECTED, Vote, tally
from tests.factory.test_report import Tables, build_root, card_keys


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """v1 of the report's fixture root, reviewed by two people: 8 kept, 1 dropped, 2 split."""
    storage = build_root(LocalStorage(tmp_path_factory.mktemp("root")))
    published = sorted(read_index(storage, "demo", "v1", columns=["key"]).column("key").to_pylist())
    origins = {**{key: PUBLISHED for key in published}, "clipmiss0": REJECTED, "dinomiss0": REJECTED}
    votes = [Vote(key, reviewer, "keep") for key in origins for reviewer in ("user-1", "user-2")
             if key not in published[:3]]
    votes += [Vote(published[0], "user-1", "drop", "not the same dog"), Vote(published[0], "user-2", "drop"),
              Vote(published[1], "user-1", "drop", "<b>blurry</b> & odd"), Vote(published[1], "user-2", "keep"),
              Vote(published[2], "user-1", "keep"), Vote(published[2], "user-2", "drop", "wrong colour")]
    record = {"dataset": "demo", "version": "v1", "project_id": 7, "url": "http://127.0.0.1:1", "created": "now",
              "frame": {"size": 5, "margin": 0.05}, "origins": origins}
    manifest = publish_reviewed(storage, record, tally(origins, votes), "v1-reviewed", "0" * 64)
    return storage, manifest, published


def test_the_reviewed_version_lists_the_kept_samples_and_verifies(reviewed):
    storage, manifest, published = reviewed
    assert sorted(read_index(storage, "demo", "v1-reviewed").column("key").to_pylist()) == published[3:]
    assert verify_version(storage, "demo", "v1-reviewed") == []
    assert sum(shard["version_samples"] for shard in manifest["shards"]) == 8
    assert manifest["funnel"] == {"parent_samples": 11, "written": 8, "rejections": {"review:drop": 1, "review:tie": 2}}


def test_training_reads_only_the_kept_samples_of_the_listed_shards(reviewed):
    from factory.dataset.manifest import version_keys
    from models.training.data import EpochPlan

    storage, manifest, published = reviewed
    keep = version_keys(storage, manifest)
    for world in (1, 2, 5):  # shard mode and dealt mode
        plans = [EpochPlan.build(manifest, world, 0, seed=0, keep=keep) for _ in range(world)]
        steps = plans[0].steps(2)
        keys = [k for rank, plan in enumerate(plans) for b in plan.batches(storage, rank, 2, steps) for k in b.keys]
        assert sorted(keys) == published[3:]


def test_a_union_with_a_reviewed_parent_keeps_reading_through_the_index(reviewed):
    storage, _, published = reviewed
    union = union_versions(storage, VersionSpec("demo", "u2", "union", parents=["v0", "v1-reviewed"]))
    assert union["shards_superset"] and union["samples"] == 5 + 8
    assert verify_version(storage, "demo", "u2") == []


def test_the_report_shows_precision_agreement_and_the_disagreements(reviewed, tmp_path):
    storage, manifest, published = reviewed
    page = write_report(storage, "demo", "v1-reviewed", tmp_path).read_text(encoding="utf-8")
    tables = Tables(page)
    assert tables.row("precision")[1].startswith(f"{8 / 9:.3f}")
    assert tables.row("reviewers")[1] == "2"
    assert tables.row("agreement (pairwise)")[1].startswith(f"{(13 - 2) / 13:.3f}")
    assert sorted(card_keys(page, "disagreement")) == sorted(published[1:3])
    assert set(card_keys(page, "accepted")) <= set(published[3:])  # the gallery shows no sample people dropped
    assert "&lt;b&gt;blurry&lt;/b&gt; &amp; odd" in page and "<b>blurry" not in page
    assert load_manifest(storage, "demo", "v1-reviewed")["review"]["table"] == "review.parquet"
    assert storage.exists(layout.review_verdicts("demo", "v1-reviewed"))


def test_sids_pool_of_a_reviewed_version_holds_only_the_samples_people_kept(reviewed, ray_local, tmp_path_factory):
    """A dropped sample is never a `w`, and one drawn from a job's own reference could not be traced
    to it: the parent's index, which maps pool ids to references, holds only the kept ones."""
    import stages.sid as sid
    from factory.dataset.pool import ImagePool
    from factory.framework.config import FactoryConfig
    from factory.framework.stage import RunContext
    from factory.tiny.clip import build_tiny_clip

    storage, _, published = reviewed
    dropped = set(published[::4])  # one in each of v1's first three shards, listed still for their kept samples
    origins = {key: PUBLISHED for key in published}
    votes = [Vote(key, reviewer, "drop" if key in dropped else "keep") for key in published
             for reviewer in ("user-1", "user-2")]
    record = {"dataset": "demo", "version": "v1", "project_id": 8, "url": "http://127.0.0.1:1", "created": "now",
              "frame": {"size": 0}, "origins": origins}
    manifest = publish_reviewed(storage, record, tally(origins, votes), "v1-spread", "1" * 64)
    assert manifest["shards_superset"] and len(manifest["shards"]) == 4
    clip = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    config = FactoryConfig.model_validate({
        "dataset": "demo", "storage": {"root": storage.root},
        "filter": {"clip_model": clip.model_name, "clip_pretrained": clip.pretrained,
                   "clip_model_config": clip.model_config}})
    name = sid.ensure_pool(RunContext(config), "v1-spread")
    assert ImagePool.load(storage, name).image_ids == sorted(set(published) - dropped)


def test_a_union_of_two_reviewed_children_of_one_version_lists_each_shard_once(reviewed):
    """Two review projects over one version keep different samples of the same shards: the union
    reads each shard once, so training sees every kept sample once."""
    from factory.dataset.manifest import version_keys
    from models.training.data import EpochPlan

    storage, _, published = reviewed
    halves = {"v1-left": set(published[:5]), "v1-right": set(published[5:])}
    for project, (name, kept) in enumerate(halves.items(), start=20):
        origins = {key: PUBLISHED for key in published}
        votes = [Vote(key, reviewer, "keep" if key in kept else "drop") for key in published
                 for reviewer in ("user-1", "user-2")]
        record = {"dataset": "demo", "version": "v1", "project_id": project, "url": "http://127.0.0.1:1",
                  "created": "now", "frame": {"size": 0}, "origins": origins}
        publish_reviewed(storage, record, tally(origins, votes), name, f"{project}" * 32)
    union = union_versions(storage, VersionSpec("demo", "both-halves", "union", parents=list(halves)))
    paths = [shard["path"] for shard in union["shards"]]
    assert len(paths) == len(set(paths)) and union["samples"] == len(published)
    assert verify_version(storage, "demo", "both-halves") == []
    plan = EpochPlan.build(union, 1, 0, seed=0, keep=version_keys(storage, union))
    keys = [key for batch in plan.batches(storage, 0, 2, plan.steps(2)) for key in batch.keys]
    assert sorted(keys) == published
