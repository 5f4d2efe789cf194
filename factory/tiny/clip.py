"""A tiny open_clip CLIP: a registered model config JSON plus a random-weight state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch

TINY_CLIP_NAME = "tiny-clip"

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class TinyClip(NamedTuple):
    """What `FilterConfig` needs: clip_model, clip_pretrained, clip_model_config."""

    model_name: str
    pretrained: str
    model_config: str


def build_tiny_clip(path: str | Path, seed: int = 0) -> TinyClip:
    """Write `<path>/tiny-clip.json` (open_clip model config) and `<path>/tiny-clip.pt`
    (random weights, saved as a plain state dict), and return how to load them."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / f"{TINY_CLIP_NAME}.json"
    config_file.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    weights_file = folder / f"{TINY_CLIP_NAME}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    torch.save(model.state_dict(), weights_file)
    return TinyClip(TINY_CLIP_NAME, str(weights_file), str(config_file))
