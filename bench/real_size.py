"""What a candidate really costs: the generators, the filter and the trainers at the paper's model sizes.

    python bench/real_size.py [--parts profusion,cafe,ip_adapter,filter,train_g,train_assistant] [--threads N]
                              [--compile] [--figures FILE] [--no-figures] [--no-results] [--tiny]

Models are the real library classes built with random weights from the published
configurations in `bench/published_models.json` (speed does not depend on the weights), run
through the product's own code: ProFusion's per-reference fine-tuning and fusion sampling
(`models.profusion`), G's two-condition sampling (`models.cafe`), IP-Adapter's sampling on SD 1.5
(`models.ip_adapter`, through diffusers' own IP-Adapter pipeline), the filter stage (CLIP
ViT-B/32 + DINO ViT-S/16, batched, JPEG decode included; `stages.filter`), and the training
losses of G and the assistant heads (`models.training.tasks`, `models.assistant`). Dtypes are
the ones the production config gives on the device present (half precision under CUDA, float32
on the CPU); on CUDA, SDPA attention (diffusers' and G's processors), channels-last UNets and,
with --compile, torch.compile of the UNets.

On CUDA the production config's counts run (steps, fine-tuning steps, batch sizes), after one
warm-up. On a CPU a reduced count runs (one denoising step, one fine-tuning step, one
candidate, the assistant's LLM at 1 and 2 of its 40 layers) and each figure is extrapolated per
step, per view or per layer; every printed line says what ran and how it was scaled. On a CPU,
G and IP-Adapter reuse ProFusion's 512-px VAE decode figure (the same VAE architecture) rather
than running it again. Weights are noise, filled without the libraries' initialisers (on a CPU
those take longer than the timed work for DINOv2-giant); --compile compiles a static shape per part.

Writes the per-step figures for this device kind into factory/cost_figures.json (read by
`python -m factory.run --dry-run --device-kind KIND` and the version report) and appends a
section to bench/RESULTS.md. --tiny builds shrunken configurations of the same classes (the
test suite's end-to-end run); it writes figures only where --figures says.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("profusion", "cafe", "ip_adapter", "filter", "train_g", "train_assistant")
PRODUCTION_CONFIG = REPO / "configs" / "production.yaml"
ASSUMED_TEXT_TOKENS = {"user": 40, "answer": 200}  # the assistant's prompt and answer, per sample


@dataclass
class Counts:
    """What this run runs, against what the production config asks for."""

    reduced: bool  # CPU or tiny: a few steps, extrapolated
    tiny: bool
    sample_steps: int
    finetune_steps: int
    finetune_batch: int
    finetune_views: int
    batch: int  # candidates sampled together
    filter_candidates: int
    filter_batch: int
    train_batch: int
    assistant_batch: int
    image_size: int


@dataclass
class Bench:
    device: Any
    kind: str
    counts: Counts
    config: Any  # the production FactoryConfig
    compile: bool = False
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # models one part builds and a later one reuses

    def record(self, name: str, value: float, how: str) -> None:
        """A figure in GPU- (or CPU-) seconds and how it was obtained."""
        source = "measured" if how.startswith("measured") else "measured, extrapolated"
        self.figures[name] = {"value": round(value, 6), "source": source, "note": how}
        self.say(f"  {name:<26} {value:11.4f} s  [{source}] {how}")

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def timed(bench: Bench, work: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of `work()`, with the garbage collector held off as timeit does."""
    from models.base import synchronize

    synchronize(bench.device)
    collecting = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        result = work()
        synchronize(bench.device)
        return result, time.perf_counter() - started
    finally:
        if collecting:
            gc.enable()


def build(name: str, bench: Bench, dtype=None):
    from bench.published_models import build as build_random
    from bench.published_models import filled

    model = filled(lambda: build_random(name, tiny=bench.counts.tiny))
    return model.to(bench.device, dtype) if dtype is not None else model.to(bench.device)


