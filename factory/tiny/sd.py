"""A tiny Stable-Diffusion-2-like pipeline and a tiny PromptNet, random weights, real classes.

`build_tiny_sd` writes a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json) that `StableDiffusionPipeline.from_pretrained` loads and that the
ProFusion generator loads component by component. The tokenizer is a real `CLIPTokenizer` whose
BPE vocabulary is the first merges of the CLIP vocabulary that ships inside open_clip.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from models.profusion import save_promptnet
from models.promptnet import PromptNet

TINY_MERGES = 1000  # CLIP BPE merges kept: enough for common words, a 2.5k-token vocabulary
TINY_IMAGE_SIZE = 64  # pixels; the VAE downsamples 8x, so latents are 8x8 like the UNet's sample_size
HIDDEN = 32


def build_tiny_sd(path: str | Path, seed: int = 0) -> str:
    """Save a tiny SD2-like `StableDiffusionPipeline` under `path`; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tiny_clip_tokenizer(scratch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipeline = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=_tiny_unet(),
            scheduler=_sd2_ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def build_tiny_promptnet(path: str | Path, sd_path: str | Path, image_encoder: bool = True, seed: int = 0) -> str:
    """Save a tiny PromptNet started from the tiny UNet's down path (plus a tiny CLIP vision
    tower in `image_encoder/` when `image_encoder`); returns the checkpoint folder."""
    folder = Path(path)
    unet = UNet2DConditionModel.from_pretrained(str(sd_path), subfolder="unet", low_cpu_mem_usage=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vision = None
        if image_encoder:
            vision = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8, projection_dim=HIDDEN,
                )
            )
        promptnet = PromptNet.from_unet(
            unet,
            embedding_dim=HIDDEN,
            image_embed_dim=vision.config.hidden_size if vision is not None else None,
            pool_size=2,
            head_channels=16,
        )
    return save_promptnet(promptnet, folder, vision)


def build_tiny_clip_tokenizer(path: str | Path, merges: int = TINY_MERGES):
    """A `CLIPTokenizer` over the first `merges` CLIP BPE merges (vocab.json + merges.txt)."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1 : merges + 1]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merge_lines]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token="!", model_max_length=77
    )


def _tiny_unet():
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )


def _tiny_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def _tiny_text_encoder(tokenizer):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _sd2_ddim_scheduler():
    """The noise schedule of stabilityai/stable-diffusion-2-base, sampled with DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
