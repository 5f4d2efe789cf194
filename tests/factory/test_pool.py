import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.dataset import pool as pool_module
from factory.dataset.pool import ImagePool, build_index, build_pool, search_index
from factory.framework import images as stored_images
from factory.framework import layout
from tests.factory.conftest import jpeg


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip
    from filters.clip import ClipScorer

    tiny = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    return ClipScorer(tiny.model_name, tiny.pretrained, model_config=tiny.model_config)


def numpy_cosine_top_k(pool: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = queries @ pool.T
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(similarity, top, axis=1)


@pytest.mark.parametrize("exact_limit", [pool_module.EXACT_LIMIT, 0], ids=["flat", "hnsw"])
def test_index_returns_the_exact_cosine_neighbours(exact_limit):
    rng = np.random.default_rng(0)
    # norms vary by 100x, so a search that skipped normalising would rank by length instead of angle
    vectors = rng.normal(size=(200, 32)) * rng.uniform(0.1, 10.0, size=(200, 1))
    queries = rng.normal(size=(9, 32)) * rng.uniform(0.1, 10.0, size=(9, 1))
    index = build_index(vectors, exact_limit=exact_limit)
    assert hasattr(index, "hnsw") == (exact_limit == 0)
    indices, scores = search_index(index, queries, k=5)
    expected, expected_scores = numpy_cosine_top_k(vectors, queries, 5)
    assert indices.shape == (9, 5)
    assert (indices == expected).all()
    assert np.allclose(scores, expected_scores, atol=1e-5)


def test_search_checks_its_arguments():
    index = build_index(np.eye(4))
    with pytest.raises(ValueError, match="dimension"):
        search_index(index, np.ones((1, 3)), k=1)
    assert search_index(index, np.ones((1, 4)), k=10)[0].shape == (1, 4)  # k capped at the pool size


def test_pool_round_trip_and_exact_search(storage, scorer):
    images = [(f"img{n}", jpeg(n, size=40)) for n in range(7)] + [("broken", b"not an image")]
    summary = build_pool(storage, "p", images, scorer, batch_size=3, part_size=4)
    assert summary == {"images": 7, "rejected": 1, "duplicates": 0}
    pool = ImagePool.load(storage, "p")
    assert pool.image_ids == sorted(f"img{n}" for n in range(7))
    direct = scorer.embed_images([pool_module.decode_image(jpeg(n, size=40)) for n in range(7)]).numpy()
    assert np.allclose(pool.vectors(), direct[[int(i[3:]) for i in pool.image_ids]], atol=1e-5)
    queries = scorer.embed_texts(["a photo of a dog", "a red square"]).numpy()
    indices, scores = pool.search(queries, k=3)
    expected, expected_scores = numpy_cosine_top_k(pool.vectors(), queries, 3)
    assert (indices == expected).all() and np.allclose(scores, expected_scores, atol=1e-5)
    own, own_scores = pool.search(pool.vectors()[:2], k=1)
    assert list(own[:, 0]) == [0, 1] and np.allclose(own_scores[:, 0], 1.0, atol=1e-5)
    names, _ = pool.search_ids(queries, k=3)
    assert names == [[pool.image_ids[i] for i in row] for row in indices]


def test_images_are_fetched_by_id_from_their_row_groups_only(storage, scorer, monkeypatch):
    monkeypatch.setattr(stored_images, "ROW_GROUP", 2)
    images = {f"img{n:02d}": jpeg(n, size=32) for n in range(12)}
    build_pool(storage, "f", list(images.items()), scorer, part_size=6)  # 2 parts of 3 row groups
    pool = ImagePool.load(storage, "f")
    read = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        read.append(list(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    storage.delete(layout.pool_part("f", 0))  # the wanted images all live in part 1
    wanted = ["img11", "img06", "img11", "img07"]  # rows 5, 0, 1 of part 1: row groups 2 and 0, not 1
    assert pool.fetch(wanted) == [images[name] for name in wanted]
    assert read == [[0, 2]]
    with pytest.raises(KeyError, match="no image 'nope'"):
        pool.fetch(["img07", "nope"])


def test_missing_pool_is_a_clear_error(storage):
    with pytest.raises(FileNotFoundError, match="no image pool"):
        ImagePool.load(storage, "nope")
