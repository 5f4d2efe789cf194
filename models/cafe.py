"""The CAFE generator G (paper section 3.1): a Stable Diffusion 2 UNet conditioned on images.

The text conditioning is replaced by two cross-attention streams that share the query
(equation 1): `z' = Attn(Q, K_H, V_H) + Attn(Q, K_E, V_E)`, where `H` is the CLIP
ViT-L/14@336 global image embedding `F(.)` (1 x 768) and `E` the DINOv2 patch embeddings
`E(x)` (257 x 1536 for DINOv2-giant). Both are projected to the UNet's cross-attention width.
The `H` stream reuses each cross-attention's own key/value layers (they saw text before;
now they see the projected CLIP embedding), the `E` stream gets new ones, initialised from
them: the decoupled cross-attention of IP-Adapter, installed with diffusers'
`set_attn_processor`, so the UNet itself is diffusers' own class.

Training (equation 3) is epsilon-prediction MSE on the target `x~` with `F(x~)` and `E(x)`,
each condition zeroed independently with probability 0.1; sampling uses one guidance scale
per condition.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

from factory.framework.models_cache import local_model, model_ref
from models.base import EvaluationCounter, GenJob, GenResult, parse_options, resolve_dtype

log = logging.getLogger(__name__)

TRAINABLE_MODES = ("all", "new_layers")


# --- the decoupled cross-attention ---------------------------------------------------


class CafeAttnProcessor(nn.Module):
    """Equation 1 for one cross-attention layer.

    `encoder_hidden_states` is `[CLIP tokens | DINO tokens]` along the sequence; the first
    `clip_tokens` go through the layer's own `to_k`/`to_v` (`K_H`, `V_H`), the rest through
    this processor's `to_k_dino`/`to_v_dino` (`K_E`, `V_E`); the two attention outputs add.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, clip_tokens: int = 1):
        super().__init__()
        self.clip_tokens = clip_tokens
        self.to_k_dino = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_dino = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def copy_from(self, attn: Attention) -> None:
        """Initialise the DINO key/value from the layer's (text) key/value, as IP-Adapter does."""
        with torch.no_grad():
            self.to_k_dino.weight.copy_(attn.to_k.weight)
            self.to_v_dino.weight.copy_(attn.to_v.weight)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("a CAFE cross-attention layer needs the CLIP and DINO tokens")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        clip_part = encoder_hidden_states[:, : self.clip_tokens]
        dino_part = encoder_hidden_states[:, self.clip_tokens :]
        query = _heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        semantic = _attend(attn, query, attn.to_k(clip_part), attn.to_v(clip_part))
        identity = _attend(attn, query, self.to_k_dino(dino_part), self.to_v_dino(dino_part))
        hidden_states = (semantic + identity).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _heads(attn: Attention, states: torch.Tensor) -> torch.Tensor:
    batch, length, inner = states.shape
    return states.view(batch, length, attn.heads, inner // attn.heads).transpose(1, 2)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    key, value = _heads(attn, key), _heads(attn, value)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def install_cafe_processors(unet: UNet2DConditionModel, clip_tokens: int) -> None:
    """Give every cross-attention a `CafeAttnProcessor`, every self-attention the default one."""
    modules = dict(unet.named_modules())
    processors: dict[str, Any] = {}
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if attn.is_cross_attention:
            processor = CafeAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, clip_tokens)
            processor.copy_from(attn)
            processors[name] = processor
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)


# --- the model -----------------------------------------------------------------------


