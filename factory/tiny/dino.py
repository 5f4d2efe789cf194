"""A tiny DINO: a random-weight transformers `ViTModel` plus a `ViTImageProcessor` with
DINO's ImageNet normalization, saved together with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_dino(path: str | Path, seed: int = 0, image_size: int = 64) -> str:
    """Save a 2-layer ViT (patch 16) and its image processor under `path`; return the path."""
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear, as facebook/dino-vits16's processor
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor.save_pretrained(path)
    return str(Path(path))
