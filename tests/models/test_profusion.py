"""ProFusion on tiny random-weight SD2-like components, loaded through the real loaders."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from factory.framework.config import GeneratorSpec
from factory.tiny.sd import build_tiny_promptnet
from models.base import GenJob

IMAGE_SIZE = 32
FAST_OPTIONS = {"finetune_steps": 2, "finetune_views": 3, "finetune_batch_size": 1, "batch_size": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/models/conftest.py


@pytest.fixture(scope="module")
def tiny_promptnet(tmp_path_factory, tiny_sd) -> str:
    return build_tiny_promptnet(tmp_path_factory.mktemp("tiny-promptnet") / "promptnet", tiny_sd)


def make_spec(model: str, checkpoint: str | None, **options) -> GeneratorSpec:
    return GeneratorSpec(
        kind="profusion", model=model, checkpoint=checkpoint, image_size=IMAGE_SIZE, steps=3,
        guidance_scale=7.5, options={**FAST_OPTIONS, **options},
    )


@pytest.fixture(scope="module")
def generator(tiny_sd, tiny_promptnet):
    from models.registry import build_generator

    return build_generator("profusion-tiny", make_spec(tiny_sd, tiny_promptnet))


def reference_image(seed: int, size=(80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def job(template: str, seed: int, subject: str = "dog") -> GenJob:
    return GenJob(template=template, subject=subject, instruction=template.format(subject=subject), seed=seed)


def public_config(model) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def as_array(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_one_reference_three_instructions(generator):
    jobs = [
        job("a photo of {subject} on the beach", 1),
        job("a painting of {subject} in the style of van gogh", 2),
        job("{subject} wearing a red hat", 3),
    ]
    runs_before = generator.stats["finetune_runs"]

    results = generator.generate(reference_image(0), jobs)

    assert len(results) == 3
    assert all(r.image.size == (IMAGE_SIZE, IMAGE_SIZE) and r.image.mode == "RGB" for r in results)
    assert generator.stats["finetune_runs"] == runs_before + 1
    assert [r.info["seed"] for r in results] == [1, 2, 3]
    info = results[0].info
    assert info["finetune_steps"] == FAST_OPTIONS["finetune_steps"] and info["steps"] == 3
    assert info["seconds"] == pytest.approx(info["finetune_seconds"] + info["sample_seconds"])
    assert generator.describe()["options"]["refine_steps"] == 1


def test_same_seed_same_image_other_seed_differs(generator):
    reference = reference_image(1)
    first = generator.generate(reference, [job("a photo of {subject}", 7), job("a photo of {subject}", 8)])
    again = generator.generate(reference, [job("a photo of {subject}", 7)])

    assert np.array_equal(as_array(first[0]), as_array(again[0]))
    assert np.abs(as_array(first[0]) - as_array(first[1])).max() > 0


def test_finetuning_works_on_copies(generator):
    promptnet_before = {k: v.clone() for k, v in generator.promptnet.state_dict().items()}
    unet_before = {k: v.clone() for k, v in generator.unet.state_dict().items()}
    pixels = generator._reference_pixels(reference_image(2))

    with generator._tunable_unet_attention():
        tuned = generator.finetune(pixels)
        tuned_attention = {n: p.detach().clone() for n, p in generator._attention_parameters()}
    generator.generate(reference_image(3), [job("a photo of {subject}", 1)])

    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, promptnet_before[k])]
    assert changed, "fine-tuning left PromptNet unchanged"
    assert any(not torch.equal(v, unet_before[n]) for n, v in tuned_attention.items())
    for name, value in generator.promptnet.state_dict().items():
        assert torch.equal(value, promptnet_before[name]), name
    for name, value in generator.unet.state_dict().items():
        assert value.dtype == unet_before[name].dtype and torch.equal(value, unet_before[name]), name
    assert not any(p.requires_grad for p in generator.unet.parameters())


def test_s_star_enters_the_prompt_at_the_placeholder(generator):
    prompts = generator.prompts
    text = prompts.render("a photo of {subject} on the beach")
    mask = prompts.token_ids([text]) == prompts.placeholder_id
    s_star = torch.randn(1, 1, generator.text_encoder.config.hidden_size)

    with torch.no_grad():
        full = prompts.encode([text], s_star)
        weak = prompts.encode([text], s_star, scale=0.5)
        other = prompts.encode([text], s_star + 1.0)
        plain = prompts.encode(["a photo of dog on the beach"])

    assert int(mask.sum()) == 1
    assert torch.allclose(weak[mask], 0.5 * full[mask]) and torch.equal(weak[~mask], full[~mask])
    assert not torch.allclose(full, other)
    assert full.shape == plain.shape
    with pytest.raises(ValueError, match="no S"):
        prompts.encode([text])


def test_promptnet_save_load_round_trip(tiny_promptnet, tmp_path):
    from models.promptnet import PromptNet

    original = PromptNet.from_pretrained(tiny_promptnet, low_cpu_mem_usage=False).eval()
    original.save_pretrained(str(tmp_path / "copy"))
    reloaded = PromptNet.from_pretrained(str(tmp_path / "copy"), low_cpu_mem_usage=False).eval()
    generator = torch.Generator().manual_seed(0)
    reference, noisy = torch.randn(2, 2, 4, 4, 4, generator=generator)
    tokens = torch.randn(2, 17, original.config.image_embed_dim, generator=generator)

    with torch.no_grad():
        a = original(reference, noisy, torch.tensor([10, 500]), tokens)
        b = reloaded(reference, noisy, torch.tensor([10, 500]), tokens)

    assert public_config(reloaded) == public_config(original)
    assert a.shape == (2, original.config.num_tokens, original.config.embedding_dim)
    assert torch.equal(a, b)


def test_without_checkpoint_promptnet_starts_from_the_unet(tiny_sd, caplog):
    from models.profusion import ProFusionGenerator

    spec = make_spec(tiny_sd, None, finetune_steps=1, finetune_unet_attention=False, fusion=False)
    with caplog.at_level("WARNING"):
        generator = ProFusionGenerator("untrained", spec)
    results = generator.generate(reference_image(4), [job("a photo of {subject}", 0)])

    assert "no PromptNet checkpoint" in caplog.text
    assert not generator.promptnet.uses_image_embeds and generator.image_encoder is None
    unet_conv = generator.unet.state_dict()["conv_in.weight"]
    assert torch.equal(generator.promptnet.state_dict()["conv_in.weight"], unet_conv)
    assert results[0].image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert results[0].info["refine_steps"] == 0


def test_bad_options_and_sizes_are_refused(tiny_sd, tiny_promptnet):
    from models.profusion import ProFusionGenerator

    with pytest.raises(ValueError, match="finetune_step"):
        ProFusionGenerator("typo", make_spec(tiny_sd, tiny_promptnet, finetune_step=3))
    spec = make_spec(tiny_sd, tiny_promptnet).model_copy(update={"image_size": 40})
    with pytest.raises(ValueError, match="multiple of 16"):
        ProFusionGenerator("odd-size", spec)


def test_tiny_sd_is_a_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, low_cpu_mem_usage=False)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a photo of a dog", height=64, width=64, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]

    assert image.size == (64, 64)
    assert pipeline.safety_checker is None


def test_train_promptnet_writes_a_loadable_checkpoint(tiny_sd, tiny_promptnet, tmp_path):
    from models.profusion import ProFusionGenerator, train_promptnet
    from models.promptnet import PromptNet

    images = [reference_image(seed) for seed in (10, 11)]
    output = train_promptnet(
        tiny_sd, images, tmp_path / "trained", checkpoint=tiny_promptnet, image_encoder=None,
        steps=2, batch_size=2, image_size=IMAGE_SIZE,
    )

    start = PromptNet.from_pretrained(tiny_promptnet, low_cpu_mem_usage=False).state_dict()
    trained = PromptNet.from_pretrained(output, low_cpu_mem_usage=False).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    generator = ProFusionGenerator("trained", make_spec(tiny_sd, output, finetune_steps=0))
    assert generator.image_encoder is not None
    assert generator.generate(reference_image(12), [job("a photo of {subject}", 0)])[0].image.size == (IMAGE_SIZE,) * 2


# --- the fusion step, pinned on fixed tensors (independent of the code's own helpers) ------------

UNCOND, STAR, PLAIN = (torch.full((2, 4, 2, 2), value) for value in (0.3, -1.1, 0.8))


class FixedPredictions:
    """Stands in for `_predict`: fixed UNet outputs, the S* one scaled by the S* scale it is given,
    so a refinement that forgets to weaken S* gives another number. Each call keeps what it was asked
    for: the timestep, the latents' values and which conditions (the context's own, or how many)."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, scheduler, context, latents, t, conditions, s_star_scale=1.0):
        self.calls.append({"t": int(t), "latents": latents.tolist(), "conditions": conditions,
                           "s_star_scale": s_star_scale})
        return (UNCOND, STAR * s_star_scale, *([PLAIN] * len(conditions)))


