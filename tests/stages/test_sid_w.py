"""SID's `w`: retrieved from a stored pool (nearest image by CLIP text-image cosine), or drawn by
Stable Diffusion on a Ray Data actor pool and stored once under the run. The plan holds `w_id`
only; `ImageJoin` fetches the bytes by id."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from factory.dataset.pool import ImagePool, build_pool
from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.images import decode_image
from factory.framework.stage import RunContext
from factory.framework.units import ImageJoin
from tests.factory.conftest import jpeg


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def make_ctx(root: Path, tiny_clip=None, **sections) -> RunContext:
    raw = {"run_id": "w", "storage": {"root": str(root)}, **sections}
    if tiny_clip is not None:
        raw["filter"] = {"clip_model": tiny_clip.model_name, "clip_pretrained": tiny_clip.pretrained,
                         "clip_model_config": tiny_clip.model_config}
    return RunContext(FactoryConfig.model_validate(raw))


def joined_w(ctx: RunContext, planned: pd.DataFrame) -> list:
    """The `w` bytes generate gets for these plan rows."""
    return ImageJoin(ctx.storage, ctx.config.run_id).add(planned.copy(), ("w_image",))["w_image"].tolist()


def attach_w(ctx: RunContext, jobs: pd.DataFrame, parent: str) -> pd.DataFrame:
    """Every job's `w` as `plan_round` gives it: the pool image retrieved for its instruction
    (`pool:<id>`), or an SD drawing (`sd:<id>`) drawn once per id and stored under the run."""
    from stages.sid import draw_w_images, find_retrieval, store_drawn_w, with_drawn_w_ids

    if ctx.config.sid.w_source == "generate":
        jobs = with_drawn_w_ids(jobs)
        drawn = jobs.drop_duplicates("w_id")
        store_drawn_w(ctx, draw_w_images(ctx, drawn))
        return jobs
    return find_retrieval(ctx, parent, jobs["instruction"].tolist()).attach(ctx.storage, jobs)


def store_parent(ctx: RunContext, drawn: dict[str, str]) -> None:
    """A stored parent version whose samples (by key) were drawn from the references `drawn` names."""
    index = pa.table({"key": list(drawn), "reference_id": list(drawn.values())})
    ctx.storage.write_parquet(layout.index(ctx.config.dataset, "parent"), index)
    ctx.storage.write_bytes(layout.manifest(ctx.config.dataset, "parent"), b"{}")


def jobs(count: int) -> pd.DataFrame:
    texts = ["a dog on the beach", "a red car in the snow", "a cat wearing a hat", "a blue vase"]
    return pd.DataFrame({"instruction": [texts[n % len(texts)] for n in range(count)], "seed": range(11, 11 + count)})


def test_retrieved_w_with_top_k_1_is_the_nearest_pool_image(tmp_path, tiny_clip):
    from stages.sid import clip_scorer

    ctx = make_ctx(tmp_path, tiny_clip, sid={"pool": "given", "w_top_k": 1})
    scorer = clip_scorer(ctx.config)
    images = {f"img{n:02d}": jpeg(n, size=32) for n in range(9)}
    build_pool(ctx.storage, "given", list(images.items()), scorer, part_size=4)

    out = attach_w(ctx, jobs(4), parent="unused")
    names = sorted(images)
    vectors = scorer.embed_images([decode_image(images[name]) for name in names]).numpy()
    queries = scorer.embed_texts(jobs(4)["instruction"].tolist()).numpy()
    nearest = [names[i] for i in np.argmax(queries @ vectors.T, axis=1)]
    assert out["w_id"].tolist() == [f"pool:{name}" for name in nearest]
    assert "w_image" not in out and out["w_pool"].tolist() == ["given"] * 4
    assert joined_w(ctx, out) == [images[name] for name in nearest]


def test_a_named_pool_that_is_missing_is_an_error(tmp_path, tiny_clip):

    with pytest.raises(FileNotFoundError, match="no image pool"):
        attach_w(make_ctx(tmp_path, tiny_clip, sid={"pool": "absent"}), jobs(1), parent="unused")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from factory.tiny.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")



def test_sd_w_is_drawn_on_an_actor_pool_with_each_jobs_seed(tmp_path, tiny_sd, ray_local):
    from models.sd_drawer import StableDiffusionDrawer
    from stages.sid import drawn_w_id

    ctx = make_ctx(tmp_path, sid={"w_source": "generate"},
                   references={"sd_model": tiny_sd, "sd_steps": 2, "sd_size": 64})
    planned = jobs(3)
    planned.loc[2, ["instruction", "seed"]] = [planned.loc[0, "instruction"], planned.loc[0, "seed"]]
    out = attach_w(ctx, planned.copy(), parent="unused")
    assert out["w_id"].tolist() == [drawn_w_id(planned.loc[n, "instruction"], planned.loc[n, "seed"]) for n in range(3)]
    assert out["w_id"][0] == out["w_id"][2] != out["w_id"][1] and out["w_id"][0].startswith("sd:11-")
    assert "w_image" not in out
    stored = ctx.storage.read_parquet(layout.run_w_ids("w")).to_pandas()
    assert sorted(stored["image_id"]) == sorted(w_id[len("sd:"):] for w_id in set(out["w_id"]))  # once each
    joined = joined_w(ctx, out)
    assert joined[0] == joined[2]  # one stored image for the same instruction and seed
    drawn = [np.asarray(decode_image(data)) for data in joined]
    assert all(image.shape == (64, 64, 3) for image in drawn)

    direct = StableDiffusionDrawer(ctx.config.references)(planned.rename(columns={"instruction": "prompt"}))
    for data, image in zip(direct["image"], drawn):  # the drawer on its own, no Ray
        assert np.abs(np.asarray(decode_image(data)).astype(int) - image.astype(int)).max() <= 2
    assert np.abs(drawn[0].astype(int) - drawn[1].astype(int)).mean() > 1  # another instruction and seed


def test_one_seed_under_two_instructions_is_two_w_images():
    from stages.sid import drawn_w_id

    assert drawn_w_id("a dog on the beach", 11) != drawn_w_id("a red car in the snow", 11)
    assert drawn_w_id("a dog on the beach", 11) == drawn_w_id("a dog on the beach", 11)


def test_the_sid_plan_holds_no_image_bytes():
    import pyarrow as pa

    from stages.sid import plan_schema

    schema = plan_schema()
    assert "w_id" in schema.names and "w_pool" in schema.names
    binary = [field.name for field in schema if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)]
    assert binary == []


# --- variety: a seeded pick among the top k, never the job's own reference -----------------------


def test_choose_w_picks_within_the_top_k_eligible_and_is_seeded():
    from stages.sid import choose_w

    nearest = [["own", "a", "b", "c", "d", "e"]] * 200
    excluded = [{"own", "b"}] * 200
    seeds = [[0, n] for n in range(200)]
    chosen = choose_w(nearest, excluded, 3, seeds)
    assert set(chosen) == {"a", "c", "d"}  # the three nearest once "own" and "b" are left out
    assert choose_w(nearest, excluded, 3, seeds) == chosen  # the same seeds, the same picks
    assert choose_w(nearest, excluded, 3, [[1, n] for n in range(200)]) != chosen
    assert choose_w([["own", "a", "b"]], [{"own"}], 1, [[0, 1]]) == ["a"]
    assert choose_w([["own", "b"]], [{"own", "b"}], 3, [[0, 1]]) == [None]


def test_excluded_w_is_the_reference_and_what_was_drawn_from_it():
    from stages.sid import excluded_w

    jobs = pd.DataFrame({"reference_id": ["refA", "refB"]})
    sources = {"keyA1": "refA", "keyA2": "refA", "keyB1": "refB"}
    assert excluded_w(jobs, sources) == [{"refA", "keyA1", "keyA2"}, {"refB", "keyB1"}]
    assert excluded_w(pd.DataFrame({"seed": [1]}), sources) == [set()]


def test_retrieval_varies_w_and_never_uses_the_jobs_own_images(tmp_path, tiny_clip, monkeypatch):
    from stages.sid import clip_scorer, w_variety

    ctx = make_ctx(tmp_path, tiny_clip, sid={"pool": "given", "w_top_k": 4})
    images = {f"img{n:02d}": jpeg(n, size=32) for n in range(9)}
    images["refB"] = jpeg(40, size=32)  # the reference itself sits in the pool
    build_pool(ctx.storage, "given", list(images.items()), clip_scorer(ctx.config), part_size=4)
    drawn = {"img00": "refA", "img01": "refA", "img02": "refA", "img03": "refB"}
    store_parent(ctx, drawn)
    planned = pd.DataFrame({"instruction": ["a dog on the beach"] * 40, "instruction_id": ["beach"] * 40,
                            "reference_id": ["refA", "refB"] * 20, "seed": range(40)})

    out = attach_w(ctx, planned.copy(), parent="parent")
    again = attach_w(ctx, planned.copy(), parent="parent")

    assert out["w_id"].tolist() == again["w_id"].tolist()  # seeded by the job
    for reference, own in [("refA", {"img00", "img01", "img02", "refA"}), ("refB", {"img03", "refB"})]:
        used = {w[len("pool:"):] for w in out.loc[out["reference_id"] == reference, "w_id"]}
        assert used and not used & own
        assert len(used) > 1  # not one w for every job of the instruction
    assert w_variety(out) == {"beach": out["w_id"].nunique()} and out["w_id"].nunique() > 2


def test_one_search_per_distinct_instruction_chooses_what_a_search_per_job_chooses(tmp_path, tiny_clip, monkeypatch):
    import stages.sid as sid
    from stages.sid import choose_w, clip_scorer, embed_texts, excluded_w

    ctx = make_ctx(tmp_path, tiny_clip, sid={"pool": "given", "w_top_k": 3})
    scorer = clip_scorer(ctx.config)
    images = {f"img{n:02d}": jpeg(n, size=32) for n in range(12)}
    build_pool(ctx.storage, "given", list(images.items()), scorer, part_size=4)
    pool = ImagePool.load(ctx.storage, "given")
    drawn = {"img00": "refA", "img01": "refA", "img05": "refB", "img07": "refC"}  # each job's own images
    store_parent(ctx, drawn)
    encoded = []

    def counting(scorer, texts):
        encoded.append(len(texts))
        return embed_texts(scorer, texts)

    monkeypatch.setattr(sid, "embed_texts", counting)
    planned = jobs(30).assign(reference_id=[("refA", "refB", "refC")[n % 3] for n in range(30)])

    out = attach_w(ctx, planned.copy(), parent="parent")

    assert encoded == [4]  # four distinct instructions for thirty jobs
    excluded = excluded_w(planned, drawn)
    per_job, _ = pool.search_ids(embed_texts(scorer, planned["instruction"].tolist()), k=len(images))
    seeds = [[ctx.config.sid.seed, int(seed)] for seed in planned["seed"]]
    expected = choose_w(per_job, excluded, 3, seeds)
    assert out["w_id"].tolist() == [f"pool:{image_id}" for image_id in expected]
    assert not any(w[len("pool:"):] in banned for w, banned in zip(out["w_id"], excluded))