def prepare_unet(unet, bench: Bench):
    """channels-last on CUDA (convolutions prefer it) and, with --compile, torch.compile."""
    import torch

    if bench.device.type != "cuda":
        return unet
    unet.to(memory_format=torch.channels_last)
    if bench.compile:
        unet.forward = torch.compile(unet.forward, dynamic=False)  # a shape per part (sampling, training)
    return unet


def reference_image(side: int):
    import io

    from PIL import Image

    from bench.synthetic import photo_like_jpeg

    return Image.open(io.BytesIO(photo_like_jpeg(7, side))).convert("RGB")


# --- ProFusion ----------------------------------------------------------------------------


def random_profusion(bench: Bench, spec):
    """The product's ProFusionGenerator, its SD2 parts, PromptNet and ViT-H/14 built from configs."""
    from models.profusion import ProFusionGenerator

    class RandomWeightProFusion(ProFusionGenerator):
        def _load(self, spec) -> None:
            from diffusers import DDPMScheduler

            from bench.published_models import filled
            from factory.tiny.sd import _sd2_ddim_scheduler, build_tiny_clip_tokenizer
            from models.promptnet import PlaceholderPrompts, PromptNet

            self.vae = build("sd2_vae", bench, self.dtype)
            self.unet = prepare_unet(build("sd2_unet", bench, self.dtype), bench)
            self.text_encoder = build("sd2_text_encoder", bench, self.dtype)
            with tempfile.TemporaryDirectory() as scratch:  # the CLIP BPE vocabulary open_clip ships
                tokenizer = build_tiny_clip_tokenizer(scratch, merges=1000 if bench.counts.tiny else 48894)
            self.scheduler = _sd2_ddim_scheduler()
            self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
            self.image_encoder = build("clip_vit_h14_vision", bench, self.dtype)
            self.promptnet = filled(lambda: PromptNet.from_unet(
                self.unet, embedding_dim=self.text_encoder.config.hidden_size,
                image_embed_dim=self.image_encoder.config.hidden_size)).float()
            for module in (self.vae, self.unet, self.text_encoder, self.image_encoder, self.promptnet):
                module.requires_grad_(False).eval().to(self.device)
            self.prompts = PlaceholderPrompts(tokenizer, self.text_encoder)

    return RandomWeightProFusion("profusion", spec, device=str(bench.device))


def profusion_spec(bench: Bench):
    counts, spec = bench.counts, bench.config.generate.generators["profusion"]
    options = {**spec.options, "finetune_steps": counts.finetune_steps, "finetune_batch_size": counts.finetune_batch,
               "finetune_views": counts.finetune_views, "batch_size": counts.batch}
    return spec.model_copy(update={"steps": counts.sample_steps, "image_size": counts.image_size, "options": options})


def run_profusion(bench: Bench, generator, jobs) -> dict[str, float]:
    import torch

    pixels = generator._reference_pixels(reference_image(512))
    seconds: dict[str, float] = {}
    with generator._tunable_unet_attention():
        with torch.no_grad():
            _, seconds["copy"] = timed(bench, lambda: copy.deepcopy(generator.promptnet))
        with timing_calls(bench, generator, ("_encode_latents", "_image_tokens"), seconds, "view") as views:
            promptnet, seconds["finetune"] = timed(bench, lambda: generator.finetune(pixels))
        seconds["view"] /= bench.counts.finetune_views
        # sampling reads one view's encodings (the reference's shapes); the decode timed is sampling's own
        latents, tokens = (None if views[name] is None else views[name][:1] for name in ("_encode_latents",
                                                                                          "_image_tokens"))
        with torch.no_grad(), timing_calls(bench, generator, ("_decode",), seconds, "decode"):
            _, seconds["sample"] = timed(bench, lambda: generator._sample(promptnet, latents, tokens, jobs))
    return seconds


@contextlib.contextmanager
def timing_calls(bench: Bench, owner, names: tuple[str, ...], seconds: dict[str, float], key: str):
    """Sum into `seconds[key]` the time of every call of `owner`'s methods `names` made inside the
    block (work a part's own code runs, timed without running it again apart); yields the last
    result of each, by name."""
    kept: dict[str, Any] = {}
    seconds[key] = 0.0
    originals = {name: getattr(owner, name) for name in names}

    def timing(name: str, call):
        def timed_call(*args, **kwargs):
            kept[name], spent = timed(bench, lambda: call(*args, **kwargs))
            seconds[key] += spent
            return kept[name]

        return timed_call

    for name, call in originals.items():
        setattr(owner, name, timing(name, call))
    try:
        yield kept
    finally:
        for name, call in originals.items():
            setattr(owner, name, call)


