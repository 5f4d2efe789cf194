"""ProFusion (arXiv 2305.13579) on current diffusers with Stable Diffusion 2 components.

Per reference image: a copy of the loaded PromptNet (and, by default, the UNet's attention
q/k/v) is fine-tuned for a few dozen steps with the diffusion loss on augmented views of that
one image, then every job's instruction is sampled with fusion sampling:

- fusion stage (`refine_steps` times per timestep): a DDIM step from x_t to the next timestep
  guided by the S* prompt alone, its S* weakened by `refine_embedding_scale`, then noised back
  to t;
- final step: classifier-free guidance that adds the S* prompt's direction
  (`guidance_scale`) and the plain class prompt's direction (`class_guidance_scale`), taken
  with the pipeline's scheduler.

`S*` is re-encoded at every call of the UNet: PromptNet reads the current noisy latent and
timestep besides the reference. The loaded weights are never changed: each reference starts
from them again.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextModel, CLIPTokenizer

from factory.framework.config import GeneratorSpec
from factory.framework.images import to_rgb
from factory.framework.models_cache import local_model, model_ref
from models.base import (
    DIFFUSERS_LOADING,
    EvaluationCounter,
    GenJob,
    GenResult,
    autocast_to,
    parse_options,
    resolve_dtype,
    synchronize,
)
from models.promptnet import (
    IMAGE_ENCODER_FOLDER,
    PlaceholderPrompts,
    PromptNet,
    clip_image_tokens,
    image_encoder_path,
    load_image_encoder,
)

if TYPE_CHECKING:
    from factory.framework.config import GeneratorSpec

log = logging.getLogger(__name__)

ATTENTION_PROJECTIONS = (".to_q.", ".to_k.", ".to_v.")
PROFUSION_IMAGE_ENCODER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # ProFusion's PromptNet reads its vision tokens


class ProFusionOptions(BaseModel):
    """`GeneratorSpec.options` for kind "profusion"; defaults follow ProFusion's released code."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN passes no bound and is not JSON

    # test-time fine-tuning on the one reference
    finetune_steps: int = Field(50, ge=0)
    finetune_lr: float = Field(2e-5, gt=0)
    finetune_weight_decay: float = Field(1e-2, ge=0)
    finetune_batch_size: int = Field(2, ge=1)
    finetune_views: int = Field(8, ge=1, description="augmented copies of the reference (flip, crop)")
    finetune_min_crop: float = Field(0.7, gt=0, le=1, description="smallest crop side, as a fraction")
    finetune_unet_attention: bool = Field(True, description="also tune the UNet's attention q/k/v")
    finetune_prompt: str = "a photo of {subject}"
    finetune_seed: int = Field(0, ge=0, lt=2**32, description="numpy and torch take [0, 2**32)")
    # fusion sampling
    fusion: bool = Field(True, description="False: plain classifier-free guidance on the S* prompt")
    class_guidance_scale: float = 5.0
    refine_steps: int = Field(1, ge=0)
    refine_guidance_scale: float = 7.0
    refine_embedding_scale: float = 0.6
    refine_eta: float = Field(1.0, ge=0)
    negative_prompt: str = ""
    scheduler: Literal["ddim", "pipeline"] = Field("ddim", description="DDIM from the pipeline's config, or its own")
    batch_size: int = Field(4, ge=1, description="jobs sampled together")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float16 on CUDA")
    image_encoder: str | None = Field(None, description="CLIP vision tower; default: <checkpoint>/image_encoder")


