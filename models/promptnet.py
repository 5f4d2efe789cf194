"""PromptNet: an encoder from a reference image to a word embedding `S*` (ProFusion, arXiv 2305.13579).

The network reads the reference image's VAE latent, the noisy latent of the image being
denoised and its timestep (and, when configured, the reference's CLIP vision tokens through
cross-attention), and returns `num_tokens` vectors in the text encoder's input-embedding space.
Its trunk is the down path of a Stable Diffusion UNet, so `PromptNet.from_unet` can start it
from the UNet's weights. A checkpoint is a `save_pretrained` folder (config.json + safetensors),
with the CLIP vision encoder it was trained with in `image_encoder/` when it uses one.

`PlaceholderPrompts` renders prompts whose placeholder token stands for `S*`: a hook on the
text encoder's token embedding writes `S*` into the placeholder's positions, so the stock
`CLIPTextModel` forward runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from torch import nn

IMAGE_ENCODER_FOLDER = "image_encoder"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PromptNet(ModelMixin, ConfigMixin):
    """Reference latent + noisy latent + timestep (+ CLIP image tokens) -> `S*` word embeddings."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        layers_per_block: int = 2,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        cross_attention_dim: int = 1024,
        image_embed_dim: int | None = 1280,
        use_linear_projection: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        embedding_dim: int = 1024,
        num_tokens: int = 1,
        pool_size: int = 4,
        head_channels: int = 128,
    ):
        super().__init__()
        levels = len(block_out_channels)
        heads = (num_attention_heads,) * levels if isinstance(num_attention_heads, int) else tuple(num_attention_heads)
        if not image_embed_dim:  # nothing to cross-attend to
            down_block_types = ("DownBlock2D",) * levels
        time_dim = block_out_channels[0] * 4

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.noisy_in = nn.Sequential(
            nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(block_out_channels[0], block_out_channels[0], kernel_size=3, padding=1),
        )
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        self.image_proj = nn.Linear(image_embed_dim, cross_attention_dim) if image_embed_dim else None

        self.down_blocks = nn.ModuleList()
        self.stage_heads = nn.ModuleList()
        channels_in = block_out_channels[0]
        for level, channels in enumerate(block_out_channels):
            self.down_blocks.append(
                get_down_block(
                    down_block_types[level],
                    num_layers=layers_per_block,
                    in_channels=channels_in,
                    out_channels=channels,
                    temb_channels=time_dim,
                    add_downsample=level < levels - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[level],
                    attention_head_dim=channels // heads[level],
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                )
            )
            self.stage_heads.append(nn.Conv2d(channels, head_channels, kernel_size=1))
            channels_in = channels
        pooled = levels * head_channels * pool_size * pool_size
        self.to_embedding = nn.Linear(pooled, num_tokens * embedding_dim)

    @property
    def uses_image_embeds(self) -> bool:
        return self.image_proj is not None

    def forward(
        self,
        reference_latents: torch.Tensor,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return `S*` of shape (batch, num_tokens, embedding_dim)."""
        batch = noisy_latents.shape[0]
        if reference_latents.shape[0] != batch:
            reference_latents = reference_latents.expand(batch, -1, -1, -1)
        timesteps = torch.as_tensor(timesteps, device=noisy_latents.device).reshape(-1).expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        context = None
        if self.image_proj is not None:
            if image_embeds is None:
                raise ValueError("this PromptNet was built with image_embed_dim: pass the reference's image_embeds")
            context = self.image_proj(image_embeds.to(self.dtype)).expand(batch, -1, -1)

        hidden = self.conv_in(reference_latents.to(self.dtype)) + self.noisy_in(noisy_latents.to(self.dtype))
        pooled = []
        for block, head in zip(self.down_blocks, self.stage_heads):
            if context is not None:
                hidden, _ = block(hidden, temb, encoder_hidden_states=context)
            else:
                hidden, _ = block(hidden, temb)
            pooled.append(F.adaptive_avg_pool2d(head(hidden), self.config.pool_size))
        features = F.silu(torch.cat(pooled, dim=1)).flatten(1)
        return self.to_embedding(features).view(batch, self.config.num_tokens, self.config.embedding_dim)

    @classmethod
    def from_unet(cls, unet, embedding_dim: int, image_embed_dim: int | None = None, **overrides) -> PromptNet:
        """A PromptNet shaped like `unet`'s down path, started from its weights where they fit."""
        config = unet.config
        heads = config.num_attention_heads or config.attention_head_dim
        layers = config.layers_per_block
        settings = dict(
            in_channels=config.in_channels,
            block_out_channels=tuple(config.block_out_channels),
            down_block_types=tuple(config.down_block_types),
            layers_per_block=layers if isinstance(layers, int) else layers[0],
            num_attention_heads=tuple(heads) if not isinstance(heads, int) else heads,
            cross_attention_dim=config.cross_attention_dim,
            image_embed_dim=image_embed_dim,
            use_linear_projection=config.use_linear_projection,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            embedding_dim=embedding_dim,
        )
        settings.update(overrides)
        model = cls(**settings)
        model.copy_matching_weights(unet.state_dict())
        return model

    def copy_matching_weights(self, state: dict[str, torch.Tensor]) -> int:
        """Copy every tensor whose name and shape match one of ours; returns how many were copied."""
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matched, strict=False)
        return len(matched)


