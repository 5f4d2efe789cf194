"""Half precision rehearsed on the CPU (FACTORY_CPU_DTYPE=bfloat16): every dtype choice follows the
one switch, models load and run in bfloat16 where CUDA runs half precision, and the filter's scores
stay within SCORE_TOLERANCE of float32."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.framework.config import FactoryConfig, GeneratorSpec
from filters.precision import CPU_DTYPE_VARIABLE, autocast_dtype, cpu_half_precision
from models.base import GenJob, half_dtype, resolve_dtype
from models.training.loop import autocast
from tests.filters.helpers import jpeg

CPU = torch.device("cpu")
# bfloat16 keeps 8 significant bits (a rounding moves a value by up to 2^-9 of it). Measured on these
# filters (2026-12-06, 8 candidates): the largest |bf16 - fp32| was 0.005 for CLIP-T and 0.004 for DINO on
# the tiny models, 0.0016 and 0.0004 at the real sizes (random weights). 0.02 is four times the largest,
# and small against the thresholds (0.3 CLIP-T, 0.6 DINO): only candidates that close to one can flip.
SCORE_TOLERANCE = 0.02


@pytest.fixture
def bfloat16_on_cpu(monkeypatch):
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")


def test_the_cpu_runs_float32_unless_half_precision_is_rehearsed(monkeypatch):
    monkeypatch.delenv(CPU_DTYPE_VARIABLE, raising=False)
    assert not cpu_half_precision()
    assert resolve_dtype("auto", CPU) == half_dtype(CPU, torch.bfloat16) == torch.float32
    assert autocast_dtype("cpu", "auto") is None
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_every_dtype_choice_follows_the_switch(bfloat16_on_cpu):
    assert resolve_dtype("auto", CPU) == resolve_dtype("float16", CPU) == torch.bfloat16  # no fast fp16 on a CPU
    assert resolve_dtype("float32", CPU) == torch.float32  # an explicit float32 stays
    assert half_dtype(CPU, torch.float16) == torch.bfloat16
    assert autocast_dtype("cpu", "auto") == torch.bfloat16 and autocast_dtype("cpu", "float32") is None
    with autocast(CPU):  # training's autocast region
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_misspelt_switch_is_refused(monkeypatch):
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bf16")
    with pytest.raises(ValueError, match="FACTORY_CPU_DTYPE must be float32 or bfloat16"):
        resolve_dtype("auto", CPU)


def test_profusion_loads_and_draws_in_bfloat16(bfloat16_on_cpu, tiny_sd, tmp_path, one_torch_thread):
    from factory.tiny.sd import build_tiny_promptnet
    from models.registry import build_generator

    spec = GeneratorSpec(kind="profusion", model=tiny_sd, checkpoint=build_tiny_promptnet(tmp_path / "pn", tiny_sd),
                         image_size=32, steps=2, guidance_scale=5.0,
                         options={"finetune_steps": 1, "finetune_views": 1, "finetune_batch_size": 1, "batch_size": 1})
    generator = build_generator("profusion-bf16", spec)
    assert generator.dtype == torch.bfloat16
    assert {p.dtype for p in generator.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in generator.promptnet.parameters()} == {torch.float32}  # trained in float32, as on CUDA
    reference = jpeg_image(3)
    [result] = generator.generate(reference, [GenJob("a photo of {subject}", "dog", "a photo of dog", 1)])
    image = np.asarray(result.image, dtype=np.int16)
    assert image.shape == (32, 32, 3) and image.std() > 0


def jpeg_image(seed: int):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg(seed))).convert("RGB")


def scores_both_ways(stage, rows, monkeypatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same stage (the same weights) scoring the same rows in float32, then in bfloat16."""
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "float32")
    full = stage(rows.copy())
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")
    half = stage(rows.copy())
    return {score: (full[score].astype(float).to_numpy(), half[score].astype(float).to_numpy())
            for score in ("clip_t", "dino")}


def assert_scores_agree(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for score, (full, half) in scores.items():
        assert np.isfinite(half).all(), score
        assert not np.array_equal(full, half), f"{score}: bfloat16 did not run"  # the switch took effect
        np.testing.assert_allclose(half, full, atol=SCORE_TOLERANCE, err_msg=score)


def test_bfloat16_filter_scores_agree_with_float32_on_the_tiny_models(tmp_path, monkeypatch, one_torch_thread):
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino
    from stages.filter import Filter
    from tests.stages.test_filter import candidates

    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    config = FactoryConfig.model_validate({"filter": {
        "clip_model": clip.model_name, "clip_pretrained": clip.pretrained, "clip_model_config": clip.model_config,
        "dino_model": dino, "batch_size": 4}})
    rows = candidates([jpeg(200 + n) for n in range(8)])
    assert_scores_agree(scores_both_ways(Filter(config, device="cpu"), rows, monkeypatch))


@pytest.mark.slow
def test_bfloat16_filter_scores_agree_with_float32_at_the_real_sizes(monkeypatch, one_torch_thread):
    """CLIP ViT-B/32 and DINO ViT-S/16 at their published sizes (random weights), 4 candidates: ~30 s."""
    from bench.filter_throughput import make_candidates
    from bench.real_size import PRODUCTION_CONFIG, Bench, counts_for, filter_stage
    from factory.framework.config import load_config

    config = load_config(PRODUCTION_CONFIG)
    bench = Bench(CPU, "cpu", counts_for(CPU, False, config), config)
    with tempfile.TemporaryDirectory() as scratch:
        stage = filter_stage(bench, Path(scratch))
        assert_scores_agree(scores_both_ways(stage, make_candidates(4, 224), monkeypatch))


@pytest.mark.parametrize("native", [True, False])
def test_a_card_without_native_bfloat16_runs_inference_in_float16_and_trains_in_bfloat16_saying_so(
        native, monkeypatch, caplog):
    """Before Ampere torch emulates bfloat16 several times slower: inference takes float16 there; training
    keeps bfloat16 (float16 would need loss scaling) and logs the card once."""
    from models.training import loop

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    cuda = torch.device("cuda")
    assert half_dtype(cuda, torch.bfloat16) == (torch.bfloat16 if native else torch.float16)
    assert half_dtype(cuda, torch.float16) == torch.float16
    assert autocast_dtype("cuda", "auto") == (torch.bfloat16 if native else torch.float16)  # the filter's scorers
    loop.warn_emulated_bfloat16.cache_clear()
    with caplog.at_level("WARNING", logger=loop.__name__):
        assert loop.training_dtype(cuda) == loop.training_dtype(cuda) == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert warned == ([] if native else ["Tesla V100-SXM2-32GB has no native bfloat16 (Ampere or newer has): "
                                         "training's bfloat16 autocast is emulated, several times slower"])
    assert asked and not any(asked)  # emulation does not count as support
