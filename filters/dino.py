"""DINO image-image score: cosine between the CLS embeddings of two images.

The model is a transformers `ViTModel` and its inputs come from the checkpoint's own image
processor, so the score is DreamBench's DINO metric for the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, ViTModel

from filters.clip import paired_cosines
from filters.precision import inference_context


class DinoScorer:
    """A ViT (DINO) loaded once; CLS embeddings come back L2-normalized in float32."""

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None):
        self.device = device
        self.dtype = dtype
        self.model = ViTModel.from_pretrained(model, add_pooling_layer=False).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model)

    def image_tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The checkpoint's image processor, as one CPU batch."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with inference_context(self.device, self.dtype):
            hidden = self.model(pixel_values=pixels.to(self.device, non_blocking=True)).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_pixels(self.image_tensors(images))

    def image_image(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> np.ndarray:
        """Cosine between each image of `images_a` and its partner in `images_b`."""
        both = self.embed_images([*images_a, *images_b])
        return paired_cosines(both[: len(images_a)], both[len(images_a) :])
