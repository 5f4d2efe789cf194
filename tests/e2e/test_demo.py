"""The embedded demo, run exactly as the README says: `python -m factory.run --stage all`."""

import json
import platform
import tarfile
from pathlib import Path

import pytest

from factory.dataset.manifest import load_manifest, verify_version
from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_prints_the_funnel_and_where_the_version_is(demo):
    cwd, result = demo
    assert "funnel: planned 18 -> generated 18 -> passed_clip" in result.stdout
    manifest_path = cwd / "factory-data" / "datasets" / "demo" / "demo" / "manifest.json"
    assert f"manifest at {manifest_path}" in result.stdout


def test_every_pool_asks_ray_for_its_memory_so_ray_does_not_warn(demo):
    _, result = demo
    output = result.stdout + result.stderr
    assert "MapBatches(UnitChain)" in output  # Ray Data ran the model pool and its log is here
    assert "of memory per worker" not in output and "consider setting `memory=" not in output


def test_the_demos_output_fits_on_a_screen_without_library_chatter(demo):
    """Model loading's progress bars and deprecation warnings stay out of the run's output (workers'
    included: Ray forwards their output to the driver)."""
    _, result = demo
    output = result.stdout + result.stderr
    for chatter in ("Loading weights", "Loading pipeline components", "FutureWarning", "past_key_values"):
        assert chatter not in output, chatter
    assert len(output.splitlines()) <= 40


def test_demo_version_is_sound_and_its_funnel_adds_up(demo):
    cwd, _ = demo
    storage = open_storage(StorageConfig(root=str(cwd / "factory-data")))
    assert verify_version(storage, "demo", "demo") == []
    manifest = load_manifest(storage, "demo", "demo")
    funnel = manifest["funnel"]
    assert funnel["planned"] == 18 and funnel["written"] == manifest["samples"] > 0
    assert funnel["planned"] == funnel["written"] + sum(funnel["rejections"].values())
    assert funnel["generated"] >= funnel["passed_clip"] >= funnel["passed_dino"] >= funnel["dialogue_accepted"]
    assert manifest["config_sha256"] and manifest["config"]["dataset"] == "demo"
    assert set(manifest["cost"]) == {"generate", "filter", "dialogue"}
    assert manifest["dialogue_prompt"]["sha256"]


def test_rerun_publishes_nothing_new_and_says_so(demo):
    cwd, _ = demo
    before = json.loads((cwd / "factory-data/datasets/demo/demo/manifest.json").read_text())
    again = run_cli(cwd, "--stage", "all")
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"skipped": 3, "ran": 0' in again.stdout
    after = json.loads((cwd / "factory-data/datasets/demo/demo/manifest.json").read_text())
    assert after == before


def test_the_demo_in_another_folder_publishes_byte_identical_shards(demo, machine_cache, tmp_path_factory):
    """`ray job submit --working-dir` unpacks every submission into a new folder: the data must not notice."""
    cwd, _ = demo
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "a" / "deeper" / "folder"
    elsewhere.mkdir(parents=True)
    result = run_cli(elsewhere, "--stage", "all", env=machine_cache)  # the demo fixture's SmolLM2 conversion
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((folder / "factory-data/datasets/demo/demo/manifest.json").read_text())
                     for folder in (cwd, elsewhere))
    assert [(shard["path"], shard["sha256"]) for shard in second["shards"]] == \
        [(shard["path"], shard["sha256"]) for shard in first["shards"]]
    assert second["samples"] == first["samples"] > 0


# The demo's shards, pinned: a change to the demo's plan (format 2, the partitioned plan, drew new
# jobs), its models or the shard writer changes them; update them on purpose, never to make a test pass.
# Last changed: a bootstrap sample's `generator.w` is JSON null, no longer NaN (not JSON).
# Pinned per CPU vendor: the same code and packages (torch 2.14.1) write other bytes on an AMD EPYC
# than on an Intel Xeon, both AVX-512 (measured 2026-12-07): the tiny models' float arithmetic differs
# in its last bits, and that reaches the JPEG bytes. On one machine the bytes never vary (the test
# above runs the demo twice).
DEMO_SHARDS = {
    "GenuineIntel": [
        ("shards/demo-000000.tar", "1c1698fb184a1838fa49882e0f773b694751e8f167c609f26d09fc37ec53f62e"),
        ("shards/demo-000001.tar", "bd837bf393fe790bf49e92d304abc3d592f879cdb1526338facce4ef3c42bafb"),
    ],
    "AuthenticAMD": [
        ("shards/demo-000000.tar", "d999b0419e25324c8a67b38d51304fdced9011b4eedbfdacdae5adbd0bf8e50d"),
        ("shards/demo-000001.tar", "72afbf22731ad9adfca4f53d3c724d41cabf54bf837facf8d2169c01818b2175"),
    ],
}


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (Linux), else what `platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    vendors = [line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")]
    return vendors[0] if vendors else platform.processor() or platform.machine()


def test_the_demo_publishes_its_pinned_shards(demo):
    cwd, _ = demo
    manifest = json.loads((cwd / "factory-data/datasets/demo/demo/manifest.json").read_text())
    written = [(shard["path"], shard["sha256"]) for shard in manifest["shards"]]
    vendor = cpu_vendor()
    if vendor not in DEMO_SHARDS:
        pytest.skip(f"no demo shards pinned for a {vendor} CPU; this one wrote {written}")
    assert written == DEMO_SHARDS[vendor]


def test_every_metadata_member_is_strict_json(demo):
    """No NaN or Infinity (Python's json writes them by default; JSON has neither): a bootstrap
    sample's `generator.w` was NaN until the publisher read its rows without pandas."""
    cwd, _ = demo

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    members = 0
    for shard in sorted((cwd / "factory-data/datasets/demo/demo/shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    json.loads(tar.extractfile(member).read(), parse_constant=refuse)
                    members += 1
    assert members > 0


def test_bad_input_gives_clear_exit_codes(tmp_path):
    bad = run_cli(tmp_path, "--stage", "plan", "--set", "plan.unit_size=-1")
    assert bad.returncode == 2 and "plan.unit_size" in bad.stderr
    missing = run_cli(tmp_path, "--stage", "publish", "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr
