"""PromptNet: an encoder from a reference image to a word embedding `S*` (ProFusion, arXiv 2305.13579).

The network reads the reference image's VAE latent, the noisy latent of the image being
denoised and its timestep (and, when configured, the reference's CLIP vision tokens through
cross-attention), and returns `num_tokens` vectors in the text encoder's input-embedding space.
Its trunk is the down path of a Stable Diffusion UNet, so `PromptNet.from_unet` can start it
from the UNet's weights. A checkpoint is a `save_pretrained` folder (config.json + safetensors),
with the CLIP vision encoder it was trained with in `image_encoder/` when it uses one.

Two heads turn the trunk's features into `S*`: `prompt_head="pooled"` (ours: a 1x1 conv per level,
average-pooled, one linear layer) and `prompt_head="regions"`, the head of ProFusion's public
PromptNet (github.com/drboog/ProFusion, `diffusers/src/diffusers/models/promptnet.py`): a strided
conv per level (plus one on the input features and one after a UNet mid block) down to a common
grid, concatenated, and one conv of `region_kernel_size` whose output positions are the tokens.
`PromptNet.from_profusion_release` loads the encoder ProFusion released (its pipeline folder's
`promptnet/`: diffusers 0.15 `config.json` + `diffusion_pytorch_model.bin`) into a "regions"
PromptNet; `PromptNet.from_pretrained` does so by itself when pointed at such a folder.

`PlaceholderPrompts` renders prompts whose placeholder token stands for `S*`: a hook on the
text encoder's token embedding writes `S*` into the placeholder's positions, so the stock
`CLIPTextModel` forward runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionModel

IMAGE_ENCODER_FOLDER = "image_encoder"
PROMPT_HEADS = ("pooled", "regions")
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
        prompt_head: str = "pooled",
        region_channels: int = 128,
        region_kernel_size: int = 8,
        mid_block_type: str | None = None,
        upcast_attention: bool = False,
        s_star_position_embedding: bool = True,  # PlaceholderPrompts(position_embedding=...) for this S*
    ):
        super().__init__()
        levels = len(block_out_channels)
        heads = (num_attention_heads,) * levels if isinstance(num_attention_heads, int) else tuple(num_attention_heads)
        if prompt_head not in PROMPT_HEADS:
            raise ValueError(f"prompt_head {prompt_head!r}: expected one of {PROMPT_HEADS}")
        regions = prompt_head == "regions"
        if regions and not image_embed_dim:
            raise ValueError('prompt_head "regions" (ProFusion\'s) reads CLIP image tokens: set image_embed_dim')
        if mid_block_type not in (None, "UNetMidBlock2DCrossAttn") or (mid_block_type and not regions):
            raise ValueError(f"mid_block_type {mid_block_type!r}: only UNetMidBlock2DCrossAttn, "
                             'and only with prompt_head "regions"')
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
        if regions:  # ProFusion's head: every map is brought to the input's size / `stride` before the last conv
            stride = max(2 ** (levels - 1), 8)
            self.first_prompt_projection = nn.Conv2d(block_out_channels[0], region_channels, stride, stride=stride)
            self.down_prompt_projections = nn.ModuleList()
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
                    upcast_attention=upcast_attention,
                )
            )
            channels_in = channels
            if regions:
                stride = stride // 2 if level < levels - 1 else stride
                self.down_prompt_projections.append(nn.Conv2d(channels, region_channels, stride, stride=stride))
            else:
                self.stage_heads.append(nn.Conv2d(channels, head_channels, kernel_size=1))
        if not regions:
            pooled = levels * head_channels * pool_size * pool_size
            self.to_embedding = nn.Linear(pooled, num_tokens * embedding_dim)
            return
        self.mid_block = None
        if mid_block_type:
            self.mid_block = UNetMidBlock2DCrossAttn(
                in_channels=block_out_channels[-1],
                temb_channels=time_dim,
                resnet_eps=norm_eps,
                resnet_act_fn="silu",
                resnet_groups=norm_num_groups,
                num_attention_heads=heads[-1],
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention,
            )
            self.mid_prompt_projection = nn.Conv2d(block_out_channels[-1], region_channels, stride, stride=stride)
        maps = 1 + levels + (1 if mid_block_type else 0)
        self.region_prompt_output = nn.Conv2d(maps * region_channels, embedding_dim, region_kernel_size,
                                              stride=region_kernel_size)

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
        if self.config.prompt_head == "regions":
            return self._region_prompt(hidden, temb, context, tuple(noisy_latents.shape[-2:]))
        pooled = []
        for block, head in zip(self.down_blocks, self.stage_heads):
            if context is not None:
                hidden, _ = block(hidden, temb, encoder_hidden_states=context)
            else:
                hidden, _ = block(hidden, temb)
            pooled.append(F.adaptive_avg_pool2d(head(hidden), self.config.pool_size))
        features = F.silu(torch.cat(pooled, dim=1)).flatten(1)
        return self.to_embedding(features).view(batch, self.config.num_tokens, self.config.embedding_dim)

    def _region_prompt(self, hidden, temb, context, latent_size: tuple[int, ...]) -> torch.Tensor:
        """ProFusion's head: one token per `region_kernel_size` cell of the common grid."""
        maps = [self.first_prompt_projection(hidden)]
        for block, projection in zip(self.down_blocks, self.down_prompt_projections):
            if getattr(block, "has_cross_attention", False):
                hidden, _ = block(hidden, temb, encoder_hidden_states=context)
            else:
                hidden, _ = block(hidden, temb)
            maps.append(projection(hidden))
        if self.mid_block is not None:
            hidden = self.mid_block(hidden, temb, encoder_hidden_states=context)
            maps.append(self.mid_prompt_projection(hidden))
        tokens = self.region_prompt_output(torch.cat(maps, dim=1)).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.config.num_tokens:
            raise ValueError(
                f"this PromptNet makes {tokens.shape[1]} tokens from a {latent_size} latent, but num_tokens is "
                f"{self.config.num_tokens}: ProFusion's head makes "
                f"(latent side / {self.first_prompt_projection.stride[0] * self.config.region_kernel_size})^2 tokens"
            )
        return tokens

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' loader, or `from_profusion_release` for a folder in ProFusion's released layout."""
        folder = profusion_release_folder(pretrained_model_name_or_path)
        if folder is not None:
            model = cls.from_profusion_release(folder)
            dtype = kwargs.get("torch_dtype")
            return (model.to(dtype) if dtype is not None else model).eval()
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_profusion_release(
        cls, source: str | Path | Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
    ) -> PromptNet:
        """A "regions" PromptNet holding the weights of ProFusion's released PromptNet.

        `source` is the released pipeline folder, its `promptnet/` folder (config.json +
        diffusion_pytorch_model.bin or .safetensors), or that state dict itself (then `config` is
        the release's config.json as a dict). Refuses, naming the key, any tensor that is unknown,
        missing or of another shape, and any config value this module does not compute the same way.
        The release's residual projections are dropped: its pipeline adds them to the UNet times
        `res_scale=0.` and its training only regularizes them (see `RELEASE_UNUSED`).
        """
        if isinstance(source, Mapping):
            if config is None:
                raise ValueError("from_profusion_release(state_dict) needs the release's config (its config.json)")
            state = dict(source)
        else:
            folder = profusion_release_folder(source)
            if folder is None:
                raise ValueError(f"{source} is not a ProFusion PromptNet folder (a config.json with "
                                 f'"_class_name": "{RELEASE_CLASS}", or a pipeline folder with promptnet/)')
            config = config if config is not None else json.loads((folder / "config.json").read_text())
            state = _read_release_weights(folder)
        model = cls(**profusion_release_settings(config))
        model.load_state_dict(map_profusion_release_state(state, model.state_dict()), strict=True)
        return model

    def copy_matching_weights(self, state: dict[str, torch.Tensor]) -> int:
        """Copy every tensor whose name and shape match one of ours; returns how many were copied."""
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matched, strict=False)
        return len(matched)


# --- ProFusion's released PromptNet ------------------------------------------------------
#
# Layout read from github.com/drboog/ProFusion (diffusers/src/diffusers/models/promptnet.py,
# `PromptNetModel`, diffusers 0.15.0.dev0; train.py builds it from SD2's `unet` config with
# use_clip_vision_embeds, use_res, with_noise, res_block_out_channels=(320, 640, 1280, 1280),
# prompt_channel=1024, and saves the whole `StableDiffusionPromptNetPipeline` with save_pretrained:
# <folder>/model_index.json, <folder>/promptnet/{config.json, diffusion_pytorch_model.bin} (a torch.save'd
# state dict), <folder>/openclip/ (transformers CLIPModel, ViT-H/14), unet/, vae/, tokenizer/, scheduler/.

RELEASE_CLASS = "PromptNetModel"
RELEASE_SUBFOLDER = "promptnet"
RELEASE_IMAGE_ENCODER = "openclip"
RELEASE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# release name prefix -> ours; every other release key is ours unchanged (the UNet trunk, the head)
RELEASE_RENAMES = {
    "promptnet_cond_embedding.conv_in.": "noisy_in.0.",
    "promptnet_cond_embedding.conv_out.": "noisy_in.2.",
    "vision_embedding.": "image_proj.",
}
RELEASE_SAME = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "first_prompt_projection.",
                "down_prompt_projections.", "mid_prompt_projection.", "region_prompt_output.")
# residual outputs for the UNet: unused by the release (its pipeline scales them by res_scale=0.)
RELEASE_UNUSED = ("residual_projections.", "residual_projections_2.", "mid_residual_projection.",
                  "mid_residual_projection_2.")
# config values (release defaults when absent) the release may hold only as these: others change the math
RELEASE_FIXED = {
    "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "class_embed_type": None,
    "num_class_embeds": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "act_fn": "silu", "downsample_padding": 1, "dual_cross_attention": False, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "mid_block_scale_factor": 1, "center_input_sample": False,
    "with_noise": True,
}
RELEASE_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


def profusion_release_folder(path: Any) -> Path | None:
    """The folder holding a released PromptNet's config.json (`path` or its promptnet/), or None."""
    if isinstance(path, Mapping) or not Path(str(path)).is_dir():
        return None
    for folder in (Path(path), Path(path) / RELEASE_SUBFOLDER):
        config = folder / "config.json"
        if config.is_file():
            with contextlib.suppress(ValueError):
                if json.loads(config.read_text()).get("_class_name") == RELEASE_CLASS:
                    return folder
    return None


def profusion_release_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our PromptNet's settings for the release's config.json; refuses settings we compute otherwise."""
    for key, value in RELEASE_FIXED.items():
        got = config.get(key, value)
        if key == "only_cross_attention" and isinstance(got, list | tuple):
            got = any(got)
        if got != value:
            raise ValueError(f"ProFusion PromptNet config {key}={got!r}: only {value!r} is supported")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in RELEASE_MID_BLOCKS:
        raise ValueError(f"ProFusion PromptNet config mid_block_type={mid!r}: only {RELEASE_MID_BLOCKS} are supported")
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError(f"ProFusion PromptNet config layers_per_block={layers!r}: expected one number")
    heads = config.get("attention_head_dim", 8)  # diffusers 0.15 passed it on as the number of heads
    return dict(
        in_channels=config.get("in_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (160, 320, 640, 640))),
        down_block_types=tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))),
        layers_per_block=layers,
        num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
        cross_attention_dim=config.get("cross_attention_dim", 1024),
        image_embed_dim=1280 if config.get("use_clip_vision_embeds", False) else 1024,
        use_linear_projection=config.get("use_linear_projection", False),
        upcast_attention=config.get("upcast_attention", False),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        embedding_dim=config.get("prompt_channel", 1024),
        num_tokens=1,  # one region at ProFusion's 512 px (64 / 8 / 8)
        prompt_head="regions",
        region_channels=config.get("region_proj_channel", 128),
        region_kernel_size=config.get("region_kernel_size", 8),
        mid_block_type=mid,
        s_star_position_embedding=False,  # its pipeline writes S* over token + position embedding
    )


def profusion_release_key(key: str) -> str | None:
    """Our parameter name for the release's `key`; None for a tensor the release leaves unused."""
    for prefix, ours in RELEASE_RENAMES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    if key.startswith(RELEASE_SAME):
        return key
    if key.startswith(RELEASE_UNUSED):
        return None
    raise KeyError(key)


def map_profusion_release_state(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The release's state dict under our names, checked against `own` (our state dict) tensor by tensor."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        try:
            name = profusion_release_key(key)
        except KeyError:
            raise ValueError(f"ProFusion PromptNet checkpoint: unknown key {key!r}") from None
        if name is None:
            continue
        if name not in own:
            raise ValueError(f"ProFusion PromptNet checkpoint: key {key!r} (ours: {name!r}) is not in this PromptNet")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"ProFusion PromptNet checkpoint: {key!r} has shape {tuple(tensor.shape)}, "
                             f"ours ({name!r}) has {tuple(own[name].shape)}")
        mapped[name] = tensor
    missing = [name for name in own if name not in mapped]
    if missing:
        raise ValueError(f"ProFusion PromptNet checkpoint lacks {missing[0]!r} ({len(missing)} tensors missing)")
    return mapped


def _read_release_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in RELEASE_WEIGHTS:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds none of {RELEASE_WEIGHTS}")


# --- image encoder ---------------------------------------------------------------------


def load_image_encoder(source: str | Path, **kwargs):
    """The CLIP vision tower PromptNet reads (ProFusion: OpenCLIP ViT-H/14's last hidden state)."""
    return CLIPVisionModel.from_pretrained(str(source), **kwargs)


def image_encoder_path(checkpoint: str | Path) -> Path | None:
    """`<checkpoint>/image_encoder`; for ProFusion's released pipeline, its `openclip/` (a CLIPModel)."""
    candidate = Path(checkpoint) / IMAGE_ENCODER_FOLDER
    if candidate.is_dir():
        return candidate
    release = profusion_release_folder(checkpoint)
    if release is not None:
        for folder in (release.parent, release):
            if (folder / RELEASE_IMAGE_ENCODER).is_dir():
                return folder / RELEASE_IMAGE_ENCODER
    return None


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
    writes `S*` over those positions, so the encoder adds its position embedding to `S*`.
    With `position_embedding=False` the hook sits on the whole input embedding (token +
    position) instead, as ProFusion's pipeline inserts `S*`: set it from the PromptNet's
    `s_star_position_embedding` (False for an encoder loaded from ProFusion's release).
    """

    PLACEHOLDER = "<|sstar|>"

    def __init__(self, tokenizer, text_encoder, position_embedding: bool = True):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.position_embedding = position_embedding
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
        if self.position_embedding:
            embedding = self.text_encoder.get_input_embeddings()
        else:  # CLIPTextEmbeddings: token + position embedding
            embedding = getattr(self.text_encoder, "text_model", self.text_encoder).embeddings
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
