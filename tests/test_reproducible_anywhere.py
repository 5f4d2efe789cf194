"""The same config gives the same references, plan and sample metadata in any working folder.

`ray job submit --working-dir` unpacks into a new folder for every submission, and `./` paths
in a config become absolute there: nothing that defines data may carry them.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

CONFIG = """
dataset: anywhere
run_id: anywhere
storage: {root: ./factory-data}
references:
  set: refs
  sd_model: ./models/tiny-sd
  sd_steps: 2
  sd_size: 64
  store_size: 64
  sources:
    - {kind: folder, path: ./inputs, subject: thing}
    - {kind: generated, prompts: [dog, teapot], per_prompt: 2, seed: 5}
plan: {jobs_per_reference: 2, unit_size: 3, generator: profusion, seed: 7}
generate:
  generators:
    profusion: {kind: profusion, model: ./models/tiny-sd, checkpoint: ./models/tiny-promptnet}
"""


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from factory.tiny.sd import build_tiny_sd

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    build_tiny_sd(folder)
    return folder


def png(seed: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def ingest_and_plan(folder: Path, tiny_sd: Path, monkeypatch) -> tuple[object, object]:
    """Lay out one working folder, then run references and plan from inside it."""
    from factory.dataset.reference_sets import load_references
    from factory.framework.config import load_config
    from factory.framework.stage import RunContext
    from stages import plan, references

    (folder / "inputs" / "sub").mkdir(parents=True)
    (folder / "inputs" / "a.png").write_bytes(png(1))
    (folder / "inputs" / "sub" / "b.png").write_bytes(png(2))
    shutil.copytree(tiny_sd, folder / "models" / "tiny-sd")
    (folder / "job.yaml").write_text(CONFIG)
    monkeypatch.chdir(folder)
    config = load_config("job.yaml")
    assert config.storage.root == str(folder / "factory-data")  # a different absolute root each time
    ctx = RunContext(config)
    references.run(ctx)
    plan.run(ctx)
    import pyarrow as pa

    from factory.framework.units import read_plan

    return load_references(ctx.storage, "refs"), pa.concat_tables(read_plan(ctx.storage, "anywhere"))


def test_two_working_folders_give_the_same_ids_keys_and_seeds(tmp_path, tiny_sd, monkeypatch):
    refs_a, plan_a = ingest_and_plan(tmp_path / "job-a" / "deep", tiny_sd, monkeypatch)
    refs_b, plan_b = ingest_and_plan(tmp_path / "job-b", tiny_sd, monkeypatch)

    assert len(refs_a) == 6  # two files, four drawn
    assert sorted(refs_a["reference_id"]) == sorted(refs_b["reference_id"])
    for name in ("key", "reference_id", "seed", "unit", "instruction"):
        assert plan_a.column(name).to_pylist() == plan_b.column(name).to_pylist(), name
    assert plan_a.equals(plan_b)


def test_a_changed_file_gets_a_new_reference_id(tmp_path, tiny_sd, monkeypatch):
    from factory.dataset.reference_sources import folder_candidates
    from factory.framework.config import ReferencesConfig, ReferenceSource

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    source = ReferenceSource(kind="folder", path=str(folder), subject="thing")
    before = folder_candidates(source, ReferencesConfig())[0].reference_id
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert folder_candidates(source.model_copy(update={"path": str(moved)}), ReferencesConfig())[0].reference_id \
        == before  # moving the folder keeps the id
    (moved / "a.png").write_bytes(png(2))
    assert folder_candidates(source.model_copy(update={"path": str(moved)}), ReferencesConfig())[0].reference_id \
        != before  # new content, new id


def test_generator_describe_holds_no_absolute_path(tmp_path, monkeypatch):
    from factory.framework.config import GeneratorSpec
    from factory.tiny.sd import build_tiny_promptnet, build_tiny_sd
    from models.profusion import ProFusionGenerator

    monkeypatch.chdir(tmp_path)
    build_tiny_sd(tmp_path / "models" / "tiny-sd")
    build_tiny_promptnet(tmp_path / "models" / "tiny-promptnet", tmp_path / "models" / "tiny-sd")
    spec = GeneratorSpec(kind="profusion", model=str(tmp_path / "models" / "tiny-sd"),
                         checkpoint=str(tmp_path / "models" / "tiny-promptnet"), image_size=64, steps=2)
    described = ProFusionGenerator("profusion", spec).describe()
    assert described["model"] == "models/tiny-sd" and described["checkpoint"] == "models/tiny-promptnet"
    assert str(tmp_path) not in repr(described)