def bare_profusion(monkeypatch, guidance_scale: float = 7.5, **options):
    """A ProFusionGenerator with options and spec only: no model loaded, `_predict` fixed."""
    from models.profusion import ProFusionGenerator, ProFusionOptions

    generator = ProFusionGenerator.__new__(ProFusionGenerator)
    generator.options = ProFusionOptions(**options)
    generator.spec = make_spec("unused", None)
    generator.spec.guidance_scale = guidance_scale
    predictions = FixedPredictions()
    monkeypatch.setattr(generator, "_predict", predictions, raising=False)
    return generator, predictions


def ddim_scheduler(steps: int = 10):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("fusion", [True, False])
def test_final_step_guides_towards_s_star_and_the_class_prompt_with_their_own_weights(monkeypatch, fusion):
    generator, predictions = bare_profusion(monkeypatch, guidance_scale=6.0, fusion=fusion, class_guidance_scale=2.5)
    context = SimpleNamespace(plain="class prompt states")
    guided = generator._guided_output(None, context, torch.zeros(2, 4, 2, 2), 500)

    expected = 0.3 + 6.0 * (-1.1 - 0.3)  # uncond + w_S* (S* - uncond)
    if fusion:
        expected += 2.5 * (0.8 - 0.3)  # + w_class (plain - uncond)
    torch.testing.assert_close(guided, torch.full_like(UNCOND, expected))
    assert predictions.calls == [{"t": 500, "latents": torch.zeros(2, 4, 2, 2).tolist(),
                                  "conditions": ["class prompt states"] if fusion else [], "s_star_scale": 1.0}]


