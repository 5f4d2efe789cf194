"""Tiny random-weight models for the CAFE generator G and the assistant, of the real classes:
DINOv2 (`E`), CLIP with projection (`F`, plus its text tower and tokenizer for CLIP-text
evaluation), a Stable-Diffusion-shaped UNet/VAE/scheduler folder, a tiny G checkpoint and a
tiny assistant checkpoint. Each is saved with its library's own `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

from factory.tiny.llama import build_tiny_llama, build_tiny_tokenizer
from models.assistant import CafeAssistant
from models.cafe import CafeUNet

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_IMAGE_SIZE = 28  # encoders: patch 14 -> 2 x 2 patches
TINY_SD_IMAGE_SIZE = 16  # generator output; VAE factor 2 -> 8 x 8 latents


def build_tiny_dinov2(path: str | Path, seed: int = 0) -> str:
    """A 2-layer `Dinov2Model` (hidden 32, patch 14, image 28: 4 patches + CLS) with its processor."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=TINY_IMAGE_SIZE,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    model.save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(path)
    return str(path)


def build_tiny_cafe_clip(path: str | Path, seed: int = 0) -> str:
    """A tiny full `CLIPModel` (projection 16) with image processor and tokenizer: loads as
    `CLIPVisionModelWithProjection` (F) and `CLIPTextModelWithProjection` like the real one."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "projection_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 14,
            "projection_dim": 16,  # read by CLIPVisionModelWithProjection, as in openai's configs
        },
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(path)
    return str(path)


def build_tiny_sd_base(path: str | Path, seed: int = 0) -> str:
    """A Stable-Diffusion-2-shaped folder with `unet/`, `vae/` and `scheduler/` (what G uses)."""
    path = Path(path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_SD_IMAGE_SIZE,
        )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon"
    ).save_pretrained(path / "scheduler")
    return str(path)


def build_tiny_cafe_parts(path: str | Path) -> dict[str, str]:
    """Base SD folder, CLIP (F) and DINOv2 (E) under `path`; returns their paths by role."""
    path = Path(path)
    return {
        "base_model": build_tiny_sd_base(path / "sd"),
        "clip_model": build_tiny_cafe_clip(path / "clip"),
        "dino_model": build_tiny_dinov2(path / "dinov2"),
    }


def build_tiny_cafe_generator(path: str | Path, parts: dict[str, str] | None = None) -> str:
    """An untrained G checkpoint folder at `path/generator` (its parts built beside it unless given)."""
    path = Path(path)
    parts = parts or build_tiny_cafe_parts(path)
    model = CafeUNet.from_base(parts["base_model"], parts["clip_model"], parts["dino_model"])
    model.save_pretrained(path / "generator")
    return str(path / "generator")


def build_tiny_cafe_assistant(path: str | Path, parts: dict[str, str] | None = None) -> str:
    """An untrained assistant checkpoint (new layers only) at `path/assistant`, over a tiny Llama."""
    path = Path(path)
    if parts is None:
        parts = {"clip_model": build_tiny_cafe_clip(path / "clip"), "dino_model": build_tiny_dinov2(path / "dinov2")}
    llm = build_tiny_llama(path / "llama")
    assistant = CafeAssistant.from_parts(llm, parts["clip_model"], parts["dino_model"])
    assistant.save_pretrained(path / "assistant")
    return str(path / "assistant")