def part_profusion(bench: Bench) -> None:
    from models.base import GenJob

    counts = bench.counts
    generator = random_profusion(bench, profusion_spec(bench))
    jobs = [GenJob("a photo of {subject} on the beach", "dog", "a photo of a dog on the beach", seed)
            for seed in range(counts.batch)]
    if not counts.reduced:
        run_profusion(bench, generator, jobs)  # warm-up (CUDA kernels, torch.compile)
    record_profusion(bench, run_profusion(bench, generator, jobs))


def record_profusion(bench: Bench, seconds: dict[str, float]) -> None:
    """Per-step figures from one timed reference, scaled to the production config's views and batch."""
    counts, production = bench.counts, bench.config.generate.generators["profusion"]
    views = int(production.options.get("finetune_views", 8))
    batch = int(production.options.get("finetune_batch_size", 2))
    step = (seconds["finetune"] - seconds["copy"] - counts.finetune_views * seconds["view"]) / counts.finetune_steps
    scale = batch / counts.finetune_batch
    ran = f"{counts.finetune_steps} step(s) at batch {counts.finetune_batch}"
    bench.record("profusion_finetune_step_s", step * scale,
                 f"measured: {ran}" if scale == 1 else f"{ran}, x{scale:g} for batch {batch}")
    bench.record("profusion_reference_s", seconds["copy"] + views * seconds["view"],
                 f"PromptNet copy + VAE and ViT-H/14 on 1 view, x{views} views")
    sampling = (seconds["sample"] - seconds["decode"]) / counts.sample_steps / counts.batch
    bench.record("profusion_sample_step_s", sampling,
                 f"{'measured' if not counts.reduced else 'reduced'}: {counts.sample_steps} step(s), "
                 f"{counts.batch} candidate(s) per batch, per step per candidate (fusion refine step included)")
    bench.record("profusion_decode_s", seconds["decode"] / counts.batch, "measured: VAE decode per candidate")
    steps, finetune_steps = production.steps, int(production.options.get("finetune_steps", 50))
    per_reference = finetune_steps * step * scale + seconds["copy"] + views * seconds["view"]
    per_candidate = steps * sampling + seconds["decode"] / counts.batch
    bench.say(f"  ProFusion at the production config: {per_reference:.1f} s fine-tuning per reference "
              f"({finetune_steps} steps), {per_candidate:.1f} s per candidate ({steps} steps)")


# --- G (CAFE) ------------------------------------------------------------------------------