@pytest.mark.parametrize("eta", [1.0, 0.4, 0.0])
def test_refinement_is_a_ddim_step_with_eta_then_noise_back_to_t(monkeypatch, eta):
    generator, predictions = bare_profusion(monkeypatch, refine_guidance_scale=3.0, refine_embedding_scale=0.6,
                                            refine_eta=eta)
    scheduler = ddim_scheduler()
    t, following = scheduler.timesteps[3], scheduler.timesteps[4]
    latents = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    seeds = [11, 12]

    refined = generator._fusion_stage(scheduler, None, latents, t, following,
                                      [torch.Generator().manual_seed(s) for s in seeds])

    noise = [torch.Generator().manual_seed(s) for s in seeds]  # the same draws, in the same order
    step_noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in noise])
    back_noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in noise])
    eps = UNCOND + 3.0 * (0.6 * STAR - UNCOND)  # the S* prompt weakened, its own guidance weight
    # diffusers' own DDIM step is the independent reference for x_t -> x_next with eta
    stepped = scheduler.step(eps, t, latents, eta=eta, variance_noise=step_noise).prev_sample
    alpha_t = scheduler.alphas_cumprod[int(t)].item()
    alpha_next = scheduler.alphas_cumprod[int(following)].item()
    expected = (alpha_t / alpha_next) ** 0.5 * stepped + (1 - alpha_t / alpha_next) ** 0.5 * back_noise
    torch.testing.assert_close(refined, expected, rtol=1e-5, atol=1e-5)
    assert predictions.calls == [{"t": int(t), "latents": latents.tolist(), "conditions": [], "s_star_scale": 0.6}]


def test_refinement_by_hand_for_one_number():
    """The same step written out for one scalar (DDIM, Song et al. eq. 12 and 16)."""
    from models.profusion import refine_step

    x_t, eps, a_t, a_next, eta, z1, z2 = 0.7, -0.2, 0.5, 0.64, 0.8, 0.3, -1.2
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    sigma = eta * ((1 - a_next) / (1 - a_t)) ** 0.5 * (1 - a_t / a_next) ** 0.5
    x_next = a_next**0.5 * x0 + (1 - a_next - sigma**2) ** 0.5 * eps + sigma * z1
    expected = (a_t / a_next) ** 0.5 * x_next + (1 - a_t / a_next) ** 0.5 * z2

    def scalar(value):
        return torch.tensor([value], dtype=torch.float64)

    got = refine_step(scalar(x_t), scalar(eps), a_t, a_next, eta, scalar(z1), scalar(z2))
    assert got.item() == pytest.approx(expected, rel=1e-12)


# --- generator work: UNet evaluations per candidate ----------------------------------------------


def expected_sampling_evals(steps: int, fusion: bool, refine_steps: int) -> int:
    """Per image and timestep: the refinements' [uncond, S*] pairs, then [uncond, S*, (class)]."""
    if not fusion:
        return steps * 2
    return steps * (2 * refine_steps + 3)


@pytest.mark.parametrize("fusion", [True, False])
def test_unet_evaluations_match_the_configured_steps(tiny_sd, tiny_promptnet, fusion):
    from models.registry import build_generator

    options = {"fusion": fusion, "refine_steps": 2, "finetune_steps": 3, "finetune_batch_size": 2}
    spec = make_spec(tiny_sd, tiny_promptnet, **options)
    generator = build_generator("profusion-nfe", spec)
    jobs = [job("a photo of {subject}", seed) for seed in range(3)]  # batches of 2 and 1

    infos = [result.info for result in generator.generate(reference_image(4), jobs)]

    per_image = expected_sampling_evals(spec.steps, fusion, options["refine_steps"])
    assert [info["unet_evals"] for info in infos] == [per_image] * 3
    finetune_rows = options["finetune_steps"] * options["finetune_batch_size"]  # once per reference, shared
    assert sum(info["finetune_unet_evals"] for info in infos) == pytest.approx(finetune_rows)
