"""CLIP scores are the cosines the open_clip library itself gives for the same model."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from filters.clip import ClipScorer, needs_quick_gelu
from filters.precision import autocast_dtype
from tests.filters.helpers import noise_image

TEXTS = ["a photo of a dog on the beach", "a red car", "an astronaut riding a horse on the moon"]


@pytest.fixture(scope="module")
def direct_model(tiny_clip):
    """The same checkpoint loaded straight through open_clip, outside our scorer."""
    open_clip.add_model_config(tiny_clip.model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny_clip.model_name, pretrained=tiny_clip.pretrained
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_clip.model_name)


def direct_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def test_clip_t_matches_open_clip(clip_scorer, direct_model):
    model, preprocess, tokenizer = direct_model
    images = [noise_image(seed, size=(90 + 7 * seed, 70)) for seed in range(3)]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_features = model.encode_text(tokenizer(TEXTS))
    expected = direct_cosines(image_features, text_features)
    scores = clip_scorer.image_text(images, TEXTS)
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert len(set(np.round(scores, 6))) == 3, "different pairs should give different scores"


def test_clip_i_matches_open_clip(clip_scorer, direct_model):
    model, preprocess, _ = direct_model
    images_a = [noise_image(seed) for seed in range(3)]
    images_b = [noise_image(seed + 10) for seed in range(3)]
    with torch.no_grad():
        features_a = model.encode_image(torch.stack([preprocess(image) for image in images_a]))
        features_b = model.encode_image(torch.stack([preprocess(image) for image in images_b]))
    expected = direct_cosines(features_a, features_b)
    np.testing.assert_allclose(clip_scorer.image_image(images_a, images_b), expected, atol=1e-4)
    np.testing.assert_allclose(clip_scorer.image_image(images_a, images_a), 1.0, atol=1e-4)


def test_embeddings_are_unit_length(clip_scorer):
    images = clip_scorer.embed_images([noise_image(1), noise_image(2)])
    texts = clip_scorer.embed_texts(["a dog", "a cat"])
    np.testing.assert_allclose(images.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_bfloat16_autocast_stays_close(tiny_clip, clip_scorer):
    reduced = ClipScorer(
        tiny_clip.model_name, tiny_clip.pretrained, dtype="bfloat16", model_config=tiny_clip.model_config
    )
    images = [noise_image(seed) for seed in range(3)]
    np.testing.assert_allclose(reduced.image_text(images, TEXTS), clip_scorer.image_text(images, TEXTS), atol=0.05)


def test_auto_dtype_is_float32_on_cpu():
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "bfloat16") == torch.bfloat16


def test_openai_tag_gets_quick_gelu():
    # open_clip 3 builds ViT-B-32 with GELU; OpenAI's weights were trained with QuickGELU.
    assert needs_quick_gelu("ViT-B-32", "openai")
    assert not needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not needs_quick_gelu("ViT-B-32", None)
    assert not needs_quick_gelu("ViT-B-32", "/some/local/checkpoint.pt")
