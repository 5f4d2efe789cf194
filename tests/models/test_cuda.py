"""Half precision on a real GPU: the CUDA paths no CPU run takes (float16 UNets beside float32
scorers, float16 loss scaling, autocast in training). Marked `cuda`: skipped without a GPU, run by
bench/device_check.py on a lent one (`pytest -m cuda tests/models/test_cuda.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.framework.config import FactoryConfig, GeneratorSpec
from factory.tiny.sd import build_tiny_promptnet
from models.base import GenJob, resolve_dtype
from tests.filters.helpers import jpeg

pytestmark = pytest.mark.cuda

# cosine scores in [-1, 1]: float16 encoders move a tiny model's cosine by ~1e-3; 0.02 is an order of
# magnitude above that and still only moves candidates within 0.02 of a threshold (0.3 / 0.6)
SCORE_TOLERANCE = 0.02


def test_generators_choose_half_precision_on_cuda():
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32


@pytest.fixture(scope="module")
def filter_config(tmp_path_factory) -> FactoryConfig:
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino

    root = tmp_path_factory.mktemp("cuda-filter-models")
    clip, dino = build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")
    return FactoryConfig.model_validate({"filter": {
        "clip_model": clip.model_name, "clip_pretrained": clip.pretrained, "clip_model_config": clip.model_config,
        "dino_model": dino, "batch_size": 3}})


def test_filter_scores_on_cuda_match_the_cpu(filter_config):
    import pandas as pd

    from stages.filter import Filter

    count = 5
    rows = pd.DataFrame({"key": [f"k{n}" for n in range(count)],
                         "instruction": [f"a photo of a dog number {n}" for n in range(count)],
                         "input_image": [jpeg(100 + n) for n in range(count)],
                         "target_image": [jpeg(200 + n) for n in range(count)],
                         "reject_stage": [None] * count, "reject_reason": [None] * count})
    on_cpu = Filter(filter_config, device="cpu")(rows.copy())
    on_cuda = Filter(filter_config, device="cuda")(rows.copy())
    for score in ("clip_t", "dino"):
        assert np.isfinite(on_cuda[score].astype(float)).all()
        np.testing.assert_allclose(on_cuda[score].astype(float), on_cpu[score].astype(float), atol=SCORE_TOLERANCE)


def test_profusion_fine_tunes_and_draws_in_float16_on_cuda(tmp_path, tiny_sd):
    from models.registry import build_generator

    promptnet = build_tiny_promptnet(tmp_path / "promptnet", tiny_sd)
    spec = GeneratorSpec(kind="profusion", model=tiny_sd, checkpoint=promptnet, image_size=32, steps=3,
                         guidance_scale=7.5, options={"finetune_steps": 2, "finetune_views": 2,
                                                      "finetune_batch_size": 1, "batch_size": 2})
    generator = build_generator("profusion-cuda", spec, "cuda")
    assert generator.dtype == torch.float16 and next(generator.unet.parameters()).device.type == "cuda"
    reference = jpeg_image(7)
    jobs = [GenJob("a photo of {subject} on the beach", "dog", "a photo of dog on the beach", seed)
            for seed in (1, 2)]
    images = [np.asarray(result.image, dtype=np.int16) for result in generator.generate(reference, jobs)]
    assert all(image.shape == (32, 32, 3) for image in images)
    assert all(image.std() > 0 for image in images)  # not a NaN-turned-black image
    assert np.abs(images[0] - images[1]).mean() > 0  # the seed matters


def jpeg_image(seed: int):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg(seed))).convert("RGB")


def test_generator_training_under_autocast_on_cuda(tmp_path):
    from factory.dataset.manifest import VersionSpec
    from factory.dataset.publisher import publish_samples
    from factory.dataset.shards import Sample
    from factory.framework.storage import open_storage
    from factory.tiny.cafe import build_tiny_cafe_parts
    from models.training.job import make_job
    from models.training.runner import train_in_process

    config = FactoryConfig.model_validate({
        "dataset": "cuda", "run_id": "cuda", "storage": {"root": str(tmp_path / "data")},
        "train": {**build_tiny_cafe_parts(tmp_path / "models"), "generator_batch_size": 2, "max_steps": 2,
                  "checkpoint_every": 2, "use_gpu": True, "num_workers": 1}})
    storage = open_storage(config.storage)
    samples = [Sample(f"k{n}", jpeg(n), jpeg(50 + n), "draw it", "here it is", {"key": f"k{n}"}) for n in range(4)]
    publish_samples(storage, VersionSpec("cuda", "v1", "bootstrap"), samples)
    result = train_in_process(make_job(config, "v1", "generator"), storage, "cuda")
    assert result["step"] == 2 and np.isfinite(result["loss"])
