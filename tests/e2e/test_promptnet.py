"""`--stage promptnet` on the demo's references, written to S3: ProFusion then loads it from there."""

import json

import pytest

from factory.framework.config import GeneratorSpec, StorageConfig
from factory.framework.storage import open_storage
from tests.e2e.conftest import run_cli
from tests.factory.conftest import jpeg

pytestmark = pytest.mark.slow


def test_promptnet_on_the_demo_references_writes_a_checkpoint_profusion_loads_from_s3(demo, s3_bucket):
    from factory.framework.images import decode_image
    from models.base import GenJob
    from models.profusion import ProFusionGenerator

    cwd, _ = demo
    endpoint, bucket = s3_bucket
    output = f"s3://{bucket}/checkpoints/promptnet/demo"
    result = run_cli(cwd, "--stage", "promptnet", "--set", f"promptnet.output={output}",
                     "--set", f"storage.endpoint_url={endpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    print(*[line for line in result.stdout.splitlines() if " done in " in line], sep="\n")
    assert f"--set generate.generators.profusion.checkpoint={output}" in result.stdout

    record = json.loads(open_storage(StorageConfig(root=output, endpoint_url=endpoint)).read_bytes("training.json"))
    assert record["reference_set"] == "demo" and record["references"] == 6 and record["steps"] == 3
    settings = StorageConfig(root=str(cwd / "factory-data"), endpoint_url=endpoint)
    spec = GeneratorSpec(kind="profusion", model=str(cwd / "factory-data/models/tiny-sd"), checkpoint=output,
                         image_size=64, steps=2, options={"finetune_steps": 0, "batch_size": 1})
    generator = ProFusionGenerator("demo", spec, storage=settings)
    assert generator.image_encoder is not None
    drawn = generator.generate(decode_image(jpeg(1, size=40)), [GenJob("a {subject} on the beach", "dog",
                                                                        "a dog on the beach", 0)])
    assert drawn[0].image.size == (64, 64)
