"""The two models as training tasks: a model, a per-sample loss, and how its weights are saved and loaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from factory.framework.config import StorageConfig
from factory.framework.models_cache import local_model
from models.assistant import WEIGHTS_FILE, CafeAssistant, assistant_loss
from models.base import half_dtype
from models.cafe import CafeUNet, ImageEncoders, diffusion_loss, encode_latents, images_to_pixels, local_folder
from models.training.data import sample_images
from models.training.optimizer_state import full_state_options

if TYPE_CHECKING:
    from factory.dataset.shards import Sample
    from models.training.job import TrainJob


class GeneratorTask:
    """G with frozen E, F and VAE; loss is equation 3 per sample."""

    def __init__(self, job: TrainJob, device):
        s = job.settings
        storage = StorageConfig(**job.storage)
        self.settings = s
        self.lr, self.batch_size = s.generator_lr, s.generator_batch_size
        if s.init_from:
            self.model = CafeUNet.from_pretrained(local_folder(s.init_from, storage))
            self.model.register_to_config(base_model=s.base_model, clip_model=s.clip_model, dino_model=s.dino_model)
        else:
            self.model = CafeUNet.from_base(s.base_model, s.clip_model, s.dino_model, storage=storage)
        self.model.set_trainable(s.generator_trainable)
        frozen_dtype = half_dtype(device, torch.bfloat16)
        self.encoders = ImageEncoders(s.clip_model, s.dino_model, device, frozen_dtype, storage)
        base = local_model(s.base_model, storage, "train.base_model")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(device).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = s.image_size or self.model.unet.config.sample_size * vae_factor

    def loss(self, model, samples: list[Sample], generator):
        inputs, targets = sample_images(samples, "input_image"), sample_images(samples, "target_image")
        dino = self.encoders.dino_features(inputs)
        clip = self.encoders.clip_embeds(targets)
        latents = encode_latents(self.vae, images_to_pixels(targets, self.image_size), generator)
        return diffusion_loss(
            model, self.scheduler, latents, clip, dino, self.settings.condition_dropout, generator
        )

    def gather_state(self, model) -> None:
        return None  # DDP keeps whole weights on every rank

    def save(self, model, state: None, folder: Path) -> None:
        unwrap(model).save_pretrained(folder)

    def load(self, folder: Path) -> None:
        self.model.load_state_dict(CafeUNet.from_pretrained(folder).state_dict(), strict=True)


class AssistantTask:
    """The assistant heads over the frozen LLM, with frozen E and F; loss is equation 2."""

    def __init__(self, job: TrainJob, device):
        s = job.settings
        storage = StorageConfig(**job.storage)
        self.settings = s
        self.lr, self.batch_size = s.assistant_lr, s.assistant_batch_size
        llm_dtype = half_dtype(device, torch.bfloat16)
        if s.init_from:
            folder = local_folder(s.init_from, storage)
            self.model = CafeAssistant.from_pretrained(folder, llm_model=s.llm_model, dtype=llm_dtype, storage=storage)
            self.model.take_settings(s.clip_model, s.dino_model, s.max_text_tokens, storage)
        else:
            self.model = CafeAssistant.from_parts(s.llm_model, s.clip_model, s.dino_model, s.max_text_tokens, llm_dtype,
                                                  storage)
        self.encoders = ImageEncoders(s.clip_model, s.dino_model, device, llm_dtype, storage)

    def loss(self, model, samples: list[Sample], generator):
        inputs, targets = sample_images(samples, "input_image"), sample_images(samples, "target_image")
        dino = self.encoders.dino_features(inputs)
        clip = self.encoders.clip_embeds(targets)
        output = model(dino, [s.user for s in samples], [s.assistant for s in samples])
        return assistant_loss(output, clip, self.settings.clip_loss_weight)

    def gather_state(self, model) -> dict[str, Any]:
        """The trainable layers, whole."""
        state = get_model_state_dict(model, options=full_state_options(ignore_frozen_params=True))
        new_layers = set(unwrap(model).new_layers())
        return {name: value for name, value in state.items() if name in new_layers}  # tied frozen weights slip in

    def save(self, model, state: dict[str, Any], folder: Path) -> None:
        unwrap(model).save_pretrained(folder, new_layers=state)

    def load(self, folder: Path) -> None:
        self.model.load_new_layers(load_file(str(folder / WEIGHTS_FILE)))


def build_task(job: TrainJob, device):
    return GeneratorTask(job, device) if job.model == "generator" else AssistantTask(job, device)


def unwrap(model):
    return model.module if hasattr(model, "module") else model
