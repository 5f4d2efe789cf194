"""IP-Adapter on the tiny SD pipeline, with a tiny adapter saved in h94/IP-Adapter's layout and
loaded back through diffusers' `load_ip_adapter`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from factory.framework.config import GeneratorSpec
from factory.framework.models_cache import model_ref
from factory.tiny.ip_adapter import build_tiny_ip_adapter
from models.base import GenJob

IMAGE_SIZE = 32
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_sd) -> str:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip-adapter") / "adapter", tiny_sd)


def make_spec(model: str, checkpoint: str | None, guidance_scale: float = 7.5, **options) -> GeneratorSpec:
    return GeneratorSpec(kind="ip_adapter", model=model, checkpoint=checkpoint, image_size=IMAGE_SIZE, steps=STEPS,
                         guidance_scale=guidance_scale, options={"batch_size": 2, **options})


def build(spec: GeneratorSpec, name: str = "ipa-tiny"):
    from models.registry import build_generator

    return build_generator(name, spec)


@pytest.fixture(scope="module")
def generator(tiny_sd, tiny_adapter):
    return build(make_spec(tiny_sd, tiny_adapter))


def reference_image(seed: int, size=(80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def job(template: str, seed: int, subject: str = "dog") -> GenJob:
    return GenJob(template=template, subject=subject, instruction=template.format(subject=subject), seed=seed)


def as_array(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_the_saved_adapter_is_what_the_unet_attends_with(generator, tiny_adapter):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
    from transformers import CLIPVisionModelWithProjection

    saved = torch.load(f"{tiny_adapter}/models/ip-adapter_sd15.bin", weights_only=True)
    processors = generator.pipeline.unet.attn_processors
    adapted = {name: p for name, p in processors.items()
               if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))}
    assert sorted(adapted) == sorted(name for name in processors if name.endswith("attn2.processor"))
    for number, processor in enumerate(adapted.values()):
        assert torch.equal(processor.to_k_ip[0].weight, saved["ip_adapter"][f"{2 * number + 1}.to_k_ip.weight"])
        assert processor.scale == [0.5]
    projection = generator.pipeline.unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(projection.image_embeds.weight, saved["image_proj"]["proj.weight"])
    assert isinstance(generator.pipeline.image_encoder, CLIPVisionModelWithProjection)


def test_the_reference_steers_the_image_and_a_seed_repeats_it(generator):
    jobs = [job("a photo of {subject} on the beach", 7)]

    first = as_array(generator.generate(reference_image(0), jobs)[0])
    again = as_array(generator.generate(reference_image(0), jobs)[0])
    other = as_array(generator.generate(reference_image(1), jobs)[0])

    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0


def test_scale_zero_ignores_the_reference(tiny_sd, tiny_adapter):
    blind = build(make_spec(tiny_sd, tiny_adapter, scale=0.0))
    jobs = [job("a photo of {subject}", 3)]

    a, b = (as_array(blind.generate(reference_image(seed), jobs)[0]) for seed in (0, 1))

    assert np.array_equal(a, b)


def test_a_batch_draws_what_one_job_at_a_time_draws(generator, tiny_sd, tiny_adapter):
    jobs = [job("a photo of {subject} on the beach", 1), job("{subject} wearing a red hat", 2),
            job("a painting of {subject}", 3)]
    one_at_a_time = build(make_spec(tiny_sd, tiny_adapter, batch_size=1))

    batched = generator.generate(reference_image(0), jobs)
    single = one_at_a_time.generate(reference_image(0), jobs)

    assert [r.info["seed"] for r in batched] == [1, 2, 3]
    for a, b in zip(batched, single):
        assert np.abs(as_array(a) - as_array(b)).max() <= 2  # batched float sums may round differently


def test_unet_evaluations_are_counted_per_image_and_nothing_is_tuned(generator, tiny_sd, tiny_adapter):
    jobs = [job("a photo of {subject}", seed) for seed in range(3)]  # batches of 2 and 1

    guided = generator.generate(reference_image(0), jobs)
    unguided = build(make_spec(tiny_sd, tiny_adapter, guidance_scale=1.0)).generate(reference_image(0), jobs)

    assert [r.info["unet_evals"] for r in guided] == [2 * STEPS] * 3  # classifier-free guidance: [uncond, cond]
    assert [r.info["unet_evals"] for r in unguided] == [STEPS] * 3  # diffusers skips guidance at scale <= 1
    assert all(r.info["finetune_unet_evals"] == 0 for r in guided + unguided)


def test_describe_and_info_name_the_adapter(generator, tiny_sd, tiny_adapter):
    described = generator.describe()
    info = generator.generate(reference_image(0), [job("a photo of {subject}", 5)])[0].info

    assert described["kind"] == info["kind"] == "ip_adapter"
    assert described["model"] == info["model"] == model_ref(tiny_sd)
    assert described["checkpoint"] == info["checkpoint"] == model_ref(tiny_adapter)
    assert described["options"]["scale"] == info["scale"] == 0.5
    assert info["weight_name"] == "ip-adapter_sd15.bin"
    assert (info["seed"], info["steps"], info["guidance_scale"]) == (5, STEPS, 7.5)


def test_a_safetensors_adapter_loads_too(tmp_path, tiny_sd):
    adapter = build_tiny_ip_adapter(tmp_path / "adapter", tiny_sd, subfolder="weights",
                                    weight_name="ip-adapter.safetensors")
    generator = build(make_spec(tiny_sd, adapter, subfolder="weights", weight_name="ip-adapter.safetensors"))

    assert generator.generate(reference_image(0), [job("a photo of {subject}", 1)])[0].info["unet_evals"] == 2 * STEPS


def test_bad_options_name_the_generator(tiny_sd, tiny_adapter):
    with pytest.raises(ValueError, match=r"(?s)generator 'ipa-bad': invalid options.*scales"):
        build(make_spec(tiny_sd, tiny_adapter, scales=0.5), name="ipa-bad")
    with pytest.raises(ValueError, match=r"(?s)generator 'ipa-bad': invalid options.*scale"):
        build(make_spec(tiny_sd, tiny_adapter, scale=-1), name="ipa-bad")
    with pytest.raises(ValueError, match=r"generator 'ipa-bad': kind ip_adapter needs `checkpoint`"):
        build(make_spec(tiny_sd, None), name="ipa-bad")


def test_a_missing_adapter_file_says_which(tiny_sd, tiny_adapter):
    with pytest.raises(ValueError, match=r"generator 'ipa-tiny': cannot load the IP-Adapter models/nothing.bin"):
        build(make_spec(tiny_sd, tiny_adapter, weight_name="nothing.bin"))


@pytest.mark.parametrize("config", ["demo", "production", "staging"])
def test_the_shipped_configs_ip_adapter_specs_are_valid_and_not_selected(config):
    from pathlib import Path

    from factory.framework.config import load_config
    from models.ip_adapter import IPAdapterOptions

    path = None if config == "demo" else Path(__file__).resolve().parents[2] / "configs" / f"{config}.yaml"
    loaded = load_config(path)
    spec = loaded.generate.generators["ip_adapter"]
    assert spec.kind == "ip_adapter" and spec.checkpoint
    IPAdapterOptions.model_validate(spec.options)
    assert loaded.plan.generator == "profusion"
    if config == "production":
        assert (spec.model, spec.checkpoint) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "h94/IP-Adapter")


def test_an_adapter_on_s3_is_fetched_and_named_by_its_url(s3_bucket, tiny_sd, tiny_adapter, tmp_path, monkeypatch):
    from pathlib import Path

    from factory.framework.config import StorageConfig
    from factory.framework.storage import S3Storage
    from models.registry import build_generator

    monkeypatch.setenv("FACTORY_MODEL_CACHE", str(tmp_path / "cache"))
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/ip-adapter"
    settings = StorageConfig(root=url, endpoint_url=endpoint)
    remote = S3Storage(url, settings)
    for path in sorted(Path(tiny_adapter).rglob("*")):
        if path.is_file():
            remote.upload_file(path, path.relative_to(tiny_adapter).as_posix())

    generator = build_generator("ipa-s3", make_spec(tiny_sd, url), storage=settings)
    result = generator.generate(reference_image(0), [job("a photo of {subject}", 1)])[0]

    assert generator.describe()["checkpoint"] == result.info["checkpoint"] == url
    assert result.info["unet_evals"] == 2 * STEPS


def with_safety_checker(sd: str, folder) -> str:
    """The tiny pipeline with a tiny real safety checker whose every concept threshold is below any
    score, so it flags (and blacks out) every image, as SD 1.5's does for the images it flags."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8},
                        projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(config)
    checker.concept_embeds_weights.data.fill_(-2.0)
    pipeline = StableDiffusionPipeline.from_pretrained(sd)
    pipeline.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipeline.register_to_config(requires_safety_checker=True)
    pipeline.save_pretrained(folder)
    return str(folder)