class ProFusionGenerator:
    """The `models.base.Generator` for kind "profusion"."""

    kind = "profusion"

    def __init__(self, name: str, spec: GeneratorSpec, device: str = "cpu", storage: Any = None):
        self.name = name
        self.spec = spec
        self.storage = storage
        self.options = parse_options(name, ProFusionOptions, spec.options)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.options.dtype, self.device)
        self.stats: dict[str, float] = {"references": 0, "finetune_runs": 0, "finetune_seconds": 0.0, "images": 0}
        self._load(spec)
        self._check_sizes()
        self.unet_evals = EvaluationCounter(self.unet)

    # --- loading -----------------------------------------------------------------------

    def _load(self, spec: GeneratorSpec) -> None:
        frozen = dict(torch_dtype=self.dtype, **DIFFUSERS_LOADING)
        where = f"generate.generators.{self.name}"
        model = local_model(spec.model, self.storage, f"{where}.model")
        checkpoint = local_model(spec.checkpoint, self.storage, f"{where}.checkpoint")
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **frozen)
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **frozen)
        self.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=self.dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.scheduler = _load_scheduler(model, self.options.scheduler)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        self.image_encoder = self._load_image_encoder(checkpoint)
        self.promptnet = self._load_promptnet(checkpoint)
        for module in (self.vae, self.unet, self.text_encoder, self.image_encoder, self.promptnet):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        self.prompts = PlaceholderPrompts(
            tokenizer, self.text_encoder, position_embedding=self.promptnet.config.s_star_position_embedding
        )

    def _load_image_encoder(self, checkpoint: str | None):
        source = local_model(self.options.image_encoder, self.storage,
                             f"generate.generators.{self.name}.options.image_encoder")
        source = source or (image_encoder_path(checkpoint) if checkpoint else None)
        return None if source is None else load_image_encoder(source, dtype=self.dtype)

    def _load_promptnet(self, checkpoint: str | None) -> PromptNet:
        hidden = self.text_encoder.config.hidden_size
        if checkpoint is None:
            log.warning(
                "generator %r has no PromptNet checkpoint: starting PromptNet from the UNet's weights; "
                "only the per-reference fine-tuning will train it", self.name,
            )
            image_dim = self.image_encoder.config.hidden_size if self.image_encoder is not None else None
            return PromptNet.from_unet(self.unet, embedding_dim=hidden, image_embed_dim=image_dim).float()
        promptnet = PromptNet.from_pretrained(checkpoint, **DIFFUSERS_LOADING).float()
        if promptnet.config.embedding_dim != hidden:
            raise ValueError(
                f"PromptNet {checkpoint} makes {promptnet.config.embedding_dim}-d embeddings "
                f"but the text encoder of {self.spec.model} takes {hidden}-d"
            )
        if promptnet.uses_image_embeds and self.image_encoder is None:
            raise ValueError(
                f"PromptNet {checkpoint} reads CLIP image tokens: set options.image_encoder "
                f"or save the encoder in {checkpoint}/image_encoder"
            )
        if not promptnet.uses_image_embeds:
            self.image_encoder = None
        return promptnet

    def _check_sizes(self) -> None:
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.spec.image_size % multiple:
            raise ValueError(f"generator {self.name!r}: image_size must be a multiple of {multiple}")
        refining = self.options.fusion and self.options.refine_steps > 0
        if refining and not _samples_in_x_space(self.scheduler):
            raise ValueError(
                f"generator {self.name!r}: fusion refine steps need a DDIM-like scheduler; "
                f"{type(self.scheduler).__name__} is not (set options.scheduler: ddim or refine_steps: 0)"
            )

    # --- the Generator interface -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model": model_ref(self.spec.model),
            "checkpoint": model_ref(self.spec.checkpoint),
            "image_size": self.spec.image_size,
            "steps": self.spec.steps,
            "guidance_scale": self.spec.guidance_scale,
            "scheduler": type(self.scheduler).__name__,
            "options": {**self.options.model_dump(mode="json"), "image_encoder": model_ref(self.options.image_encoder)},
        }

    def generate(self, reference: Image.Image, jobs: list[GenJob]) -> list[GenResult]:
        """Fine-tune once on `reference`, then draw one image per job, in order."""
        if not jobs:
            return []
        started, before = time.perf_counter(), self.unet_evals.rows
        pixels = self._reference_pixels(reference)
        results: list[GenResult] = []
        with self._tunable_unet_attention():
            promptnet = self.finetune(pixels)
            finetune = Work(time.perf_counter() - started, self.unet_evals.rows - before).share(len(jobs))
            with torch.no_grad():
                reference_latents = self._encode_latents(pixels)
                reference_tokens = self._image_tokens(pixels)
                for start in range(0, len(jobs), self.options.batch_size):
                    batch = jobs[start : start + self.options.batch_size]
                    batch_started, batch_evals = time.perf_counter(), self.unet_evals.rows
                    images = self._sample(promptnet, reference_latents, reference_tokens, batch)
                    synchronize(self.device)
                    sampling = Work(time.perf_counter() - batch_started, self.unet_evals.rows - batch_evals)
                    for job, image in zip(batch, images):
                        results.append(GenResult(image, self._info(job, finetune, sampling.share(len(batch)))))
        self.stats["references"] += 1
        self.stats["images"] += len(results)
        return results

    def _info(self, job: GenJob, finetune: Work, sampling: Work) -> dict[str, Any]:
        options = self.options
        return {
            "name": self.name,
            "kind": self.kind,
            "checkpoint": model_ref(self.spec.checkpoint),
            "seed": job.seed,
            "steps": self.spec.steps,
            "guidance_scale": self.spec.guidance_scale,
            "class_guidance_scale": options.class_guidance_scale if options.fusion else None,
            "refine_steps": options.refine_steps if options.fusion else 0,
            "finetune_steps": options.finetune_steps,
            "finetune_seconds": finetune.seconds,
            "sample_seconds": sampling.seconds,
            "seconds": finetune.seconds + sampling.seconds,
            "unet_evals": sampling.unet_evals,
            "finetune_unet_evals": finetune.unet_evals,
            "device": str(self.device),
        }

    # --- test-time fine-tuning ---------------------------------------------------------

    def finetune(self, pixels: torch.Tensor) -> PromptNet:
        """A fine-tuned copy of the loaded PromptNet (the UNet's attention is tuned in place,
        inside `_tunable_unet_attention`, which puts it back)."""
        options = self.options
        started = time.perf_counter()
        promptnet = copy.deepcopy(self.promptnet)
        self.stats["finetune_runs"] += 1
        if options.finetune_steps == 0:
            return promptnet
        rng = torch.Generator().manual_seed(options.finetune_seed)
        with torch.no_grad():
            views = _augmented_views(pixels, options.finetune_views, options.finetune_min_crop, rng)
            latents = self._encode_latents(views)
            tokens = self._image_tokens(views)
        prompt = self.prompts.render(options.finetune_prompt, promptnet.config.num_tokens)
        trainable = list(promptnet.parameters())
        if options.finetune_unet_attention:
            trainable += [param for _, param in self._attention_parameters()]
        promptnet.requires_grad_(True).train()
        step = self._optimizer_step(trainable, options.finetune_lr, options.finetune_weight_decay)
        batch = options.finetune_batch_size
        for _ in range(options.finetune_steps):
            source = torch.randint(len(latents), (batch,), generator=rng).to(self.device)
            target = torch.randint(len(latents), (batch,), generator=rng).to(self.device)
            source_tokens = None if tokens is None else tokens[source]
            step(self.diffusion_loss(promptnet, latents[source], source_tokens, latents[target], prompt, rng))
        promptnet.requires_grad_(False).eval()
        synchronize(self.device)
        self.stats["finetune_seconds"] += time.perf_counter() - started
        return promptnet

    def diffusion_loss(self, promptnet, reference_latents, reference_tokens, clean, prompt: str, rng) -> torch.Tensor:
        """The denoising loss on `clean` latents with the prompt's S* read from the references."""
        batch = clean.shape[0]
        noise = torch.randn(clean.shape, generator=rng).to(self.device, clean.dtype)
        horizon = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(horizon, (batch,), generator=rng).to(self.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        with self._autocast():
            s_star = promptnet(reference_latents, noisy, timesteps, reference_tokens)
            states = self.prompts.encode([prompt] * batch, s_star)
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=states).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            goal = self.noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            goal = noise
        return F.mse_loss(prediction.float(), goal.float())

    def _optimizer_step(self, parameters, lr: float, weight_decay: float,
                        max_grad_norm: float | None = None) -> ScaledAdamW:
        """AdamW with loss scaling under float16 autocast; call it as `step(loss)`."""
        return ScaledAdamW(parameters, lr, weight_decay, self.device, self.dtype, max_grad_norm)

    def _attention_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if any(k in n for k in ATTENTION_PROJECTIONS)]

    @contextlib.contextmanager
    def _tunable_unet_attention(self) -> Iterator[None]:
        """Give the UNet's q/k/v float32 working copies for the reference, then the loaded ones back."""
        if not (self.options.finetune_unet_attention and self.options.finetune_steps > 0):
            yield
            return
        loaded = {name: param.data for name, param in self._attention_parameters()}
        for _, param in self._attention_parameters():
            param.data = param.data.detach().clone().float()
            param.requires_grad_(True)
        try:
            yield
        finally:
            for name, param in self._attention_parameters():
                param.data = loaded[name]
                param.grad = None
                param.requires_grad_(False)

    # --- fusion sampling ---------------------------------------------------------------

    def _sample(self, promptnet, reference_latents, reference_tokens, jobs: list[GenJob]) -> list[Image.Image]:
        options = self.options
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(self.spec.steps, device=self.device)
        generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
        side = self.spec.image_size // self.vae_scale
        latents = _noise((self.unet.config.in_channels, side, side), generators).to(self.device, torch.float32)
        latents = latents * scheduler.init_noise_sigma

        tokens = promptnet.config.num_tokens
        star_prompts = [self.prompts.render(job.template, tokens) for job in jobs]
        uncond = self.prompts.encode([options.negative_prompt] * len(jobs))
        plain = self.prompts.encode([job.instruction for job in jobs]) if options.fusion else None
        context = _SamplingContext(promptnet, reference_latents, reference_tokens, star_prompts, uncond, plain)
        step_kwargs = _step_kwargs(scheduler, generators)

        timesteps = list(scheduler.timesteps)
        for index, t in enumerate(timesteps):
            if options.fusion:
                following = timesteps[index + 1] if index + 1 < len(timesteps) else None
                for _ in range(options.refine_steps):
                    latents = self._fusion_stage(scheduler, context, latents, t, following, generators)
            guided = self._guided_output(scheduler, context, latents, t)
            latents = scheduler.step(guided, t, latents, **step_kwargs).prev_sample
        return self._decode(latents)

    def _predict(self, scheduler, context: _SamplingContext, latents, t, conditions, s_star_scale=1.0):
        """UNet outputs for `latents` under [uncond, S* prompt, *conditions]."""
        model_input = scheduler.scale_model_input(latents, t)
        with self._autocast():
            s_star = context.promptnet(context.reference_latents, model_input, t, context.reference_tokens)
            star = self.prompts.encode(context.star_prompts, s_star, scale=s_star_scale)
            states = torch.cat([context.uncond, star, *conditions]).to(self.unet.dtype)
            copies = 2 + len(conditions)
            sample = model_input.repeat(copies, 1, 1, 1).to(self.unet.dtype)
            output = self.unet(sample, t, encoder_hidden_states=states).sample
        return output.float().chunk(copies)

    def _guided_output(self, scheduler, context, latents, t) -> torch.Tensor:
        options = self.options
        conditions = [context.plain] if options.fusion else []
        uncond, star, *rest = self._predict(scheduler, context, latents, t, conditions)
        plain = rest[0] if rest else None
        return fusion_guidance(uncond, star, self.spec.guidance_scale, plain, options.class_guidance_scale)

    def _fusion_stage(self, scheduler, context, latents, t, following, generators) -> torch.Tensor:
        """One DDIM step to the next timestep under the (weakened) S* prompt, then noise back to t."""
        options = self.options
        uncond, star = self._predict(scheduler, context, latents, t, [], options.refine_embedding_scale)
        output = fusion_guidance(uncond, star, options.refine_guidance_scale)
        alphas = scheduler.alphas_cumprod
        alpha_t = float(alphas[int(t)])
        if following is None:
            alpha_next = float(getattr(scheduler, "final_alpha_cumprod", alphas[0]))
        else:
            alpha_next = float(alphas[int(following)])
        eps = _to_epsilon(output, latents, alpha_t, scheduler.config.prediction_type)
        shape = tuple(latents.shape[1:])
        step_noise = _noise(shape, generators).to(latents)
        back_noise = _noise(shape, generators).to(latents)
        return refine_step(latents, eps, alpha_t, alpha_next, options.refine_eta, step_noise, back_noise)

    # --- images and latents ------------------------------------------------------------

    def _reference_pixels(self, reference: Image.Image) -> torch.Tensor:
        image = to_rgb(reference)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.spec.image_size, self.spec.image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device)

    def _encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mode().float() * self.vae.config.scaling_factor

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor | None:
        if self.image_encoder is None:
            return None
        return clip_image_tokens(self.image_encoder, pixels).float()

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        arrays = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = arrays.permute(0, 2, 3, 1).cpu().numpy()
        size = (self.spec.image_size, self.spec.image_size)
        return [_sized(Image.fromarray(array), size) for array in arrays]


    def _autocast(self):
        return autocast_to(self.device, self.dtype)


