"""CLIP scores with open_clip: `clip_t` (image vs text) and `clip_i` (image vs image).

The model, its evaluation transform and its tokenizer all come from open_clip, so a score
is what DreamBench-style CLIP-T / CLIP-I evaluation computes for the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from filters.precision import inference_context


class ClipScorer:
    """An open_clip model loaded once; embeddings come back L2-normalized in float32."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: str = "cpu",
        dtype: str | None = None,
        model_config: str | None = None,
        quick_gelu: bool | None = None,
    ):
        if model_config:
            open_clip.add_model_config(model_config)
        if quick_gelu is None:
            quick_gelu = needs_quick_gelu(model_name, pretrained)
        self.device = device
        self.dtype = dtype
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def image_tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """open_clip's evaluation transform, stacked into one CPU batch."""
        return torch.stack([self.preprocess(image) for image in images])

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with inference_context(self.device, self.dtype):
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        with inference_context(self.device, self.dtype):
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_pixels(self.image_tensors(images))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed_tokens(self.tokenizer(list(texts)))

    def image_text(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """CLIP-T: cosine between each image and its text."""
        return paired_cosines(self.embed_images(images), self.embed_texts(texts))

    def image_image(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> np.ndarray:
        """CLIP-I: cosine between each image of `images_a` and its partner in `images_b`."""
        both = self.embed_images([*images_a, *images_b])
        return paired_cosines(both[: len(images_a)], both[len(images_a) :])


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the pretrained tag was trained with QuickGELU (OpenAI's weights were).

    open_clip 3 builds `ViT-B-32` with GELU and only warns when the `openai` tag disagrees;
    the scores would then not be the published model's.
    """
    if not pretrained:
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def paired_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of two L2-normalized batches, as float64 numbers."""
    if len(a) != len(b):
        raise ValueError(f"paired batches differ in size: {len(a)} vs {len(b)}")
    return (a * b).sum(dim=-1).double().cpu().numpy()


def clip_scorer_from_config(config, device: str = "cpu", local=None) -> ClipScorer:
    """The filter's CLIP scorer as a `FactoryConfig` configures it (the filter, SID's pool and retrieval).

    `local(reference, config key)` turns a model reference into a loadable path (the factory's
    model cache, for `s3://` models); by default references are used as they are."""
    settings = config.filter
    local = local or (lambda ref, key: ref)
    return ClipScorer(settings.clip_model, local(settings.clip_pretrained, "filter.clip_pretrained"), device=device,
                      dtype=settings.dtype, model_config=local(settings.clip_model_config, "filter.clip_model_config"),
                      quick_gelu=settings.clip_quick_gelu)
