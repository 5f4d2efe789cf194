import numpy as np
import pytest

from factory.pool import ImagePool, build_pool
from tests.factory.conftest import jpeg


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip
    from filters.clip import ClipScorer

    tiny = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    return ClipScorer(tiny.model_name, tiny.pretrained, model_config=tiny.model_config)


def test_pool_round_trip_and_exact_search(storage, scorer):
    images = [(f"img{n}", jpeg(n, size=40)) for n in range(7)] + [("broken", b"not an image")]
    summary = build_pool(storage, "p", images, scorer, batch_size=3, part_size=4)
    assert summary == {"images": 7, "rejected": 1}
    pool = ImagePool.load(storage, "p")
    assert pool.image_ids == sorted(f"img{n}" for n in range(7))
    queries = scorer.embed_texts(["a photo of a dog", "a red square"]).numpy()
    indices, scores = pool.search(queries, k=3, batch_size=1)
    expected = queries @ pool.embeddings.T
    for row in range(2):
        assert list(indices[row]) == list(np.argsort(-expected[row], kind="stable")[:3])
        assert np.allclose(scores[row], np.sort(expected[row])[::-1][:3], atol=1e-6)
    own, own_scores = pool.search(pool.embeddings[:2], k=1)
    assert list(own[:, 0]) == [0, 1] and np.allclose(own_scores[:, 0], 1.0, atol=1e-5)


def test_missing_pool_is_a_clear_error(storage):
    with pytest.raises(FileNotFoundError, match="no image pool"):
        ImagePool.load(storage, "nope")