class ScaledAdamW:
    """AdamW with loss scaling under float16 autocast on CUDA: `step(loss)` backpropagates, clips
    (with `max_grad_norm`), steps and zeroes the gradients. `optimizer` is there for its state."""

    def __init__(self, parameters, lr: float, weight_decay: float, device: torch.device, dtype: torch.dtype,
                 max_grad_norm: float | None = None):
        self.parameters = list(parameters)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        scaled = device.type == "cuda" and dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaled)
        self.max_grad_norm = max_grad_norm

    def __call__(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class PromptNetTraining:
    """ProFusion's PromptNet pre-training objective (its train.py: SD2-base, lr 2e-5, batch 8, 80k
    steps): the denoising loss on one augmented view of a reference, with S* read from another
    view of the same image. The SD parts are frozen; `promptnet` is the trainable module (wrap it
    for DDP and pass the wrapper to `loss`). Starts from `checkpoint` (and its image encoder), else
    from the UNet's down path (reading `image_encoder`'s tokens when given; ProFusion used
    `PROFUSION_IMAGE_ENCODER`)."""

    def __init__(self, model: str, *, checkpoint: str | None = None, image_encoder: str | None = None,
                 device: str = "cpu", image_size: int = 512, prompt: str = "a photo of {subject}",
                 storage: Any = None):
        spec = GeneratorSpec(
            kind="profusion", model=model, checkpoint=checkpoint, image_size=image_size,
            options={"image_encoder": image_encoder, "finetune_unet_attention": False},
        )
        self.frozen = ProFusionGenerator("promptnet-training", spec, device=device, storage=storage)
        self.promptnet = self.frozen.promptnet.requires_grad_(True).train()
        self.text = self.frozen.prompts.render(prompt, self.promptnet.config.num_tokens)

    def optimizer_step(self, parameters, lr: float, weight_decay: float, max_grad_norm: float | None) -> ScaledAdamW:
        return self.frozen._optimizer_step(parameters, lr, weight_decay, max_grad_norm)

    def loss(self, promptnet, images: Sequence[Image.Image], min_crop: float, rng: torch.Generator) -> torch.Tensor:
        """The loss on `images` (one batch); `promptnet` is `self.promptnet` or its DDP wrapper."""
        frozen = self.frozen
        with torch.no_grad():
            pixels = torch.cat([frozen._reference_pixels(image) for image in images])
            reference = _augment_each(pixels, min_crop, rng)
            target = _augment_each(pixels, min_crop, rng)
            reference_latents, target_latents = frozen._encode_latents(torch.cat([reference, target])).chunk(2)
            tokens = frozen._image_tokens(reference)
        return frozen.diffusion_loss(promptnet, reference_latents, tokens, target_latents, self.text, rng)

    def save(self, output: str | Path) -> str:
        self.promptnet.requires_grad_(False).eval()
        return save_promptnet(self.promptnet, output, self.frozen.image_encoder)


def train_promptnet(
    model: str,
    images: Sequence[Image.Image],
    output: str | Path,
    *,
    checkpoint: str | None = None,
    image_encoder: str | None = None,
    device: str = "cpu",
    steps: int = 80_000,
    lr: float = 2e-5,
    batch_size: int = 8,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
    image_size: int = 512,
    prompt: str = "a photo of {subject}",
    min_crop: float = 0.7,
    seed: int = 0,
) -> str:
    """Pre-train PromptNet on `images` in this process (`PromptNetTraining`; `--stage promptnet`
    runs the same objective on Ray Train). Writes a PromptNet checkpoint (with its
    `image_encoder/`) to `output` and returns its path."""
    if not images:
        raise ValueError("train_promptnet needs at least one image")
    training = PromptNetTraining(model, checkpoint=checkpoint, image_encoder=image_encoder, device=device,
                                 image_size=image_size, prompt=prompt)
    step = training.optimizer_step(training.promptnet.parameters(), lr, weight_decay, max_grad_norm)
    rng = torch.Generator().manual_seed(seed)
    for number in range(steps):
        picks = torch.randint(len(images), (batch_size,), generator=rng).tolist()
        loss = training.loss(training.promptnet, [images[i] for i in picks], min_crop, rng)
        step(loss)
        if number % 100 == 0:
            log.info("promptnet step %d/%d loss %.4f", number, steps, loss.item())
    return training.save(output)


def save_promptnet(promptnet: PromptNet, output: str | Path, image_encoder=None) -> str:
    """Write a PromptNet checkpoint folder: the model, and the CLIP vision tower it reads."""
    folder = Path(output)
    promptnet.save_pretrained(str(folder))
    if image_encoder is not None:
        image_encoder.save_pretrained(str(folder / IMAGE_ENCODER_FOLDER))
    return str(folder)


@dataclass
class Work:
    """Seconds and UNet evaluations spent (on one candidate, after `share`)."""

    seconds: float
    unet_evals: float

    def share(self, candidates: int) -> Work:
        return Work(self.seconds / candidates, self.unet_evals / candidates)


@dataclass
class _SamplingContext:
    """What stays fixed while one batch is denoised."""

    promptnet: PromptNet
    reference_latents: torch.Tensor
    reference_tokens: torch.Tensor | None
    star_prompts: list[str]  # the jobs' templates with the placeholder for S*
    uncond: torch.Tensor  # text states of the negative prompt
    plain: torch.Tensor | None  # text states of the instructions (the class word, no S*)


# --- the fusion formulas, on plain tensors ----------------------------------------------


def fusion_guidance(uncond: torch.Tensor, star: torch.Tensor, guidance_scale: float,
                    plain: torch.Tensor | None = None, class_guidance_scale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance towards the S* prompt and, when given, the plain class prompt:
    `uncond + guidance_scale * (star - uncond) + class_guidance_scale * (plain - uncond)`."""
    guided = uncond + guidance_scale * (star - uncond)
    if plain is not None:
        guided = guided + class_guidance_scale * (plain - uncond)
    return guided


def refine_step(latents: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_next: float, eta: float,
                step_noise: torch.Tensor, back_noise: torch.Tensor) -> torch.Tensor:
    """ProFusion's refinement: a DDIM step (stochasticity `eta`) from x_t to the next timestep
    (cumulative alphas `alpha_t` -> `alpha_next`), then noised forward again to t."""
    clean = (latents - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
    variance = (1 - alpha_next) / (1 - alpha_t) * (1 - alpha_t / alpha_next)
    sigma = eta * math.sqrt(max(variance, 0.0))
    direction = math.sqrt(max(1 - alpha_next - sigma**2, 0.0))
    stepped = math.sqrt(alpha_next) * clean + direction * eps + sigma * step_noise
    back = alpha_t / alpha_next
    return math.sqrt(back) * stepped + math.sqrt(1 - back) * back_noise


# --- helpers ---------------------------------------------------------------------------



def _load_scheduler(model: str, choice: str):
    config = DDIMScheduler.load_config(model, subfolder="scheduler")
    if choice == "ddim":
        return DDIMScheduler.from_config(config)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _samples_in_x_space(scheduler) -> bool:
    """True for schedulers whose sample is x_t itself (DDIM, DDPM, PNDM, DPM-Solver, ...)."""
    return hasattr(scheduler, "alphas_cumprod") and float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in accepted else {}


def _noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One standard normal draw of `shape` per generator, stacked (drawn on the CPU, so a
    seed gives the same noise on any device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def _to_epsilon(output: torch.Tensor, sample: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha) * output + math.sqrt(1 - alpha) * sample
    if prediction_type == "sample":
        return (sample - math.sqrt(alpha) * output) / math.sqrt(1 - alpha)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _augmented_views(pixels: torch.Tensor, count: int, min_crop: float, rng: torch.Generator) -> torch.Tensor:
    """The reference itself, then `count - 1` random square crops (side >= `min_crop`), some mirrored."""
    side = pixels.shape[-1]
    views = [pixels[0]]
    for _ in range(count - 1):
        scale = min_crop + (1 - min_crop) * float(torch.rand((), generator=rng))
        crop = max(1, round(side * scale))
        top, left = (int(torch.randint(side - crop + 1, (), generator=rng)) for _ in range(2))
        view = pixels[..., top : top + crop, left : left + crop]
        view = F.interpolate(view, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        if float(torch.rand((), generator=rng)) < 0.5:
            view = view.flip(-1)
        views.append(view)
    return torch.stack(views)


def _augment_each(pixels: torch.Tensor, min_crop: float, rng: torch.Generator) -> torch.Tensor:
    """One random crop-and-flip view of each image in the batch."""
    return torch.stack([_augmented_views(image[None], 2, min_crop, rng)[1] for image in pixels])


def _sized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
