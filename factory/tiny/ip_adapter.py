"""A tiny IP-Adapter (arXiv 2308.06721) for the tiny SD pipeline, random weights, in the layout of
h94/IP-Adapter that diffusers' `load_ip_adapter` reads from a local folder:

    <path>/<subfolder>/<weight_name>       {"image_proj": {...}, "ip_adapter": {...}}
    <path>/<subfolder>/image_encoder/      a CLIPVisionModelWithProjection

The plain (non-plus) adapter: `image_proj` maps the CLIP image embedding to
`IMAGE_TOKENS` context tokens (`proj`, then a LayerNorm `norm`); `ip_adapter` holds one key and
one value projection (`to_k_ip`, `to_v_ip`) per cross-attention layer of the UNet, numbered
1, 3, 5, ... in the order of `unet.attn_processors` (the even numbers were the self-attention
layers in the original training code, which have none).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

IMAGE_TOKENS = 4  # diffusers fixes the plain IP-Adapter at 4 image tokens
TINY_IMAGE_EMBED_DIM = 24  # the tiny vision tower's projection size (ViT-H/14's is 1024)


def build_tiny_ip_adapter(path: str | Path, sd_path: str | Path, subfolder: str = "models",
                          weight_name: str = "ip-adapter_sd15.bin", seed: int = 0) -> str:
    """Save a tiny IP-Adapter for the UNet of the pipeline at `sd_path` under `path`; returns `path`.
    `weight_name` ending in .safetensors is written flat with "image_proj."/"ip_adapter." prefixes."""
    folder = Path(path) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(str(sd_path), subfolder="unet", low_cpu_mem_usage=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, projection_dim=TINY_IMAGE_EMBED_DIM,
            )
        )
        weights = ip_adapter_state_dict(unet, TINY_IMAGE_EMBED_DIM)
    vision.save_pretrained(str(folder / "image_encoder"))
    if weight_name.endswith(".safetensors"):
        flat = {f"{part}.{key}": value for part, tensors in weights.items() for key, value in tensors.items()}
        save_file(flat, str(folder / weight_name))
    else:
        torch.save(weights, folder / weight_name)
    return str(path)


def ip_adapter_state_dict(unet, image_embed_dim: int, std: float = 0.5) -> dict:
    """Random weights with the keys and shapes of a plain IP-Adapter for `unet`."""
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(IMAGE_TOKENS * cross, image_embed_dim) * std,
        "proj.bias": torch.zeros(IMAGE_TOKENS * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    for number, name in enumerate(_cross_attention_layers(unet)):
        hidden = _hidden_size(unet, name)
        key_id = 2 * number + 1
        ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * std
        ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * std
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _cross_attention_layers(unet) -> list[str]:
    """The attention processors that read the text (attn2), in `unet.attn_processors` order."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _hidden_size(unet, name: str) -> int:
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return channels[::-1][block] if name.startswith("up_blocks") else channels[block]