def random_encoders(bench: Bench, dtype):
    """`models.cafe.ImageEncoders` over random CLIP ViT-L/14@336 (F) and DINOv2-giant (E)."""
    from transformers import BitImageProcessor, CLIPImageProcessor

    from factory.tiny.dino import IMAGENET_MEAN, IMAGENET_STD
    from models.cafe import ImageEncoders

    class RandomEncoders(ImageEncoders):
        def __init__(self):
            self.device, self.dtype = bench.device, dtype
            self.clip = build("clip_vit_l14_336", bench, dtype).eval().requires_grad_(False)
            self.dino = build("dinov2_giant", bench, dtype).eval().requires_grad_(False)
            clip_side = self.clip.config.image_size
            self.clip_processor = CLIPImageProcessor(size={"shortest_edge": clip_side},
                                                     crop_size={"height": clip_side, "width": clip_side})
            crop = 32 if bench.counts.tiny else 224  # E(x): 257 x 1536 at 224 px (paper 4.1)
            self.dino_processor = BitImageProcessor(size={"shortest_edge": crop * 8 // 7},
                                                    crop_size={"height": crop, "width": crop},
                                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)

    return RandomEncoders()


def cafe_models(bench: Bench) -> dict[str, Any]:
    """G, its encoders and the VAE, built once for the sampling and the training parts."""
    if "cafe" not in bench.shared:
        from bench.published_models import filled, model_config
        from models.base import resolve_dtype
        from models.cafe import CafeUNet

        dtype = resolve_dtype(bench.config.generate.generators["cafe"].options.get("dtype", "auto"), bench.device)
        encoders = random_encoders(bench, dtype)
        model = filled(lambda: CafeUNet(unet_config=model_config("sd2_unet", bench.counts.tiny),
                                        clip_dim=encoders.clip.config.projection_dim,
                                        dino_dim=encoders.dino.config.hidden_size))
        prepare_unet(model.unet, bench)
        bench.shared["cafe"] = {"model": model.to(bench.device, dtype).eval(), "encoders": encoders,
                                "vae": build("sd2_vae", bench, dtype).eval(), "dtype": dtype}
    return bench.shared["cafe"]


def part_cafe(bench: Bench) -> None:
    import torch

    from factory.tiny.sd import _sd2_ddim_scheduler
    from models.cafe import Guidance, decode_images, sample_latents

    counts, parts = bench.counts, cafe_models(bench)
    model, encoders, vae = parts["model"], parts["encoders"], parts["vae"]
    reference, w_images = reference_image(512), [reference_image(512)] * counts.batch
    side = counts.image_size // 8
    noise = torch.randn(counts.batch, 4, side, side).to(bench.device, parts["dtype"])
    spec = bench.config.generate.generators["cafe"]
    guidance = Guidance(clip=spec.guidance_scale)

    def draw():
        dino = encoders.dino_features([reference]).to(parts["dtype"]).expand(counts.batch, -1, -1)
        clip = encoders.clip_embeds(w_images).to(parts["dtype"])
        return sample_latents(model, _sd2_ddim_scheduler(), clip, dino, noise, counts.sample_steps, guidance)

    if not counts.reduced:
        draw()  # warm-up
    _, dino_s = timed(bench, lambda: encoders.dino_features([reference]))
    _, clip_s = timed(bench, lambda: encoders.clip_embeds([reference]))
    _, w_s = timed(bench, lambda: encoders.clip_embeds(w_images))
    latents, total = timed(bench, draw)
    decode_s, decode_how = shared_decode(bench)
    if decode_s is None:
        _, decode_s = timed(bench, lambda: decode_images(vae, latents))
        decode_s, decode_how = decode_s / counts.batch, "measured: VAE decode per candidate"
    step = (total - dino_s - w_s) / counts.sample_steps / counts.batch
    bench.record("cafe_reference_s", dino_s + clip_s, "measured: E(x) DINOv2-giant + F(x) CLIP ViT-L/14@336, once")
    bench.record("cafe_w_s", w_s / counts.batch, "measured: F(w) per job")
    bench.record("cafe_sample_step_s", step, f"{'measured' if not counts.reduced else 'reduced'}: "
                 f"{counts.sample_steps} step(s) x 3 UNet copies (none, E, E+H), {counts.batch} per batch")
    bench.record("cafe_decode_s", decode_s, decode_how)
    bench.record("sd_step_s", step * 2 / 3, "derived from the G step: 2 of its 3 UNet copies (SD2 with CFG)")
    bench.say(f"  G at the production config: {spec.steps * step + decode_s + w_s / counts.batch:.1f} s "
              f"per candidate ({spec.steps} steps) + {dino_s + clip_s:.1f} s per reference")


def shared_decode(bench: Bench) -> tuple[float | None, str]:
    """On a CPU, G's and IP-Adapter's decode is ProFusion's (the same SD VAE architecture at the same
    size and dtype): reused, not run again (a 512-px decode is 20-30 s there). On CUDA each part
    times its own."""
    if not bench.counts.reduced or "profusion_decode_s" not in bench.figures:
        return None, ""
    return bench.figures["profusion_decode_s"]["value"], "measured in [profusion]: the same SD VAE decode"


@contextlib.contextmanager
def blank_decode(vae, seconds: dict[str, float], key: str):
    """Inside the block `vae.decode` returns black images of the decoded shape at once (its time is
    taken from `shared_decode`); `seconds[key]` stays 0, so the caller subtracts nothing."""
    import torch
    from diffusers.models.autoencoders.vae import DecoderOutput

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    seconds[key] = 0.0

    def decode(latents, return_dict=True, **_):
        batch, _, height, width = latents.shape
        images = torch.zeros(batch, vae.config.out_channels, height * factor, width * factor,
                             device=latents.device, dtype=latents.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode


# --- IP-Adapter -----------------------------------------------------------------------------


def random_ip_adapter(bench: Bench):
    """The product's IPAdapterGenerator over SD 1.5's UNet and text encoder, SD's VAE (SD 1.5's has
    SD2's architecture), ViT-H/14 with its projection and an adapter in h94's layout, all random."""
    from models.ip_adapter import IPAdapterGenerator

    class RandomWeightIPAdapter(IPAdapterGenerator):
        def _load(self, spec):
            from diffusers import StableDiffusionPipeline

            from factory.tiny.ip_adapter import ip_adapter_state_dict
            from factory.tiny.sd import _sd2_ddim_scheduler, build_tiny_clip_tokenizer

            unet = prepare_unet(build("sd15_unet", bench, self.dtype), bench)
            encoder = build("ip_adapter_image_encoder", bench, self.dtype)
            with tempfile.TemporaryDirectory() as scratch:
                tokenizer = build_tiny_clip_tokenizer(scratch, merges=1000 if bench.counts.tiny else 48894)
            pipeline = StableDiffusionPipeline(
                vae=build("sd2_vae", bench, self.dtype), text_encoder=build("sd15_text_encoder", bench, self.dtype),
                tokenizer=tokenizer, unet=unet, scheduler=_sd2_ddim_scheduler(), safety_checker=None,
                feature_extractor=None, image_encoder=encoder, requires_safety_checker=False,
            )
            weights = ip_adapter_state_dict(unet, encoder.config.projection_dim)
            pipeline.load_ip_adapter(weights, subfolder="", weight_name="", image_encoder_folder=None)
            return self._prepare(pipeline)

    counts, spec = bench.counts, bench.config.generate.generators["ip_adapter"]
    options = {**spec.options, "batch_size": counts.batch}
    spec = spec.model_copy(update={"steps": counts.sample_steps, "image_size": counts.image_size, "options": options})
    return RandomWeightIPAdapter("ip_adapter", spec, device=str(bench.device))


def part_ip_adapter(bench: Bench) -> None:
    import torch

    from models.base import GenJob

    counts, production = bench.counts, bench.config.generate.generators["ip_adapter"]
    generator = random_ip_adapter(bench)
    jobs = [GenJob("a photo of {subject} on the beach", "dog", "a photo of a dog on the beach", seed)
            for seed in range(counts.batch)]
    seconds: dict[str, float] = {}
    with torch.no_grad():
        if not counts.reduced:
            generator._sample(jobs, generator._image_embeds(reference_image(512)))  # warm-up
        embeds, seconds["reference"] = timed(bench, lambda: generator._image_embeds(reference_image(512)))
        decode_s, decode_how = shared_decode(bench)
        vae = generator.pipeline.vae
        with (timing_calls(bench, vae, ("decode",), seconds, "decode") if decode_s is None  # the pipeline's own
              else blank_decode(vae, seconds, "decode")):
            _, seconds["sample"] = timed(bench, lambda: generator._sample(jobs, embeds))
    if decode_s is None:
        decode_s, decode_how = seconds["decode"] / counts.batch, "measured: VAE decode per candidate"
    step = (seconds["sample"] - seconds["decode"]) / counts.sample_steps / counts.batch
    bench.record("ip_adapter_reference_s", seconds["reference"],
                 "measured: ViT-H/14 image embedding, once per reference")
    bench.record("ip_adapter_sample_step_s", step, f"{'measured' if not counts.reduced else 'reduced'}: "
                 f"{counts.sample_steps} step(s) x 2 UNet rows (CFG), {counts.batch} per batch, per step per candidate")
    bench.record("ip_adapter_decode_s", decode_s, decode_how)
    per_candidate = production.steps * step + decode_s
    bench.say(f"  IP-Adapter at the production config: {per_candidate:.1f} s per candidate ({production.steps} steps) "
              f"+ {seconds['reference']:.1f} s per reference")


# --- the filter -----------------------------------------------------------------------------


def filter_stage(bench: Bench, folder: Path):
    from transformers import ViTImageProcessor

    from bench.published_models import open_clip_config_file
    from factory.framework.config import FactoryConfig
    from factory.tiny.dino import IMAGENET_MEAN, IMAGENET_STD
    from stages.filter import Filter

    tiny = bench.counts.tiny
    clip_name, clip_file = open_clip_config_file(folder, "clip_vit_b32", tiny)
    dino_folder = folder / "dino"
    build("dino_vits16", bench).save_pretrained(dino_folder)
    side = 64 if tiny else 224
    ViTImageProcessor(size={"height": side, "width": side}, resample=2, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(dino_folder)
    settings = bench.config.filter.model_dump()
    settings.update(clip_model=clip_name, clip_pretrained=None, clip_model_config=str(clip_file), clip_quick_gelu=True,
                    dino_model=str(dino_folder), batch_size=bench.counts.filter_batch)
    return Filter(FactoryConfig(filter=settings), device=str(bench.device))


def part_filter(bench: Bench) -> None:
    from bench.filter_throughput import make_candidates

    counts = bench.counts
    with tempfile.TemporaryDirectory() as scratch:
        stage = filter_stage(bench, Path(scratch))
        rows = make_candidates(counts.filter_candidates, counts.image_size)
        stage(rows.iloc[:1].copy())  # warm-up
        _, seconds = timed(bench, lambda: stage(rows.copy()))
    bench.record("filter_candidate_s", seconds / counts.filter_candidates,
                 f"measured: {counts.filter_candidates} candidates of {counts.image_size}-px JPEGs in batches of "
                 f"{counts.filter_batch}, decode + CLIP-T + DINO (x~ and x)")


# --- the trainers ---------------------------------------------------------------------------


def generator_task(bench: Bench):
    """`models.training.tasks.GeneratorTask` over the random G, encoders and VAE."""
    from factory.tiny.sd import _sd2_ddim_scheduler
    from models.training.tasks import GeneratorTask

    parts = cafe_models(bench)

    class RandomGeneratorTask(GeneratorTask):
        def __init__(self):  # as GeneratorTask: G in float32, frozen encoders in bfloat16 on CUDA, VAE in float32
            import torch
            from diffusers import DDPMScheduler

            self.settings = bench.config.train
            self.model = parts["model"].float()
            self.encoders, self.vae = parts["encoders"], parts["vae"].float()
            if bench.device.type == "cuda":
                self.encoders.clip.to(torch.bfloat16)
                self.encoders.dino.to(torch.bfloat16)
                self.encoders.dtype = torch.bfloat16
            self.scheduler = DDPMScheduler.from_config(_sd2_ddim_scheduler().config)
            self.image_size = bench.counts.image_size

    return RandomGeneratorTask()


def training_samples(count: int, side: int):
    from bench.synthetic import photo_like_jpeg
    from factory.dataset.shards import Sample

    return [Sample(f"k{n}", photo_like_jpeg(2 * n, side), photo_like_jpeg(2 * n + 1, side), "user", "answer", {})
            for n in range(count)]


def optimizer_step_seconds(bench: Bench, parameters: list) -> tuple[float, str]:
    """AdamW over `parameters`; on a reduced run, over a slice of them, scaled by parameter count."""
    import torch

    total = sum(p.numel() for p in parameters)
    chosen, size = [], 0
    for param in parameters:
        if bench.counts.reduced and size >= total / 20:
            break
        chosen.append(param)
        size += param.numel()
    for param in chosen:
        param.grad = param.grad if param.grad is not None else torch.zeros_like(param)
    optimizer = torch.optim.AdamW(chosen, lr=1e-5, fused=bench.device.type == "cuda")
    optimizer.step()  # creates the state
    _, seconds = timed(bench, optimizer.step)
    how = "measured" if size == total else f"AdamW on {size / 1e6:.0f}M of {total / 1e6:.0f}M parameters, scaled"
    return seconds * total / size, how


def part_train_g(bench: Bench) -> None:
    import torch

    from models.training.loop import autocast

    counts, task = bench.counts, generator_task(bench)
    model = task.model
    trainable = model.set_trainable(bench.config.train.generator_trainable)
    model.train()
    samples = training_samples(counts.train_batch, counts.image_size)

    def forward_backward():
        with autocast(bench.device):
            loss = task.loss(model, samples, torch.Generator().manual_seed(0)).float().mean()
        loss.backward()

    if not counts.reduced:
        forward_backward()
    _, seconds = timed(bench, forward_backward)
    step, how = optimizer_step_seconds(bench, trainable)
    per_worker = max(1, bench.config.train.generator_batch_size // bench.config.train.num_workers)
    bench.record("train_generator_sample_s", seconds / counts.train_batch + step / per_worker,
                 f"{'measured' if how == 'measured' else 'reduced'}: E, F, VAE encode, loss and backward at batch "
                 f"{counts.train_batch}; "
                 f"optimizer step ({how}) shared by {per_worker} samples per worker")
    model.zero_grad(set_to_none=True)


def assistant_model(bench: Bench, layers: int):
    """`models.assistant.CafeAssistant` over a random Llama-2-13B (its first `layers` layers)."""
    import torch

    from bench.published_models import build_transformers, filled, model_config
    from factory.tiny.llama import build_tiny_tokenizer
    from models.assistant import CafeAssistant
    from models.base import half_dtype

    config = model_config("llama2_13b", bench.counts.tiny)
    config["num_hidden_layers"] = layers
    dtype = half_dtype(bench.device, torch.bfloat16)
    llm = filled(lambda: build_transformers("LlamaForCausalLM", config)).to(bench.device, dtype)
    dims = {"clip_dim": 24 if bench.counts.tiny else 768, "dino_dim": 48 if bench.counts.tiny else 1536}
    return CafeAssistant(llm, build_tiny_tokenizer(), {**dims, "max_text_tokens": 256}).to(bench.device)


def text_of_tokens(tokenizer, tokens: int) -> str:
    words = "the dog sits on a sunny beach while the waves roll in and the sky turns orange ".split()
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += words[len(text) % len(words)] + " "
    return text


def assistant_step_seconds(bench: Bench, assistant) -> float:
    import torch

    from models.assistant import assistant_loss
    from models.training.loop import autocast

    batch, dino_dim = bench.counts.assistant_batch, assistant.config["dino_dim"]
    tokens = 257 if not bench.counts.tiny else 17
    dino = torch.randn(batch, tokens, dino_dim, device=bench.device)
    clip = torch.randn(batch, assistant.config["clip_dim"], device=bench.device)
    user = text_of_tokens(assistant.tokenizer, ASSUMED_TEXT_TOKENS["user"])
    answer = text_of_tokens(assistant.tokenizer, ASSUMED_TEXT_TOKENS["answer"])
    optimizer = torch.optim.AdamW(assistant.trainable_parameters(), lr=2e-3)

    def step():
        with autocast(bench.device):
            loss = assistant_loss(assistant(dino, [user] * batch, [answer] * batch), clip, 0.2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if not bench.counts.reduced:
        step()
    return timed(bench, step)[1]


def part_train_assistant(bench: Bench) -> None:
    from bench.published_models import model_config

    layers = model_config("llama2_13b", bench.counts.tiny)["num_hidden_layers"]
    batch = bench.counts.assistant_batch
    if bench.counts.reduced:
        one = assistant_step_seconds(bench, assistant_model(bench, 1))
        gc.collect()
        two = assistant_step_seconds(bench, assistant_model(bench, 2))
        seconds = one + (layers - 1) * (two - one)
        how = f"LLM at 1 and 2 of its {layers} layers, extrapolated per layer"
    else:
        seconds, how = assistant_step_seconds(bench, assistant_model(bench, layers)), "measured"
    bench.record("train_assistant_sample_s", seconds / batch,
                 f"{how}: frozen Llama-2-13B forward and backward, 257 image + {sum(ASSUMED_TEXT_TOKENS.values())} "
                 f"text tokens (assumed lengths), heads' AdamW, batch {batch}; E and F not included")


# --- running ----------------------------------------------------------------------------------


def counts_for(device, tiny: bool, config) -> Counts:
    """The production config's counts on CUDA; a reduced count (extrapolated) on a CPU or in tiny mode."""
    profusion = config.generate.generators["profusion"]
    if device.type == "cuda" and not tiny:
        options, train = profusion.options, config.train
        return Counts(False, False, profusion.steps, int(options.get("finetune_steps", 50)),
                      int(options.get("finetune_batch_size", 2)), int(options.get("finetune_views", 8)),
                      int(options.get("batch_size", 4)), 4 * config.filter.batch_size, config.filter.batch_size,
                      max(1, train.generator_batch_size // train.num_workers),
                      max(1, train.assistant_batch_size // train.num_workers), profusion.image_size)
    return Counts(True, tiny, 1, 1, 1, 1, 1, 4, 4, 1, 1, 64 if tiny else profusion.image_size)


def device_kind(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe_machine(device, threads: int) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}"


def run_parts(bench: Bench, parts: list[str]) -> None:
    functions = {"profusion": part_profusion, "cafe": part_cafe, "ip_adapter": part_ip_adapter, "filter": part_filter,
                 "train_g": part_train_g, "train_assistant": part_train_assistant}
    last_g_user = max((parts.index(name) for name in ("cafe", "train_g") if name in parts), default=-1)
    for index, name in enumerate(parts):
        started = time.perf_counter()
        bench.say(f"[{name}]")
        functions[name](bench)
        bench.say(f"  ({name} took {time.perf_counter() - started:.0f} s wall, load {os.getloadavg()[0]:.1f})")
        if index == last_g_user:  # G, its encoders and the VAE are shared by cafe and train_g
            bench.shared.pop("cafe", None)
        gc.collect()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--tiny", action="store_true", help="shrunken configurations (the test suite's run)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads on a CPU (default: every core this process may use; 1 on shared cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets (CUDA only)")
    parser.add_argument("--config", default=str(PRODUCTION_CONFIG), help="the config whose settings are timed")
    parser.add_argument("--figures", help="figures file to write (default: factory/cost_figures.json; "
                        "--tiny writes only here)")
    parser.add_argument("--no-figures", action="store_true", help="write no figures file")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from factory.framework.config import load_config

    args = parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    counts = counts_for(device, args.tiny, config)
    kind = device_kind(device) + (" (tiny models)" if args.tiny else "")
    bench = Bench(device, kind, counts, config, compile=args.compile and device.type == "cuda")
    bench.say(f"real_size: {describe_machine(device, args.threads)}; device kind {kind!r}; "
              f"{'reduced counts, extrapolated per step/view/layer' if counts.reduced else 'production counts'}")
    started = time.perf_counter()
    run_parts(bench, parts)
    bench.say(f"({time.perf_counter() - started:.0f} s in all)")
    write_outputs(args, bench, parts, argv if argv is not None else sys.argv[1:])
    return 0


def write_outputs(args: argparse.Namespace, bench: Bench, parts: list[str], argv: list[str]) -> None:
    from factory.cost import write_device_figures

    entry = {"device": describe_machine(bench.device, args.threads), "measured": date.today().isoformat(),
             "counts": "reduced (CPU), extrapolated" if bench.counts.reduced else "production config",
             "command": " ".join(["python bench/real_size.py", *argv]),
             "parts": parts, "figures": bench.figures}
    if not args.no_figures and (args.figures or not args.tiny):
        where = write_device_figures(entry, bench.kind, args.figures)
        print(f"figures for {bench.kind!r} written to {where}")
    if not args.no_results and not args.tiny:
        section = [f"## real_size: {entry['device']}, {entry['measured']}", "", "```", *bench.lines, "```", ""]
        with Path(args.results).open("a") as handle:
            handle.write("\n".join(section) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