class CafeUNet(ModelMixin, ConfigMixin):
    """G: a diffusers UNet with CAFE cross-attention plus the two condition projections.

    Saved and loaded with diffusers' `save_pretrained` / `from_pretrained` (config.json with
    the UNet's own config and the base/encoder paths, weights as safetensors).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        clip_dim: int = 768,
        dino_dim: int = 1536,
        clip_tokens: int = 1,
        base_model: str | None = None,
        clip_model: str | None = None,
        dino_model: str | None = None,
    ):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(dict(unet_config))
        width = self.unet.config.cross_attention_dim
        if not isinstance(width, int):
            raise ValueError(f"CAFE needs one cross-attention width, the UNet has {width}")
        self.clip_proj = nn.Linear(clip_dim, clip_tokens * width)
        self.clip_norm = nn.LayerNorm(width)
        self.dino_proj = nn.Linear(dino_dim, width)
        self.dino_norm = nn.LayerNorm(width)
        install_cafe_processors(self.unet, clip_tokens)

    @classmethod
    def from_base(cls, base_model: str, clip_model: str, dino_model: str, clip_tokens: int = 1,
                  storage: Any = None) -> CafeUNet:
        """A new G from a Stable Diffusion folder (its `unet/`) and the two encoders' configs.

        The references are recorded as given (an S3 URL stays one); `storage` (the run's storage
        section) is how an S3 one is fetched (`factory.framework.models_cache`)."""
        base = local_model(base_model, storage, "base_model")
        base_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        clip_dim, dino_dim = encoder_dims(clip_model, dino_model, storage)
        model = cls(
            unet_config=_plain_config(base_unet.config),
            clip_dim=clip_dim,
            dino_dim=dino_dim,
            clip_tokens=clip_tokens,
            base_model=base_model,
            clip_model=clip_model,
            dino_model=dino_model,
        )
        missing, unexpected = model.unet.load_state_dict(base_unet.state_dict(), strict=False)
        if unexpected or any(".processor." not in name for name in missing):
            raise ValueError(f"base UNet does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        del base_unet
        install_cafe_processors(model.unet, clip_tokens)  # DINO key/value start from the loaded ones
        return model

    def encode_conditions(self, clip_embeds: torch.Tensor, dino_features: torch.Tensor) -> torch.Tensor:
        """`[projected CLIP tokens | projected DINO tokens]`, the cross-attention context."""
        batch = clip_embeds.shape[0]
        width = self.unet.config.cross_attention_dim
        clip_tokens = self.clip_norm(self.clip_proj(clip_embeds.reshape(batch, -1)).view(batch, -1, width))
        dino_tokens = self.dino_norm(self.dino_proj(dino_features))
        return torch.cat([clip_tokens, dino_tokens], dim=1)

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, clip_embeds: torch.Tensor, dino_features: torch.Tensor
    ) -> torch.Tensor:
        """Predicted noise (or velocity, per the scheduler) with the latents' shape."""
        context = self.encode_conditions(clip_embeds, dino_features).to(latents.dtype)
        return self.unet(latents, timesteps, encoder_hidden_states=context).sample

    def new_layer_names(self) -> list[str]:
        """Parameters that SD2 does not have: the projections and the DINO key/value layers."""
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith(("clip_proj.", "clip_norm.", "dino_proj.", "dino_norm.")) or ".processor." in name
        ]

    def set_trainable(self, mode: str) -> list[nn.Parameter]:
        """`all`: the whole UNet and the new layers; `new_layers`: only the new layers."""
        if mode not in TRAINABLE_MODES:
            raise ValueError(f"trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}")
        new = set(self.new_layer_names())
        for name, param in self.named_parameters():
            param.requires_grad_(mode == "all" or name in new)
        return [p for p in self.parameters() if p.requires_grad]