def test_images_the_safety_checker_flags_are_rejected_by_the_stage_not_passed_on(tmp_path, tiny_sd, tiny_adapter):
    import pandas as pd

    from factory.framework.config import FactoryConfig
    from stages.generate import Generate
    from tests.factory.conftest import jpeg

    flagging = with_safety_checker(tiny_sd, tmp_path / "sd-with-checker")
    spec = make_spec(flagging, tiny_adapter).model_dump()
    config = {"plan": {"generator": "ipa"}, "generate": {"generators": {"ipa": spec}}}
    stage = Generate(FactoryConfig.model_validate(config))
    rows = pd.DataFrame({
        "key": ["k0", "k1"], "unit": 0, "reference_id": "r0", "subject": "dog", "domain": "object",
        "template": "a photo of {subject}", "instruction": "a photo of dog", "seed": [0, 1], "generator": "ipa",
        "round": 0, "alpha": None, "w_id": None, "input_image": [jpeg(1, size=40)] * 2, "w_image": None,
        "reject_stage": None, "reject_reason": None,
    })

    out = stage(rows)

    assert list(out["reject_reason"]) == ["nsfw_flagged"] * 2 and list(out["reject_stage"]) == ["generate"] * 2
    assert out["target_image"].isna().all()  # no blacked-out image is kept
    assert all('"nsfw_flagged": true' in info for info in out["generator_info"])
    assert stage.counters["rejected:nsfw_flagged"] == 2
