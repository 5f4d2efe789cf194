"""G: shapes and wiring of the two cross-attention streams, condition dropout, trainable
layers, save/load, and the generator interface SID uses (tiny random-weight models)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from factory.framework.config import GeneratorSpec
from models.base import GenJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/models/conftest.py


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_parts

    return build_tiny_cafe_parts(tmp_path_factory.mktemp("cafe-parts"))


@pytest.fixture(scope="module")
def g_folder(parts, tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_generator

    return build_tiny_cafe_generator(tmp_path_factory.mktemp("cafe-g"), parts)


@pytest.fixture(scope="module")
def encoders(parts):
    from models.cafe import ImageEncoders

    return ImageEncoders(parts["clip_model"], parts["dino_model"])


def picture(seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def load_g(folder):
    from models.cafe import CafeUNet

    return CafeUNet.from_pretrained(folder).eval()


def conditions(encoders, count: int = 2):
    images = [picture(n) for n in range(count)]
    return encoders.clip_embeds(images), encoders.dino_features(images)


def test_g_takes_clip_and_dino_and_predicts_noise_of_the_latent_shape(g_folder, encoders):
    model = load_g(g_folder)
    clip, dino = conditions(encoders)
    assert clip.shape == (2, model.config.clip_dim)  # one global embedding per image: 1 x d
    assert dino.shape == (2, 5, model.config.dino_dim)  # CLS + 2 x 2 patches: n x d'
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model(latents, torch.tensor([10, 900]), clip, dino)
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


def test_each_stream_changes_the_prediction(g_folder, encoders):
    model = load_g(g_folder)
    clip, dino = conditions(encoders, 1)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        base = model(latents, t, clip, dino)
        other_clip = model(latents, t, clip + 1.0, dino)
        other_dino = model(latents, t, clip, dino + 1.0)
    assert not torch.allclose(base, other_clip)
    assert not torch.allclose(base, other_dino)


def test_cross_attention_is_the_sum_of_the_two_streams(g_folder):
    """Equation 1 on one layer: Attn(Q, K_H, V_H) + Attn(Q, K_E, V_E), then the output projection."""
    from models.cafe import CafeAttnProcessor

    model = load_g(g_folder)
    attn = next(m for n, m in model.unet.named_modules() if n.endswith("attn2"))
    processor = attn.processor
    assert isinstance(processor, CafeAttnProcessor)
    width = attn.to_k.in_features
    hidden = torch.randn(2, 6, attn.to_q.in_features)
    context = torch.randn(2, 1 + 5, width)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=context)

        def attend(keys, values):
            heads = lambda x: x.view(2, x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = heads(attn.to_q(hidden)), heads(keys), heads(values)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return (weights @ v).transpose(1, 2).reshape(2, 6, -1)

        clip_part, dino_part = context[:, :1], context[:, 1:]
        expected = attend(attn.to_k(clip_part), attn.to_v(clip_part))
        expected = expected + attend(processor.to_k_dino(dino_part), processor.to_v_dino(dino_part))
        expected = attn.to_out[0](expected)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_dropping_either_condition(g_folder, encoders):
    from models.cafe import drop_conditions

    clip, dino = conditions(encoders)
    kept_clip, kept_dino = drop_conditions(clip, dino, 0.0)
    assert torch.equal(kept_clip, clip) and torch.equal(kept_dino, dino)
    none_clip, none_dino = drop_conditions(clip, dino, 1.0)
    assert not none_clip.any() and not none_dino.any()

    many_clip, many_dino = clip.repeat(200, 1), dino.repeat(200, 1, 1)
    dropped_clip, dropped_dino = drop_conditions(many_clip, many_dino, 0.5, torch.Generator().manual_seed(0))
    clip_gone = ~dropped_clip.any(dim=1)
    dino_gone = ~dropped_dino.flatten(1).any(dim=1)
    assert (clip_gone & ~dino_gone).any() and (dino_gone & ~clip_gone).any()  # independent draws
    assert 0.35 < clip_gone.float().mean() < 0.65

    model = load_g(g_folder)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        for c, d in [(torch.zeros_like(clip), dino), (clip, torch.zeros_like(dino)), (none_clip, none_dino)]:
            out = model(latents, t, c, d)
            assert out.shape == latents.shape and torch.isfinite(out).all()


def test_only_the_new_layers_train_when_so_configured(g_folder, encoders):
    model = load_g(g_folder)
    trainable = model.set_trainable("new_layers")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(model.new_layer_names())
    assert len(trainable) == len(names)
    assert any("attn2.processor.to_k_dino" in n for n in names)
    assert any(n.startswith("clip_proj") for n in names) and any(n.startswith("dino_proj") for n in names)
    assert not any("attn2.to_k" in n or "conv" in n for n in names)

    clip, dino = conditions(encoders)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), clip, dino).pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names

    model.set_trainable("all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        model.set_trainable("some")


def test_save_and_load_keep_the_weights_without_pickle(g_folder, encoders, tmp_path):
    model = load_g(g_folder)
    with torch.no_grad():
        model.clip_proj.weight.add_(0.5)
    model.save_pretrained(tmp_path / "g")
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    again = load_g(tmp_path / "g")
    clip, dino = conditions(encoders)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 30])
    with torch.no_grad():
        torch.testing.assert_close(model(latents, t, clip, dino), again(latents, t, clip, dino))
    assert again.config.base_model == model.config.base_model


def test_diffusion_loss_is_per_sample_and_reproducible(g_folder, encoders):
    from diffusers import DDPMScheduler

    from models.cafe import diffusion_loss

    model = load_g(g_folder)
    scheduler = DDPMScheduler.from_pretrained(model.config.base_model, subfolder="scheduler")
    clip, dino = conditions(encoders)
    latents = torch.randn(2, 4, 8, 8)
    first = diffusion_loss(model, scheduler, latents, clip, dino, 0.1, torch.Generator().manual_seed(1))
    second = diffusion_loss(model, scheduler, latents, clip, dino, 0.1, torch.Generator().manual_seed(1))
    assert first.shape == (2,) and torch.equal(first, second) and (first > 0).all()


def test_mix_semantics_follows_equation_4():
    from models.cafe import mix_semantics

    clip_x, clip_w = torch.ones(1, 4), torch.full((1, 4), 3.0)
    assert torch.equal(mix_semantics(clip_x, None, 0.7), clip_x)
    assert torch.equal(mix_semantics(clip_x, clip_w, 0.0), clip_x)
    assert torch.equal(mix_semantics(clip_x, clip_w, 1.0), clip_w)
    torch.testing.assert_close(mix_semantics(clip_x, clip_w, 0.25), torch.full((1, 4), 1.5))
    with pytest.raises(ValueError, match="alpha must lie in"):
        mix_semantics(clip_x, clip_w, 1.5)
    with pytest.raises(ValueError, match="needs its alpha"):  # never a silent alpha: the sample records one
        mix_semantics(clip_x, clip_w, None)


def test_cafe_generator_draws_one_image_per_job(g_folder):
    from models.registry import build_generator

    spec = GeneratorSpec(kind="cafe", model=g_folder, image_size=16, steps=2, options={"dino_guidance_scale": 1.5})
    generator = build_generator("cafe-g", spec)
    described = generator.describe()
    assert described["kind"] == "cafe" and described["checkpoint"] == g_folder
    assert described["guidance"] == {"clip": spec.guidance_scale, "dino": 1.5}
    assert Path(described["base_model"]).is_dir()

    jobs = [
        GenJob("a photo of {subject}", "dog", "a photo of dog", seed=7),
        GenJob("a photo of {subject}", "dog", "a photo of dog", seed=7, alpha=0.6, w_image=picture(99)),
        GenJob("a photo of {subject}", "dog", "a photo of dog", seed=8),
    ]
    results = generator.generate(picture(1), jobs)
    assert [r.image.size for r in results] == [(16, 16)] * 3
    assert results[1].info["alpha"] == 0.6 and results[0].info["alpha"] is None
    arrays = [np.asarray(r.image, dtype=np.int16) for r in results]
    assert not np.array_equal(arrays[0], arrays[2])  # another seed
    again = generator.generate(picture(1), jobs[:1])[0]
    assert np.array_equal(np.asarray(again.image, dtype=np.int16), arrays[0])  # same seed, same image


@pytest.mark.parametrize("options, named", [
    ({"guidance": 3}, "guidance"),
    ({"dino_guidance_scale": float("nan")}, "dino_guidance_scale"),  # drew black images
    ({"clip_guidance_scale": float("inf")}, "clip_guidance_scale"),
    ({"batch_size": 0}, "batch_size"),  # failed every reference
    ({"batch_size": -1}, "batch_size"),  # drew nothing, and said nothing
    ({"sampler": "euler"}, "sampler"),
])
def test_cafe_generator_refuses_bad_options_before_loading_anything(g_folder, options, named):
    from models.cafe import CafeGenerator

    spec = GeneratorSpec(kind="cafe", model=g_folder, options=options)
    with pytest.raises(ValueError, match=f"(?s)generator 'g': invalid options: .*{named}"):
        CafeGenerator("g", spec, storage=object())  # a storage that loading anything would fail on


def test_a_g_folder_in_s3_is_fetched_to_local_disk(g_folder, s3_bucket):
    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage
    from models.cafe import local_folder

    endpoint, bucket = s3_bucket
    storage = open_storage(StorageConfig(root=f"s3://{bucket}/root", endpoint_url=endpoint))
    for path in Path(g_folder).iterdir():
        storage.upload_file(path, f"checkpoints/generator/run/step-00000001/model/{path.name}")
    url = storage.url("checkpoints/generator/run/step-00000001/model")
    settings = StorageConfig(root=url, endpoint_url=endpoint)
    local = local_folder(url, settings)
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(p.name for p in Path(g_folder).iterdir())
    assert local_folder(url, settings) == local  # cached
    assert local_folder(g_folder) == g_folder


# --- classifier-free guidance with two conditions, on fixed tensors ------------------------------


class RecordingScheduler:
    """A one-step scheduler that keeps what the sampler hands it (and changes nothing)."""

    init_noise_sigma = 1.0
    timesteps = torch.tensor([400])

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    def set_timesteps(self, steps, device=None):
        pass

    def scale_model_input(self, sample, t):
        return sample

    def step(self, model_output, t, sample):
        self.outputs.append(model_output)
        return SimpleNamespace(prev_sample=sample)


def fake_unet(latents, t, clip, dino):
    """A prediction that tells the conditions apart: each row sees its own CLIP and DINO input."""
    return latents + 2.0 * clip.mean(dim=1).view(-1, 1, 1, 1) - 3.0 * dino.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_drops_clip_then_both_and_weighs_each_step_once():
    from models.cafe import Guidance, sample_latents

    clip = torch.tensor([[0.5, 1.5], [-1.0, 0.25]])
    dino = torch.tensor([[[0.2, 0.4]], [[-0.6, 1.0]]])
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    scheduler = RecordingScheduler()

    sample_latents(fake_unet, scheduler, clip, dino, noise, 1, Guidance(clip=7.0, dino=2.5))

    none = fake_unet(noise, 0, torch.zeros_like(clip), torch.zeros_like(dino))  # both dropped
    identity = fake_unet(noise, 0, torch.zeros_like(clip), dino)  # CLIP dropped, DINO kept
    both = fake_unet(noise, 0, clip, dino)
    expected = (1 - 2.5) * none + (2.5 - 7.0) * identity + 7.0 * both  # eps(0,0) + d(.) + c(.), expanded
    torch.testing.assert_close(scheduler.outputs[0], expected)


# --- equation 4 through the real tiny G ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_g(g_folder):
    from models.registry import build_generator

    return build_generator("cafe-eq4", GeneratorSpec(kind="cafe", model=g_folder, image_size=16, steps=2))


def draw_with(generator, monkeypatch, reference, clip_x: torch.Tensor | None, w_image, alpha) -> np.ndarray:
    """One image for `reference`, its F(x) replaced by `clip_x` when given (E(x) stays the reference's)."""
    real = generator.encoders.clip_embeds

    def clip_embeds(images):
        return clip_x if clip_x is not None and images[0] is reference else real(images)

    monkeypatch.setattr(generator.encoders, "clip_embeds", clip_embeds)
    job = GenJob("a photo of {subject}", "dog", "a photo of dog", seed=3, alpha=alpha, w_image=w_image)
    image = generator.generate(reference, [job])[0].image
    monkeypatch.setattr(generator.encoders, "clip_embeds", real)
    return np.asarray(image, dtype=np.int16)


def test_alpha_zero_ignores_w(small_g, monkeypatch):
    reference = picture(1)
    one = draw_with(small_g, monkeypatch, reference, None, picture(20), 0.0)
    other = draw_with(small_g, monkeypatch, reference, None, picture(21), 0.0)
    assert np.array_equal(one, other)


def test_alpha_one_ignores_f_of_x(small_g, monkeypatch):
    reference, width = picture(1), small_g.model.config.clip_dim
    one = draw_with(small_g, monkeypatch, reference, torch.full((1, width), 0.5), picture(20), 1.0)
    other = draw_with(small_g, monkeypatch, reference, torch.full((1, width), -0.5), picture(20), 1.0)
    assert np.array_equal(one, other)


def test_alpha_between_follows_both_w_and_f_of_x(small_g, monkeypatch):
    reference, width = picture(1), small_g.model.config.clip_dim
    base = draw_with(small_g, monkeypatch, reference, None, picture(20), 0.5)
    other_w = draw_with(small_g, monkeypatch, reference, None, picture(21), 0.5)
    other_x = draw_with(small_g, monkeypatch, reference, torch.full((1, width), 3.0), picture(20), 0.5)
    assert np.abs(base - other_w).max() > 0
    assert np.abs(base - other_x).max() > 0


def test_g_reports_three_unet_evaluations_per_step_and_image(g_folder):
    from models.registry import build_generator

    spec = GeneratorSpec(kind="cafe", model=g_folder, image_size=16, steps=3, options={"batch_size": 2})
    generator = build_generator("cafe-nfe", spec)
    jobs = [GenJob("a photo of {subject}", "dog", "a photo of dog", seed=n) for n in range(3)]

    infos = [result.info for result in generator.generate(picture(1), jobs)]

    # (none), (E), (H, E) batched together: three rows through the UNet per step and image
    assert [info["unet_evals"] for info in infos] == [spec.steps * 3] * 3
    assert [info["finetune_unet_evals"] for info in infos] == [0] * 3
