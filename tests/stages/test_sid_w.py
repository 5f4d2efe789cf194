"""SID's `w`: retrieved from a stored pool (nearest image by CLIP text-image cosine), or drawn by
Stable Diffusion on a Ray Data actor pool and stored once under the run. The plan holds `w_id`
only; `ImageJoin` fetches the bytes by id."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from factory import layout
from factory.config import FactoryConfig
from factory.context import RunContext
from factory.images import decode_image
from factory.pool import build_pool
from factory.units import ImageJoin
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


def jobs(count: int) -> pd.DataFrame:
    texts = ["a dog on the beach", "a red car in the snow", "a cat wearing a hat", "a blue vase"]
    return pd.DataFrame({"instruction": [texts[n % len(texts)] for n in range(count)], "seed": range(11, 11 + count)})


def test_retrieved_w_is_the_nearest_pool_image(tmp_path, tiny_clip):
    from stages.sid import attach_w, clip_scorer

    ctx = make_ctx(tmp_path, tiny_clip, sid={"pool": "given"})
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
    from stages.sid import attach_w

    with pytest.raises(FileNotFoundError, match="no image pool"):
        attach_w(make_ctx(tmp_path, tiny_clip, sid={"pool": "absent"}), jobs(1), parent="unused")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from factory.tiny.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")



def test_sd_w_is_drawn_on_an_actor_pool_with_each_jobs_seed(tmp_path, tiny_sd, ray_local):
    from stages.sid import WDrawer, attach_w, drawn_w_id

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

    direct = WDrawer(tiny_sd, 2, 64)(planned)  # the callable on its own, no Ray
    for data, image in zip(direct["w_image"], drawn):
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
