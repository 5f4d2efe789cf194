"""eval's DINO, CLIP-I and CLIP-T against cosines computed here from fixed embeddings.

The scorers and `EvalWorker` run their own code; only the networks are replaced by tables of
fixed, unnormalised embeddings, looked up by a tag painted into each image (its red value)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from factory.framework.config import EvalConfig

CLIP_IMAGE = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 1.0], [0.5, 0.5, 3.0]])  # rows: reference, image 1, image 2
CLIP_TEXT = torch.tensor([[0.0, 1.0, 1.0], [-3.0, 1.0, 0.5]])  # rows: the two prompts
DINO_CLS = torch.tensor([[0.2, -1.0, 4.0, 1.0], [1.0, 1.0, 1.0, -1.0], [-2.0, 0.5, 3.0, 0.0]])
PROMPTS = ["a dog on the beach", "a dog in the snow"]


def tagged(tag: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (tag, 0, 0))


def tags_of(images) -> torch.Tensor:
    return torch.tensor([image.getpixel((0, 0))[0] for image in images])


def fixed_clip_scorer():
    from filters.clip import ClipScorer

    scorer = ClipScorer.__new__(ClipScorer)
    scorer.device, scorer.dtype = "cpu", None
    scorer.preprocess = lambda image: tags_of([image]).float()
    scorer.tokenizer = lambda texts: torch.tensor([PROMPTS.index(text) for text in texts])
    scorer.model = SimpleNamespace(encode_image=lambda pixels: CLIP_IMAGE[pixels[:, 0].long()],
                                   encode_text=lambda tokens: CLIP_TEXT[tokens])
    return scorer


def fixed_dino_scorer():
    from filters.dino import DinoScorer

    def vit(pixel_values):
        cls = DINO_CLS[pixel_values]
        return SimpleNamespace(last_hidden_state=torch.stack([cls, torch.ones_like(cls)], dim=1))  # CLS, a patch

    scorer = DinoScorer.__new__(DinoScorer)
    scorer.device, scorer.dtype = "cpu", None
    scorer.processor = lambda images, return_tensors: {"pixel_values": tags_of(images)}
    scorer.model = vit
    return scorer


class TaggedImagesGenerator:
    """Draws image 1 then image 2 for every prompt, whatever the condition."""

    encoders = SimpleNamespace(dino_features=lambda images: torch.zeros(1, 2, 4))

    def draw(self, dino_x, condition, seeds):
        return [tagged(1 + n % 2) for n in range(len(seeds))]

    def describe(self):
        return {"kind": "fixed"}


def worker():
    from stages.eval import EvalWorker

    evaluator = EvalWorker.__new__(EvalWorker)
    evaluator.generator = TaggedImagesGenerator()
    evaluator.semantics = lambda dino_x, prompt: torch.zeros(1, 3)
    evaluator.clip, evaluator.dino = fixed_clip_scorer(), fixed_dino_scorer()
    return evaluator


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b)))


def reference_png() -> bytes:
    buffer = io.BytesIO()
    tagged(0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_metric_is_the_cosine_of_its_own_embeddings():
    from stages.eval import report_from_scored

    rows = pd.DataFrame({"order": [0, 1], "reference": ["dog.png"] * 2, "subject": ["dog"] * 2, "prompt": PROMPTS,
                         "reference_image": [reference_png()] * 2, "seeds": [[1, 2], [3, 4]]})
    scored = worker()(rows)

    for prompt in range(2):  # row n of the batch is prompt n
        expected = {
            "dino": [cosine(DINO_CLS[image], DINO_CLS[0]) for image in (1, 2)],
            "clip_i": [cosine(CLIP_IMAGE[image], CLIP_IMAGE[0]) for image in (1, 2)],
            "clip_t": [cosine(CLIP_IMAGE[image], CLIP_TEXT[prompt]) for image in (1, 2)],
        }
        for metric, values in expected.items():
            np.testing.assert_allclose(scored[metric][prompt], values, rtol=1e-6, err_msg=metric)

    report = report_from_scored(scored, EvalConfig(images_per_pair=2), seconds=1.0)
    dino_mean = np.mean([cosine(DINO_CLS[image], DINO_CLS[0]) for image in (1, 2)])
    clip_t_mean = np.mean([cosine(CLIP_IMAGE[i], CLIP_TEXT[p]) for i in (1, 2) for p in (0, 1)])
    assert report["metrics"]["dino"] == pytest.approx(dino_mean, abs=1e-6)
    assert report["metrics"]["clip_t"] == pytest.approx(clip_t_mean, abs=1e-6)
