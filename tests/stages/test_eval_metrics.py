"""eval's DINO, CLIP-I and CLIP-T against cosines computed here, in float64, from the tiny models' raw outputs.

`EvalWorker` is built by its own constructor: a tiny CAFE generator G (the prompt's CLIP text
embedding as its condition), and the filter's scorers loaded from a tiny open_clip CLIP and a tiny
DINO ViT. G's drawings are recorded on their way to the scorers; the expected scores come from
the networks themselves (open_clip `encode_image` / `encode_text`, the ViT's CLS token), each loaded
again here, not from the scorers' methods."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTModel

from factory.framework.config import FactoryConfig

PROMPTS = ["a dog on the beach", "a dog in the snow"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_generator, build_tiny_cafe_parts
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino

    root = tmp_path_factory.mktemp("eval-metrics-models")
    return {"generator": build_tiny_cafe_generator(root, build_tiny_cafe_parts(root)),
            "clip": build_tiny_clip(root / "scorer-clip"), "dino": build_tiny_dino(root / "scorer-dino")}


def make_config(root, tiny) -> FactoryConfig:
    clip = tiny["clip"]
    return FactoryConfig.model_validate({
        "run_id": "metrics", "storage": {"root": str(root)},
        "filter": {"clip_model": clip.model_name, "clip_pretrained": clip.pretrained,
                   "clip_model_config": clip.model_config, "dino_model": tiny["dino"]},
        "eval": {"semantic": "clip_text", "images_per_pair": 2, "image_size": 16, "steps": 2, "use_gpu": False},
    })


def reference_png() -> bytes:
    pixels = np.random.default_rng(7).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def raw_clip(tiny_clip, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised float64 image and text embeddings from open_clip's model, loaded here."""
    open_clip.add_model_config(tiny_clip.model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip.model_name, pretrained=tiny_clip.pretrained)
    model = model.double().eval()
    pixels = torch.stack([preprocess(image) for image in images]).double()
    tokens = open_clip.get_tokenizer(tiny_clip.model_name)(texts)
    return model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()


@torch.no_grad()
def raw_dino_cls(folder: str, images: list[Image.Image]) -> np.ndarray:
    """The ViT's CLS token (last hidden state, position 0) in float64."""
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).double().eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    return model(pixel_values=pixels.double()).last_hidden_state[:, 0].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_each_metric_is_the_cosine_of_its_own_embeddings(tmp_path, tiny):
    from stages.eval import EvalWorker, Located, report_from_scored

    config = make_config(tmp_path, tiny)
    worker = EvalWorker(config.snapshot(), Located(tiny["generator"], False))
    drawn: list[list[Image.Image]] = []
    real_draw = worker.generator.draw

    def recording(dino_x, semantics, seeds):  # G's own drawings, kept on their way to the scorers
        images = real_draw(dino_x, semantics, seeds)
        drawn.append(list(images))
        return images

    worker.generator.draw = recording
    rows = pd.DataFrame({"order": [0, 1], "reference": ["dog.png"] * 2, "subject": ["dog"] * 2, "prompt": PROMPTS,
                         "reference_image": [reference_png()] * 2, "seeds": [[1, 2], [3, 4]]})
    scored = worker(rows)

    reference = Image.open(io.BytesIO(reference_png())).convert("RGB")
    images = [image for row in drawn for image in row]  # prompt 0's two images, then prompt 1's
    assert len(images) == 4
    clip_images, clip_texts = raw_clip(tiny["clip"], [reference, *images], PROMPTS)
    dino = raw_dino_cls(tiny["dino"], [reference, *images])
    for prompt in range(2):  # row n of the batch is prompt n
        mine = [1 + 2 * prompt + n for n in range(2)]  # rows of this prompt's images in the raw outputs
        expected = {
            "dino": [cosine(dino[i], dino[0]) for i in mine],
            "clip_i": [cosine(clip_images[i], clip_images[0]) for i in mine],
            "clip_t": [cosine(clip_images[i], clip_texts[prompt]) for i in mine],
        }
        for metric, values in expected.items():
            np.testing.assert_allclose(scored[metric][prompt], values, rtol=0, atol=1e-5, err_msg=metric)
    # the scores tell the images and prompts apart, so a swapped input would show
    assert abs(cosine(clip_images[1], clip_texts[0]) - cosine(clip_images[1], clip_texts[1])) > 1e-3
    assert np.ptp([cosine(dino[i], dino[0]) for i in range(1, 5)]) > 1e-3

    report = report_from_scored(scored, config.eval, seconds=1.0)
    dino_mean = np.mean([cosine(dino[i], dino[0]) for i in range(1, 5)])
    clip_t_mean = np.mean([cosine(clip_images[1 + n], clip_texts[n // 2]) for n in range(4)])
    assert report["metrics"]["dino"] == pytest.approx(dino_mean, abs=1e-5)
    assert report["metrics"]["clip_t"] == pytest.approx(clip_t_mean, abs=1e-5)
