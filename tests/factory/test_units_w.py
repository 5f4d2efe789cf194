"""`ImageJoin` puts `w` back by `w_id`: pool images from the pool a row names, SD-drawn ones from
the run's drawn set, only the ids a unit names, and None (not an error) for an id not stored."""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest

from factory.dataset.pool import ImagePool, build_pool
from factory.framework import images as stored_images
from factory.framework import layout
from factory.framework.images import store_images
from factory.framework.units import ImageJoin, without_images
from tests.factory.conftest import jpeg

RUN = "r-sid1"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """The pool's embeddings come from a real (tiny, random-weight) CLIP, as `build_pool` gets them in a run."""
    from factory.tiny.clip import build_tiny_clip
    from filters.clip import ClipScorer

    tiny = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    return ClipScorer(tiny.model_name, tiny.pretrained, model_config=tiny.model_config)


@pytest.fixture
def stored(storage, scorer):
    """A pool `p` of 10 images (parts of 4) and a drawn set of 3 images under the run."""
    pool_images = {f"img{n}": jpeg(n) for n in range(10)}
    build_pool(storage, "p", list(pool_images.items()), scorer, part_size=4)
    drawn = {"11-aaa": jpeg(100), "12-bbb": jpeg(101), "13-ccc": jpeg(102)}
    store_images(storage, partial(layout.run_w_part, RUN), layout.run_w_ids(RUN), list(drawn.items()), part_size=2)
    return pool_images, drawn


def unit_rows(pairs: list[tuple[str | None, str | None]]) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{n}" for n in range(len(pairs))], "unit": 0,
                         "w_id": [w_id for w_id, _ in pairs], "w_pool": [pool for _, pool in pairs]})


def test_w_is_joined_by_id_from_the_pool_and_the_drawn_set(storage, stored, monkeypatch):
    pool_images, drawn = stored
    reads = []
    real = stored_images.read_part_rows
    monkeypatch.setattr(stored_images, "read_part_rows", lambda s, key, rows: reads.append((key, sorted(rows)))
                        or real(s, key, rows))
    rows = unit_rows([("pool:img5", "p"), ("sd:12-bbb", None), (None, None), ("pool:img0", "p"),
                      ("sd:11-aaa", None), ("pool:img5", "p")])
    out = ImageJoin(storage, RUN).add(rows, ("w_image",))
    expected = [pool_images["img5"], drawn["12-bbb"], None, pool_images["img0"], drawn["11-aaa"], pool_images["img5"]]
    assert out["w_image"].tolist() == expected
    # only the asked-for ids are read: img0 (part 0 row 0), img5 (part 1 row 1), 11-aaa and 12-bbb (part 0)
    assert sorted(reads) == [(layout.pool_part("p", 0), [0]), (layout.pool_part("p", 1), [1]),
                             (layout.run_w_part(RUN, 0), [0, 1])]
    assert out["w_image"][0] == ImagePool.load(storage, "p").fetch(["img5"])[0]  # the stored bytes


def test_a_w_id_that_is_not_stored_joins_as_none(storage, stored):
    pool_images, _ = stored
    rows = unit_rows([("pool:nope", "p"), ("sd:99-zzz", None), ("pool:img1", "no-such-pool"), ("pool:img1", None),
                      ("odd:1", None), ("pool:img1", "p")])
    out = ImageJoin(storage, RUN).add(rows, ("w_image",))
    assert out["w_image"].tolist() == [None, None, None, None, None, pool_images["img1"]]
    other_run = ImageJoin(storage, "another-run").add(unit_rows([("sd:11-aaa", None)]), ("w_image",))
    assert other_run["w_image"].tolist() == [None]  # drawn sets are per run


def test_bootstrap_rows_read_nothing_for_w(storage, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a bootstrap unit read storage for w")

    for name in ("exists", "read_parquet", "read_bytes"):
        monkeypatch.setattr(storage, name, no_reads)
    out = ImageJoin(storage, RUN).add(unit_rows([(None, None), (None, None)]), ("w_image",))
    assert out["w_image"].tolist() == [None, None]
    no_w_column = ImageJoin(storage, RUN).add(pd.DataFrame({"key": ["k"], "unit": [0]}), ("w_image",))
    assert no_w_column["w_image"].tolist() == [None]


def test_a_stage_that_did_not_draw_w_does_not_write_it():
    rows = pd.DataFrame({"key": ["k"], "w_id": ["sd:1-a"], "w_image": [b"w"], "target_image": [b"t"]})
    assert list(without_images(rows, keep=("target_image",)).columns) == ["key", "w_id", "target_image"]


def test_stored_images_keep_the_first_of_a_repeated_id(storage):
    count = store_images(storage, partial(layout.run_w_part, RUN), layout.run_w_ids(RUN),
                         [("a", b"first"), ("b", b"bee"), ("a", b"second")])
    assert count == 2
    out = ImageJoin(storage, RUN).add(unit_rows([("sd:a", None), ("sd:b", None)]), ("w_image",))
    assert out["w_image"].tolist() == [b"first", b"bee"]
