"""A SID round is planned per partition like the bootstrap's plan: the same plan, byte for byte,
however many partitions are drawn at once, here or by Ray tasks with the retrieval on an actor
pool; an alpha sweep keeps one job's seed and `w` for every alpha; no job's `w` is its own
reference's image."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import stages.sid as sid
from factory.dataset import planning
from factory.dataset.pool import build_pool
from factory.dataset.reference_sets import write_parts
from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.images import decode_image
from factory.framework.stage import RunContext
from factory.framework.units import ImageJoin, plan_index, read_plan
from tests.factory.conftest import jpeg

SUBJECTS = [("object", "dog"), ("object", "teapot"), ("human", "person")]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def round_context(root, tiny_clip, executor="local", references=None, **sid_settings) -> RunContext:
    ctx = RunContext(FactoryConfig.model_validate({
        "run_id": "r", "storage": {"root": str(root)}, "references": {"set": "refs", **(references or {})},
        "plan": {"executor": executor},
        "filter": {"clip_model": tiny_clip.model_name, "clip_pretrained": tiny_clip.pretrained,
                   "clip_model_config": tiny_clip.model_config},
        "sid": {"pool": "given", "jobs_per_reference": 2, "unit_size": 3, **sid_settings}}))
    rows = ({"reference_id": f"ref{n:03d}", "image": jpeg(n, size=16), "width": 16, "height": 16,
             "subject": SUBJECTS[n % 3][1], "domain": SUBJECTS[n % 3][0], "source": "test", "origin": f"t/{n}",
             "prompt": None, "seed": n} for n in range(8))
    write_parts(ctx.storage, "refs", rows, part_size=2)
    ctx.storage.write_bytes(layout.reference_complete("refs"), b"{}")
    images = [(f"img{n:02d}", jpeg(50 + n, size=32)) for n in range(10)] + [("ref003", jpeg(3, size=16))]
    build_pool(ctx.storage, "given", images, sid.clip_scorer(ctx.config), part_size=4)
    store_parent(ctx)
    return ctx


def store_parent(ctx: RunContext) -> None:
    """The parent version's index and manifest: two samples drawn from ref003 (in the pool as img00, img01)."""
    dataset = ctx.config.dataset
    index = pa.table({"key": ["img00", "img01", "k2"], "category": ["scene"] * 3,
                      "reference_id": ["ref003", "ref003", "ref005"]})
    ctx.storage.write_parquet(layout.index(dataset, "parent"), index)
    ctx.storage.write_bytes(layout.manifest(dataset, "parent"), b"{}")


@pytest.fixture
def parent(monkeypatch):
    monkeypatch.setattr(planning, "PARTITION_JOBS", 6)  # several partitions of eight references


def run_files(ctx: RunContext) -> dict[str, bytes]:
    prefix = layout.run_dir(ctx.config.run_id)
    return {key[len(prefix):]: ctx.storage.read_bytes(key) for key in ctx.storage.list(prefix)}


@pytest.mark.parametrize("alpha_mode", ["random", "sweep"])
def test_a_round_is_drawn_the_same_in_partitions_every_time(tmp_path, tiny_clip, parent, alpha_mode):
    drawn = {}
    for folder in ("first", "second"):
        ctx = round_context(tmp_path / folder, tiny_clip, alpha_mode=alpha_mode)
        written = sid.plan_round(ctx, "parent", 1, "g")
        drawn[folder] = run_files(ctx)
    assert drawn["first"] == drawn["second"]
    assert plan_index(ctx.storage, "r").meta["partitions"] > 2
    jobs = pa.concat_tables(read_plan(ctx.storage, "r")).to_pandas()
    assert written == {"jobs": len(jobs), "units": jobs["unit"].nunique()} and jobs["key"].is_unique
    alphas = len(ctx.config.sid.alphas) if alpha_mode == "sweep" else 1
    assert len(jobs) == 8 * 2 * alphas  # every reference has instructions in its domain, every job a w
    per_job = jobs.groupby(["reference_id", "seed"])
    assert (per_job["alpha"].nunique() == alphas).all() and (per_job["w_id"].nunique() == 1).all()
    own = jobs.loc[jobs["reference_id"] == "ref003", "w_id"]
    assert not set(own) & {"pool:img00", "pool:img01", "pool:ref003"}
    assert set(jobs["round"]) == {1} and jobs["instruction"].str.contains("person|dog|teapot").all()


