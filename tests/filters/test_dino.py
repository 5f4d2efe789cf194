"""DINO scores are cosines of the CLS embeddings the transformers ViTModel gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, ViTModel

from tests.filters.helpers import noise_image


@pytest.fixture(scope="module")
def direct_model(tiny_dino):
    model = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval()
    return model, AutoImageProcessor.from_pretrained(tiny_dino)


def test_dino_matches_vit_cls_cosine(dino_scorer, direct_model):
    model, processor = direct_model
    images_a = [noise_image(seed, size=(100, 60 + seed)) for seed in range(3)]
    images_b = [noise_image(seed + 20) for seed in range(3)]
    with torch.no_grad():
        cls_a = model(**processor(images=images_a, return_tensors="pt")).last_hidden_state[:, 0]
        cls_b = model(**processor(images=images_b, return_tensors="pt")).last_hidden_state[:, 0]
    expected = torch.nn.functional.cosine_similarity(cls_a, cls_b, dim=-1).numpy()
    np.testing.assert_allclose(dino_scorer.image_image(images_a, images_b), expected, atol=1e-4)


def test_identical_pair_scores_one(dino_scorer):
    images = [noise_image(seed) for seed in range(3)]
    np.testing.assert_allclose(dino_scorer.image_image(images, images), 1.0, atol=1e-4)


def test_different_images_score_below_one(dino_scorer):
    scores = dino_scorer.image_image([noise_image(1)], [noise_image(1, mode="L").convert("RGB")])
    assert scores[0] < 1 - 1e-4


def test_tiny_processor_uses_dino_normalization(dino_scorer):
    processor = dino_scorer.processor
    np.testing.assert_allclose(processor.image_mean, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(processor.image_std, [0.229, 0.224, 0.225])
    assert processor.size == {"height": 64, "width": 64}