def _plain_config(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def encoder_dims(clip_model: str, dino_model: str, storage: Any = None) -> tuple[int, int]:
    """(CLIP projection width, DINOv2 hidden width) read from the encoders' configs."""
    clip_config = AutoConfig.from_pretrained(local_model(clip_model, storage, "clip_model"))
    dino_config = AutoConfig.from_pretrained(local_model(dino_model, storage, "dino_model"))
    return int(clip_config.projection_dim), int(dino_config.hidden_size)


# --- the encoders E and F ------------------------------------------------------------


class ImageEncoders:
    """`E` (DINOv2 patch features, CLS included) and `F` (CLIP image embedding), frozen."""

    def __init__(self, clip_model: str, dino_model: str, device: str | torch.device = "cpu", dtype=torch.float32,
                 storage: Any = None):
        clip_model = local_model(clip_model, storage, "clip_model")
        dino_model = local_model(dino_model, storage, "dino_model")
        self.device = torch.device(device)
        self.dtype = dtype
        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip_model).to(self.device, dtype).eval()
        self.clip_processor = AutoImageProcessor.from_pretrained(clip_model)
        self.dino = AutoModel.from_pretrained(dino_model).to(self.device, dtype).eval()
        self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)
        self.clip.requires_grad_(False)
        self.dino.requires_grad_(False)

    @torch.no_grad()
    def clip_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """F(x): (batch, projection width), float32."""
        pixels = self.clip_processor(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        return self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()

    @torch.no_grad()
    def dino_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """E(x): (batch, 1 + patches, hidden width), float32."""
        pixels = self.dino_processor(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        return self.dino(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state.float()


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# --- training ------------------------------------------------------------------------


def drop_conditions(
    clip_embeds: torch.Tensor, dino_features: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero each sample's CLIP and DINO condition independently with `probability` (for CFG)."""
    batch = clip_embeds.shape[0]
    keep = (torch.rand(2, batch, generator=generator) >= probability).to(clip_embeds.device)
    clip_keep = keep[0].view(batch, *([1] * (clip_embeds.ndim - 1))).to(clip_embeds.dtype)
    dino_keep = keep[1].view(batch, *([1] * (dino_features.ndim - 1))).to(dino_features.dtype)
    return clip_embeds * clip_keep, dino_features * dino_keep


def images_to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1]: (batch, 3, size, size)."""
    arrays = []
    for image in images:
        image = _rgb(image)
        scale = size / min(image.size)
        resized = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
        )
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        arrays.append(np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE latents of [-1, 1] pixels, scaled by the VAE's scaling factor."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype).to(posterior.mean.device)
    return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    clip_embeds: torch.Tensor,
    dino_features: torch.Tensor,
    drop_probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Equation 3 per sample: MSE between the noise (or velocity) and G's prediction."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(latents.device)
    clip_embeds, dino_features = drop_conditions(clip_embeds, dino_features, drop_probability, generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = model(noisy, timesteps, clip_embeds, dino_features)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


# --- sampling ------------------------------------------------------------------------

SAMPLERS = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


GUIDANCE_PASSES = 3  # UNet evaluations per image and sampling step: `guidance_conditions`' three rows


@dataclass
class Guidance:
    """Two-condition classifier-free guidance (as InstructPix2Pix): identity first, then semantics.

    eps = eps(0, 0) + dino * (eps(0, E) - eps(0, 0)) + clip * (eps(H, E) - eps(0, E))
    """

    clip: float = 7.5
    dino: float = 2.0


@torch.no_grad()
def sample_latents(
    model: CafeUNet,
    scheduler,
    clip_embeds: torch.Tensor,
    dino_features: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: Guidance,
) -> torch.Tensor:
    """Denoise `noise` (batch, 4, h, w) under both conditions; returns clean latents."""
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    clip3, dino3 = guidance_conditions(clip_embeds, dino_features)
    for t in scheduler.timesteps:
        inputs = scheduler.scale_model_input(torch.cat([latents] * GUIDANCE_PASSES), t)
        eps_none, eps_dino, eps_both = model(inputs, t, clip3, dino3).chunk(GUIDANCE_PASSES)
        latents = scheduler.step(guided_noise(eps_none, eps_dino, eps_both, guidance), t, latents).prev_sample
    return latents


def guidance_conditions(clip_embeds: torch.Tensor, dino_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of three the UNet sees per step: (no condition), (E only), (H and E)."""
    zero_clip, zero_dino = torch.zeros_like(clip_embeds), torch.zeros_like(dino_features)
    return torch.cat([zero_clip, zero_clip, clip_embeds]), torch.cat([zero_dino, dino_features, dino_features])


def guided_noise(eps_none: torch.Tensor, eps_dino: torch.Tensor, eps_both: torch.Tensor,
                 guidance: Guidance) -> torch.Tensor:
    """`Guidance`'s combination of the three predictions."""
    return eps_none + guidance.dino * (eps_dino - eps_none) + guidance.clip * (eps_both - eps_dino)


@torch.no_grad()
def decode_images(vae: AutoencoderKL, latents: torch.Tensor) -> list[Image.Image]:
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def mix_semantics(clip_x: torch.Tensor, clip_w: torch.Tensor | None, alpha: float | None) -> torch.Tensor:
    """Equation 4's semantic condition: alpha * F(w) + (1 - alpha) * F(x); F(x) without `w`."""
    if clip_w is None:
        return clip_x
    if alpha is None:
        raise ValueError("a job with a w image needs its alpha (equation 4), got none")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * clip_w + (1.0 - alpha) * clip_x


# --- the generator interface (models/base.py) ----------------------------------------

class CafeOptions(BaseModel):
    """`GeneratorSpec.options` for kind "cafe"."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN guidance draws black images

    clip_guidance_scale: float | None = Field(None, ge=0, description="default: the spec's guidance_scale")
    dino_guidance_scale: float = Field(Guidance.dino, ge=0)
    sampler: Literal["ddim", "dpmsolver"] = "ddim"
    batch_size: int = Field(4, ge=1, description="jobs per UNet call")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float16 on CUDA")
    base_model: str | None = Field(None, description="default: the base SD the G folder names")
    clip_model: str | None = None
    dino_model: str | None = None


class CafeGenerator:
    """x~ = G(E(x), alpha * F(w) + (1 - alpha) * F(x)), one image per job.

    `spec.model` is a G folder saved by `CafeUNet.save_pretrained` (it names its base SD,
    CLIP and DINOv2); when `spec.checkpoint` is set, that is the G folder and `spec.model`
    the base SD folder. `spec.options`: `CafeOptions`.
    """

    def __init__(self, name: str, spec: Any, device: str = "cpu", storage: Any = None):
        self.name = name
        self.spec = spec
        self.options = options = parse_options(name, CafeOptions, spec.options)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.folder = spec.checkpoint or spec.model
        key = f"generate.generators.{name}.{'checkpoint' if spec.checkpoint else 'model'}"
        self.model = CafeUNet.from_pretrained(local_model(self.folder, storage, key)).to(self.device, self.dtype).eval()
        recorded = self.model.config
        base = options.base_model or (spec.model if spec.checkpoint else None) or recorded.base_model
        self.paths = {
            "base_model": base,
            "clip_model": options.clip_model or recorded.clip_model,
            "dino_model": options.dino_model or recorded.dino_model,
        }
        self.encoders = ImageEncoders(self.paths["clip_model"], self.paths["dino_model"], self.device, self.dtype,
                                      storage)
        base = local_model(base, storage, f"generate.generators.{name}.model")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=self.dtype).to(self.device).eval()
        self.scheduler = SAMPLERS[options.sampler].from_pretrained(base, subfolder="scheduler")
        clip_scale = spec.guidance_scale if options.clip_guidance_scale is None else options.clip_guidance_scale
        self.guidance = Guidance(clip=clip_scale, dino=options.dino_guidance_scale)
        self.batch_size = options.batch_size
        self.unet_evals = EvaluationCounter(self.model)
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_size = spec.image_size // vae_factor

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "cafe",
            "checkpoint": model_ref(self.folder),
            **{name: model_ref(path) for name, path in self.paths.items()},
            "steps": self.spec.steps,
            "guidance": {"clip": self.guidance.clip, "dino": self.guidance.dino},
            "sampler": self.options.sampler,
            "image_size": self.spec.image_size,
        }

    def generate(self, reference: Image.Image, jobs: list[GenJob]) -> list[GenResult]:
        clip_x = self.encoders.clip_embeds([reference])
        dino_x = self.encoders.dino_features([reference])
        semantics = torch.cat([self._semantics(clip_x, job) for job in jobs]) if jobs else clip_x[:0]
        before = self.unet_evals.rows
        images = self.draw(dino_x, semantics, [job.seed for job in jobs])
        evals = (self.unet_evals.rows - before) / max(len(jobs), 1)
        return [GenResult(image=image, info=self._info(job, evals)) for job, image in zip(jobs, images)]

    def draw(self, dino_x: torch.Tensor, semantics: torch.Tensor, seeds: list[int]) -> list[Image.Image]:
        """One image per row of `semantics` (the CLIP condition), all with identity `dino_x` (1, n, d)."""
        images: list[Image.Image] = []
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start : start + self.batch_size]
            noise = torch.cat([self._noise(seed) for seed in chunk]).to(self.device, self.dtype)
            latents = sample_latents(
                self.model,
                self.scheduler,
                semantics[start : start + len(chunk)].to(self.device, self.dtype),
                dino_x.to(self.device, self.dtype).expand(len(chunk), -1, -1),
                noise,
                self.spec.steps,
                self.guidance,
            )
            images.extend(decode_images(self.vae, latents))
        return images

    def _semantics(self, clip_x: torch.Tensor, job: GenJob) -> torch.Tensor:
        clip_w = self.encoders.clip_embeds([job.w_image]) if job.w_image is not None else None
        return mix_semantics(clip_x, clip_w, job.alpha)

    def _noise(self, seed: int) -> torch.Tensor:
        channels = self.model.unet.config.in_channels
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn((1, channels, self.latent_size, self.latent_size), generator=generator)

    def _info(self, job: GenJob, unet_evals: float) -> dict[str, Any]:
        return {
            "steps": self.spec.steps,
            "unet_evals": unet_evals,  # per image: steps x GUIDANCE_PASSES rows through the UNet
            "finetune_unet_evals": 0,
            "seed": job.seed,
            "alpha": job.alpha if job.w_image is not None else None,
            "guidance": {"clip": self.guidance.clip, "dino": self.guidance.dino},
            "uses_w": job.w_image is not None,
        }


def read_generator_config(folder: str | Path) -> dict[str, Any]:
    """The G folder's config.json (base, CLIP and DINOv2 paths, dims)."""
    return json.loads((Path(folder) / CafeUNet.config_name).read_text())


def local_folder(path: str, storage: Any = None) -> str:
    """A G folder on local disk: `path` itself, or the node's cached copy of an `s3://` folder."""
    return local_model(path, storage, "checkpoint")
