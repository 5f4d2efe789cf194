"""`--stage eval` on the embedded demo, with no settings: DreamBench's prompts on the demo's own
references, scored with DINO, CLIP-I and CLIP-T, stored per checkpoint and shown in the version report."""

import json
import math

import pytest

from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_eval(demo):
    """Runs before test_sid.py (file order): trains the tiny G that SID then finds (same run id)."""
    cwd, _ = demo
    result = run_cli(cwd, "--stage", "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    print(*[line for line in result.stdout.splitlines() if " done in " in line], sep="\n")
    storage = open_storage(StorageConfig(root=str(cwd / "factory-data")))
    keys = [key for key in storage.list("evals/generator") if key.endswith("/dreambench-demo.json")]
    assert len(keys) == 1, keys
    return storage, json.loads(storage.read_bytes(keys[0])), result


def test_eval_on_the_demo_writes_dino_clip_i_and_clip_t(demo_eval):
    _, report, result = demo_eval
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t"}
    assert all(math.isfinite(value) and -1 <= value <= 1 for value in report["metrics"].values())
    assert report["images"] == 3 * 3 * 2  # one reference per subject x 3 prompts x 2 images
    assert report["trained_on"]["version"] == "demo" and report["checkpoint"].startswith("checkpoints/generator/")
    assert "[eval] done" in result.stdout and '"clip_t"' in result.stdout


def test_each_demo_subject_gets_its_dreambench_list(demo_eval):
    _, report, _ = demo_eval
    prompts = {row["prompt"] for row in report["per_prompt"]}
    assert "a dog wearing a rainbow scarf" in prompts  # live subjects take the live list
    assert "a teapot with the Eiffel Tower in the background" in prompts  # objects the object list
    assert {row["subject"] for row in report["per_subject"]} == {"dog", "teapot", "backpack"}


def test_the_version_report_shows_the_eval(demo_eval, tmp_path):
    from factory.report import write_report

    storage, report, _ = demo_eval
    page = write_report(storage, "demo", "demo", tmp_path / "report").read_text()
    assert "dreambench-demo" in page and report["checkpoint"] in page
    assert f"{report['metrics']['clip_t']:.4g}" in page
