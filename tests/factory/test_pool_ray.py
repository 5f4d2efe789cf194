"""The pool built by the Ray Data job (shards -> parts -> CLIP actor pool -> index) holds the
same embeddings as embedding the images directly."""

import hashlib
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from factory.dataset.pool import ImagePool, build_pool_from_shards
from factory.dataset.shards import encode_shard
from factory.framework import layout
from factory.framework.config import ActorPool, StorageConfig
from factory.framework.executor import RunChanged
from factory.framework.images import decode_image
from factory.framework.storage import open_storage
from tests.factory.conftest import make_samples


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_pool_built_on_ray_data_matches_direct_embedding(tmp_path, ray_local, tiny_clip):
    from filters.clip import ClipScorer

    config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(config)
    samples = make_samples(10)
    samples[4] = replace(samples[4], target_image=b"not an image")
    shard_keys = {}  # storage key -> sha256, as a manifest lists them
    for number, group in enumerate([samples[:4], samples[4:7], samples[7:]]):
        key = layout.shard("d", "v1", layout.shard_relative("v1", number))
        data = encode_shard(group)
        storage.write_bytes(key, data)
        shard_keys[key] = hashlib.sha256(data).hexdigest()

    make_scorer = partial(ClipScorer, tiny_clip.model_name, tiny_clip.pretrained, model_config=tiny_clip.model_config)
    summary = build_pool_from_shards(storage, config, "rp", shard_keys, make_scorer, ActorPool(concurrency=1),
                                     {"clip": "tiny"}, batch_size=3)
    assert summary == {"images": 9, "rejected": 1, "duplicates": 0}
    assert [key for key in storage.list(layout.pool_dir("rp")) if "/part-" in key] == [
        layout.pool_part("rp", n) for n in range(3)]

    pool = ImagePool.load(storage, "rp")
    good = [s for s in samples if s.target_image != b"not an image"]
    assert pool.image_ids == [s.key for s in good]  # in the shards' order, a part's rows in order
    by_key = {s.key: s.target_image for s in good}
    direct = make_scorer().embed_images([decode_image(by_key[key]) for key in pool.image_ids]).numpy()
    assert np.allclose(pool.vectors(), direct, atol=1e-5)
    assert pool.fetch(pool.image_ids[::-1]) == [by_key[key] for key in pool.image_ids[::-1]]

    # killed after every shard was embedded, before the ids and index: run again, nothing is embedded
    storage.delete(layout.pool_index("rp"))
    storage.delete(layout.pool_ids("rp"))
    again = build_pool_from_shards(storage, config, "rp", shard_keys, no_scorer, ActorPool(concurrency=1),
                                   {"clip": "tiny"}, batch_size=3)
    assert again == summary and np.allclose(ImagePool.load(storage, "rp").vectors(), pool.vectors())
    with pytest.raises(RunChanged, match="clip: 'tiny' -> 'other'"):
        build_pool_from_shards(storage, config, "rp", shard_keys, no_scorer, ActorPool(concurrency=1),
                               {"clip": "other"}, batch_size=3)


def no_scorer():
    raise AssertionError("a finished shard is not embedded again")