@pytest.mark.usefixtures("ray_local")
def test_a_round_drawn_by_ray_tasks_and_searched_on_an_actor_pool_is_the_one_drawn_here(tmp_path, tiny_clip,
                                                                                        parent):
    drawn = {}
    for executor in ("local", "ray"):
        ctx = round_context(tmp_path / executor, tiny_clip, executor, w_top_k=2)
        sid.plan_round(ctx, "parent", 1, "g")
        drawn[executor] = run_files(ctx)
    assert drawn["local"] == drawn["ray"]
    jobs = pa.concat_tables(read_plan(ctx.storage, "r")).to_pandas()
    assert plan_index(ctx.storage, "r").meta["partitions"] > 2 and jobs["w_id"].nunique() > 2
    own = jobs.loc[jobs["reference_id"] == "ref003", "w_id"]
    assert len(own) and not set(own) & {"pool:img00", "pool:img01", "pool:ref003"}


def test_the_retrieval_is_searched_once_per_distinct_instruction_of_the_round(tmp_path, tiny_clip, parent,
                                                                              monkeypatch):
    searched = []
    search = sid.PoolSearch.__call__

    def counting(self, batch):
        searched.extend(batch["text"])
        return search(self, batch)

    monkeypatch.setattr(sid.PoolSearch, "__call__", counting)
    ctx = round_context(tmp_path, tiny_clip)
    sid.plan_round(ctx, "parent", 1, "g")
    jobs = pa.concat_tables(read_plan(ctx.storage, "r")).to_pandas()
    assert sorted(searched) == sorted(jobs["instruction"].unique()) and len(searched) < len(jobs)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from factory.tiny.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.mark.usefixtures("ray_local")