# --- image encoder ---------------------------------------------------------------------


def load_image_encoder(source: str | Path, **kwargs):
    """The CLIP vision tower PromptNet reads (ProFusion: OpenCLIP ViT-H/14's last hidden state)."""
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(source), **kwargs)


def image_encoder_path(checkpoint: str | Path) -> Path | None:
    candidate = Path(checkpoint) / IMAGE_ENCODER_FOLDER
    return candidate if candidate.is_dir() else None


def clip_image_tokens(image_encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the CLIP vision tower for images in [-1, 1], shape (B, 3, H, W)."""
    size = image_encoder.config.image_size
    images = (pixels.float() + 1) / 2
    images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    images = ((images.clamp(0, 1) - mean) / std).to(image_encoder.dtype)
    return image_encoder(pixel_values=images).last_hidden_state


# --- prompts with S* -------------------------------------------------------------------


class PlaceholderPrompts:
    """Encode prompts in which `PLACEHOLDER` stands for a per-row `S*` embedding.

    The tokenizer learns one added token; its id never reaches the embedding table (it is
    swapped for a valid id before the lookup) and a forward hook on the token embedding
    writes `S*` over those positions.
    """

    PLACEHOLDER = "<|sstar|>"

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        tokenizer.add_tokens([self.PLACEHOLDER])
        self.placeholder_id = tokenizer.convert_tokens_to_ids(self.PLACEHOLDER)

    def render(self, template: str, num_tokens: int = 1) -> str:
        """`template` with each "{subject}" replaced by the placeholder (repeated `num_tokens` times)."""
        return template.replace("{subject}", " ".join([self.PLACEHOLDER] * num_tokens))

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)

    def encode(self, prompts: list[str], s_star: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """Text-encoder states (B, L, D) for `prompts`; rows with the placeholder take `s_star` (B, K, D).

        `scale` multiplies the encoder's output at the placeholder positions (ProFusion's
        weaker `S*` in the fusion stage)."""
        ids = self.token_ids(prompts)
        mask = ids == self.placeholder_id
        if not mask.any():
            return self.text_encoder(ids)[0]
        if s_star is None:
            raise ValueError("a prompt holds the placeholder but no S* was given")
        with self._substitute(mask, s_star):
            states = self.text_encoder(ids.masked_fill(mask, 0))[0]
        if scale != 1.0:
            states = torch.where(mask[..., None], states * scale, states)
        return states

    @contextlib.contextmanager
    def _substitute(self, mask: torch.Tensor, s_star: torch.Tensor) -> Iterator[None]:
        embedding = self.text_encoder.get_input_embeddings()
        tokens = s_star.shape[1]
        slot = ((mask.long().cumsum(dim=1) - 1).clamp(min=0) % tokens)[..., None]

        def write_s_star(_module, _inputs, output):
            values = s_star.to(output.dtype).expand(output.shape[0], -1, -1)
            values = values.gather(1, slot.expand(-1, -1, output.shape[-1]))
            return torch.where(mask[..., None], values, output)

        handle = embedding.register_forward_hook(write_s_star)
        try:
            yield
        finally:
            handle.remove()
