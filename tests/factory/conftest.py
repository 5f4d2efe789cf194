import io

import numpy as np
import pytest
from PIL import Image

from factory.dataset.shards import Sample
from factory.framework.layout import sample_key


def jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_samples(count: int, start: int = 0, round_: int = 0) -> list[Sample]:
    samples = []
    for n in range(start, start + count):
        key = sample_key(reference_id=f"ref{n % 3}", instruction_id=f"i{n}", instruction=f"a dog number {n}",
                         seed=n, generator="profusion", checkpoint="tiny", round=round_)
        meta = {"key": key, "reference_id": f"ref{n % 3}", "subject": "dog", "domain": "object",
                "instruction": f"a photo of a dog number {n}", "round": round_,
                "generator": {"name": "profusion", "seed": n, "alpha": None},
                "scores": {"clip_t": 0.3 + n / 1000, "dino": 0.6 + n / 1000}}
        samples.append(Sample(key, jpeg(n), jpeg(n + 1000), f"Draw dog {n} ✓", f"Here is dog {n}.", meta))
    return samples


@pytest.fixture
def samples():
    return make_samples(11)