def test_an_sd_drawn_round_draws_each_w_once_after_its_partitions(tmp_path, tiny_clip, tiny_sd, parent, monkeypatch):
    from models.sd_drawer import StableDiffusionDrawer

    calls = []
    real_draw = sid.draw_w_images

    def counting(ctx, jobs, batch_size=4):  # the real SD actor pool, its calls counted
        calls.append(len(jobs))
        return real_draw(ctx, jobs, batch_size)

    monkeypatch.setattr(sid, "draw_w_images", counting)
    ctx = round_context(tmp_path, tiny_clip, w_source="generate", alpha_mode="sweep",
                        references={"sd_model": tiny_sd, "sd_steps": 1, "sd_size": 32})
    sid.plan_round(ctx, "parent", 1, "g")
    jobs = pa.concat_tables(read_plan(ctx.storage, "r")).to_pandas()
    assert plan_index(ctx.storage, "r").meta["partitions"] > 2
    assert jobs["w_id"].str.startswith("sd:").all() and jobs["w_pool"].isna().all()
    assert calls == [jobs["w_id"].nunique()] == [len(jobs) // len(ctx.config.sid.alphas)]  # once, for the round
    stored = ctx.storage.read_parquet(layout.run_w_ids("r")).column("image_id").to_pylist()
    assert sorted(stored) == sorted(w_id[len("sd:"):] for w_id in jobs["w_id"].unique())
    # each stored w is the tiny SD's drawing of its job's instruction and seed
    first = jobs.drop_duplicates("w_id").iloc[:2]
    joined = ImageJoin(ctx.storage, "r").add(first[["key", "unit", "w_id", "w_pool"]].copy(), ("w_image",))
    drawn = [np.asarray(decode_image(data)).astype(int) for data in joined["w_image"]]
    direct = StableDiffusionDrawer(ctx.config.references)(
        pd.DataFrame({"prompt": first["instruction"].tolist(), "seed": first["seed"].tolist()}))
    for data, image in zip(direct["image"], drawn, strict=True):
        assert image.shape == (32, 32, 3) and np.abs(np.asarray(decode_image(data)).astype(int) - image).max() <= 2
    assert np.abs(drawn[0] - drawn[1]).mean() > 1  # another instruction and seed, another drawing


@pytest.mark.usefixtures("ray_local")
def test_a_round_killed_while_sd_draws_its_w_draws_them_when_run_again(tmp_path, tiny_clip, tiny_sd, monkeypatch):
    """The plan is written before its `w` are drawn: run again, the round finds its plan and must
    still draw and store every `w` before any unit runs (else generate rejects every job as w_missing)."""
    ctx = round_context(tmp_path, tiny_clip, w_source="generate",
                        references={"sd_model": tiny_sd, "sd_steps": 1, "sd_size": 32})
    real_draw = sid.draw_w_images

    def node_lost(ctx, jobs, batch_size=4):  # as the real one, a generator: dies after its first drawing is stored
        drawings = real_draw(ctx, jobs, batch_size)
        yield next(drawings)
        raise KeyboardInterrupt("node lost while SD draws w")

    class UnitsStart(Exception):
        pass

    def units_start(rctx, steps):
        raise UnitsStart(rctx.config.run_id)

    monkeypatch.setattr(sid, "draw_w_images", node_lost)
    monkeypatch.setattr(sid, "run_steps", units_start)
    with pytest.raises(KeyboardInterrupt):
        sid.run_round(ctx, "parent", 1, sid.RoundModels("g"))
    run_id = sid.round_context_name(ctx, 1)
    assert plan_index(ctx.storage, run_id) and not ctx.storage.exists(layout.run_w_ids(run_id))
    monkeypatch.setattr(sid, "draw_w_images", real_draw)
    with pytest.raises(UnitsStart):
        sid.run_round(ctx, "parent", 1, sid.RoundModels("g"))
    planned = {w_id[len("sd:"):] for part in read_plan(ctx.storage, run_id, columns=["w_id"])
               for w_id in part.column("w_id").to_pylist()}
    assert set(ctx.storage.read_parquet(layout.run_w_ids(run_id)).column("image_id").to_pylist()) == planned


def test_a_resumed_round_one_keeps_the_parent_its_plan_was_drawn_from(tmp_path, tiny_clip, parent):
    """A newer version published while the night was down (sid.parent unset: the latest) must not
    become round 1's parent once its plan, pool and rarity weights came from another."""
    from factory.dataset.manifest import VersionSpec
    from factory.dataset.publisher import publish_samples
    from factory.framework.config import ConfigError
    from tests.factory.conftest import make_samples

    ctx = round_context(tmp_path, tiny_clip)
    sid.plan_round(sid.round_context(ctx, 1, "g"), "parent", 1, "g")
    assert plan_index(ctx.storage, "r-sid1").meta["parent"] == "parent"
    publish_samples(ctx.storage, VersionSpec(ctx.config.dataset, "newer", "bootstrap"), make_samples(2))
    assert sid.ensure_parent(ctx) == "newer" and sid.first_parent(ctx) == "parent"
    moved = ctx.config.model_copy(update={"sid": ctx.config.sid.model_copy(update={"parent": "newer"})})
    with pytest.raises(ConfigError, match="planned from parent 'parent', and sid.parent is now 'newer'"):
        sid.first_parent(RunContext(moved, ctx.storage))


@pytest.mark.parametrize("configured, loaded", [
    ({"kind": "cafe", "model": "/models/G-old"}, {"model": "/ckpt/G-night5", "checkpoint": None}),
    # a checkpoint over a base model: CAFE loads `checkpoint or model`, so the round's G replaces the checkpoint
    ({"kind": "cafe", "model": "/models/sd2-base", "checkpoint": "/models/G-old"},
     {"model": "/models/sd2-base", "checkpoint": "/ckpt/G-night5"}),
])
def test_a_round_draws_with_the_g_it_was_given_however_the_generator_is_configured(configured, loaded):
    config = FactoryConfig.model_validate({"generate": {"generators": {"cafe": configured}}})
    spec = sid.round_context(RunContext(config), 1, "/ckpt/G-night5").config.generate.generators["cafe"]
    assert {"model": spec.model, "checkpoint": spec.checkpoint} == loaded
