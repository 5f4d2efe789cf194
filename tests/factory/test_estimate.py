"""`python -m factory.run --dry-run`: the plan's size and GPU-hours, read from config, storage and
measured figures, with nothing written; and the same arithmetic as bench/cost_model.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory.cost import PAPER_TRIAL_GPU_HOURS, write_device_figures
from factory.framework import layout
from factory.run import main

ROOT = Path(__file__).resolve().parents[2]


def write_config(folder: Path, **sections) -> Path:
    config = {"dataset": "cafe", "run_id": "night", "storage": {"root": str(folder / "store")},
              "references": {"set": "refs", "sources": [{"kind": "folder", "path": str(folder / "in")}]},
              "plan": {"jobs_per_reference": 4, "unit_size": 10},
              "generate": {"generators": {"profusion": {"kind": "profusion", "model": "sd2", "steps": 50,
                                                        "options": {"finetune_steps": 50}},
                                          "cafe": {"kind": "cafe", "model": "g", "steps": 50}}},
              **sections}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def store_reference_set(root: Path, count: int) -> None:
    folder = root / layout.reference_set("refs")
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"reference_id": [f"r{n}" for n in range(count)]}), folder / "part-00000.parquet")
    (root / layout.reference_complete("refs")).write_text("{}")


def store_version(root: Path, version: str, kind: str, generated: int, passed: int, gpu_seconds: float) -> None:
    manifest = {"schema": "factory.manifest/1", "dataset": "cafe", "version": version, "kind": kind, "parents": [],
                "created": f"2026-11-0{1 + len(version) % 8}T00:00:00+00:00", "samples": passed, "shards": [],
                "thresholds": {"clip_t": 0.3, "dino": 0.6},
                "funnel": {"planned": generated, "generated": generated, "passed_clip": passed, "passed_dino": passed},
                "cost": {"generate": {"actor_seconds": 99.0, "gpu_seconds": gpu_seconds},
                         "filter": {"actor_seconds": 1.0, "gpu_seconds": 0.0},
                         "dialogue": {"actor_seconds": 5.0, "gpu_seconds": 0.0}},
                "config": {"generate": {"num_gpus": 0}}}
    path = root / layout.manifest("cafe", version)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def dry_run(capsys, *args: str) -> str:
    assert main(["--dry-run", *args]) == 0
    return capsys.readouterr().out


def row(output: str, stage: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.strip().startswith(stage + " "))
    return line.split()


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A storage root holding 25 references and a CPU-run bootstrap version (pass rate 0.25)."""
    monkeypatch.chdir(tmp_path)
    store_reference_set(tmp_path / "store", 25)
    store_version(tmp_path / "store", "boot", "bootstrap", generated=40, passed=10, gpu_seconds=0.0)
    return write_config(tmp_path)


def test_dry_run_writes_nothing_and_reads_the_stored_plan_and_version(published, tmp_path, capsys):
    before = listing(tmp_path)
    output = dry_run(capsys, "--stage", "all", "--config", str(published))
    assert listing(tmp_path) == before
    plan = row(output, "plan")
    assert number(plan[1]) == 25 * 4 and number(plan[2]) == 10  # candidates and units
    assert "pass rate 0.250" in output and "measured: cafe/boot funnel" in output
    assert "references " not in output  # the stored set is complete: nothing to draw
    generate = row(output, "generate")
    assert number(generate[4]) == pytest.approx(100 * 12.0 / 3600, abs=0.05)  # a CPU run's seconds are not used
    dialogue = row(output, "dialogue")
    assert number(dialogue[1]) == 25


def test_dry_run_of_sid_writes_nothing(published, tmp_path, capsys):
    store_version(tmp_path / "store", "night-sid1", "sid", generated=50, passed=20, gpu_seconds=100.0)
    before = listing(tmp_path)
    output = dry_run(capsys, "--stage", "sid", "--config", str(published))
    assert listing(tmp_path) == before
    assert number(row(output, "plan")[1]) == 25 * 2  # sid.jobs_per_reference defaults to 2
    generate = row(output, "generate")
    assert number(generate[3]) == pytest.approx(2.0)  # G's measured GPU-seconds per candidate
    assert "[measured]" in " ".join(generate)
    assert "train G" in output and "train assistant" not in output  # sid.finetune_assistant is off by default
    both = dry_run(capsys, "--stage", "sid", "--config", str(published), "--set", "sid.finetune_assistant=true")
    assistant, generator = row(both, "train assistant"), row(both, "train G")
    assert number(assistant[2]) == number(generator[2]) > 0  # the same union samples
    assert number(assistant[4]) / number(generator[4]) == pytest.approx(0.4 / 0.12, rel=0.05)  # paper-less defaults


def test_dry_run_creates_no_storage_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    (tmp_path / "in").mkdir()
    before = listing(tmp_path)
    output = dry_run(capsys, "--stage", "all", "--config", str(config))
    assert listing(tmp_path) == before and not (tmp_path / "store").exists()
    assert "no published version" in output


def cost_model_total(section: str) -> float:
    """The bench cost model's total GPU-hours per 1M accepted for one section, on the paper's figures."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_model.py"), "--no-results"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    body = done.stdout.split(section, 1)[1]
    return number(re.search(r"^\s+total\s+([\d,]+)", body, re.M).group(1))


def test_estimate_agrees_with_the_cost_model_on_the_papers_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    references = {"set": "refs", "sd_steps": 50,
                  "sources": [{"kind": "generated", "prompts": ["dog"], "per_prompt": 750_000}]}
    config = write_config(tmp_path, references=references)
    output = dry_run(capsys, "--stage", "all", "--config", str(config))
    assert number(row(output, "plan")[1]) == 3_000_000
    generate = row(output, "generate")
    assert number(generate[4]) == pytest.approx(PAPER_TRIAL_GPU_HOURS)  # the paper's trial: 10,000 h for 3M
    accepted = number(row(output, "dialogue")[1])
    model_hours = sum(number(row(output, stage)[4]) for stage in ("generate", "filter", "dialogue"))
    per_million = model_hours / accepted * 1_000_000
    assert per_million == pytest.approx(cost_model_total("per 1M accepted quadruplets"), abs=1)


def test_measured_figures_of_a_device_kind_price_the_configured_steps(published, tmp_path, capsys):
    figures = tmp_path / "figures.json"
    entry = {"measured": "2026-12-01", "figures": {
        name: {"value": value, "source": "measured"} for name, value in {
            "profusion_finetune_step_s": 0.2, "profusion_reference_s": 1.0, "profusion_sample_step_s": 0.1,
            "profusion_decode_s": 0.5, "filter_candidate_s": 0.01}.items()}}
    write_device_figures(entry, "NVIDIA H200", figures)
    output = dry_run(capsys, "--stage", "all", "--config", str(published), "--device-kind", "NVIDIA H200",
                     "--figures", str(figures), "--set", "generate.generators.profusion.steps=20")
    generate = row(output, "generate")
    assert number(generate[3]) == pytest.approx((50 * 0.2 + 1.0) / 4 + 20 * 0.1 + 0.5, rel=1e-3)
    assert "NVIDIA H200-hours" in output and "[measured]" in " ".join(generate)
    assert number(row(output, "filter")[3]) == pytest.approx(0.01)


def test_unknown_device_kind_is_refused(published, capsys):
    assert main(["--dry-run", "--stage", "all", "--config", str(published), "--device-kind", "TPU"]) == 2
    assert "no measured figures for device kind 'TPU'" in capsys.readouterr().err


def test_a_figures_file_named_but_absent_or_not_json_is_refused_naming_it(published, tmp_path, capsys):
    """Else the paper's figures priced the run and nothing said the named file was not read."""
    absent, broken = tmp_path / "absent.json", tmp_path / "broken.json"
    broken.write_text('{"schema": 1,')
    for figures, said in ((absent, "does not exist"), (broken, "does not read as JSON")):
        assert main(["--dry-run", "--stage", "all", "--config", str(published), "--figures", str(figures)]) == 2
        assert f"figures file {figures} {said}" in capsys.readouterr().err


def test_cost_model_cli_keeps_the_papers_totals():
    assert cost_model_total("per 1M accepted quadruplets") == 48_501
    assert cost_model_total("SID round") == 10_324


def test_the_version_report_prices_1m_samples_per_device_kind(tmp_path):
    from factory.cost import version_estimates
    from factory.report.page import estimate_section

    store_version(tmp_path, "boot", "bootstrap", generated=3_000, passed=207, gpu_seconds=0.0)
    manifest = json.loads((tmp_path / layout.manifest("cafe", "boot")).read_text())
    figures = tmp_path / "figures.json"
    entry = {"measured": "2026-12-01", "figures": {"filter_candidate_s": {"value": 0.004, "source": "measured"}}}
    write_device_figures(entry, "cpu", figures)
    rows = version_estimates(manifest, figures)
    assert [row["device"] for row in rows] == ["A100", "cpu"]
    paper = rows[0]
    assert paper["total"] == pytest.approx(cost_model_total("per 1M accepted quadruplets"), abs=1)
    assert paper["sources"] == {"generate": "paper+derived", "filter": "assumed", "dialogue": "assumed"}
    assert rows[1]["sources"]["filter"] == "measured" and rows[1]["unit"] == "cpu-hours"
    assert rows[1]["sources"]["dialogue"] == "assumed, A100"  # no 70B LLM was timed on that device
    assert rows[1]["stages"]["filter"] == pytest.approx(1e6 / 0.069 * 0.004 / 3600)
    assert "1M accepted samples" in estimate_section(manifest) and "(paper+derived)" in estimate_section(manifest)


def test_a_partial_bench_run_keeps_the_kinds_other_figures(tmp_path):
    from factory.cost import read_figures

    figures = tmp_path / "figures.json"
    first = {"measured": "2026-12-01", "parts": ["profusion", "filter"],
             "figures": {"profusion_decode_s": {"value": 2.0}, "filter_candidate_s": {"value": 0.5}}}
    write_device_figures(first, "cpu", figures)
    write_device_figures({"measured": "2026-12-02", "parts": ["filter"],
                          "figures": {"filter_candidate_s": {"value": 0.25}}}, "cpu", figures)
    entry = read_figures(figures)["cpu"]
    assert entry["parts"] == ["profusion", "filter"]
    assert entry["figures"]["filter_candidate_s"] == {"value": 0.25, "measured": "2026-12-02"}
    assert entry["figures"]["profusion_decode_s"] == {"value": 2.0, "measured": "2026-12-01"}


def test_measured_g_seconds_leave_the_papers_sid_pass_rate_alone(published, tmp_path, capsys):
    figures = tmp_path / "figures.json"
    entry = {"measured": "2026-12-01", "figures": {name: {"value": 10.0, "source": "measured"} for name in (
        "cafe_sample_step_s", "cafe_decode_s", "cafe_w_s", "cafe_reference_s")}}
    write_device_figures(entry, "cpu", figures)
    output = dry_run(capsys, "--stage", "sid", "--config", str(published), "--device-kind", "cpu",
                     "--figures", str(figures))
    assert number(row(output, "generate")[3]) == pytest.approx(50 * 10 + 10 + 10 + 10 / 2)
    assert "pass rate 0.096" in output


def test_dry_run_prices_only_all_and_sid(published, capsys):
    assert main(["--dry-run", "--stage", "generate", "--config", str(published)]) == 2
    assert "--dry-run prices --stage all or --stage sid" in capsys.readouterr().err


def ip_adapter_bootstrap_config(tmp_path: Path) -> Path:
    """A config whose bootstrap draws with a 30-step, 512-px IP-Adapter, 4 jobs per reference."""
    (tmp_path / "in").mkdir()
    config = write_config(tmp_path, plan={"jobs_per_reference": 4, "unit_size": 10, "generator": "ipa"})
    spec = yaml.safe_load(config.read_text())
    spec["generate"]["generators"]["ipa"] = {"kind": "ip_adapter", "model": "sd15", "checkpoint": "h94/IP-Adapter",
                                             "steps": 30, "image_size": 512}
    config.write_text(yaml.safe_dump(spec))
    return config


def test_an_ip_adapter_bootstrap_is_priced_as_sampling_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ip_adapter_bootstrap_config(tmp_path)
    output = dry_run(capsys, "--stage", "all", "--config", str(config))
    generate = row(output, "generate")
    assert number(generate[3]) == pytest.approx(30 * 0.05)  # 30 steps x the assumed SD step, no fine-tuning
    assert "no fine-tuning" in output and "[derived]" in " ".join(generate)


def test_measured_ip_adapter_figures_price_its_steps_decode_and_shared_embedding(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ip_adapter_bootstrap_config(tmp_path)
    figures = tmp_path / "figures.json"
    entry = {"measured": "2026-12-01", "figures": {
        name: {"value": value, "source": "measured"} for name, value in {
            "ip_adapter_sample_step_s": 0.04, "ip_adapter_decode_s": 0.3, "ip_adapter_reference_s": 2.0}.items()}}
    write_device_figures(entry, "NVIDIA H200", figures)
    output = dry_run(capsys, "--stage", "all", "--config", str(config), "--device-kind", "NVIDIA H200",
                     "--figures", str(figures))
    generate = row(output, "generate")
    assert number(generate[3]) == pytest.approx(30 * 0.04 + 0.3 + 2.0 / 4, rel=1e-3)  # embedding shared by 4 jobs
    assert "[measured]" in " ".join(generate)


def test_the_version_report_prices_an_ip_adapter_bootstrap_with_ip_adapter_figures(tmp_path):
    from factory.cost import version_estimates

    store_version(tmp_path, "boot", "bootstrap", generated=3_000, passed=207, gpu_seconds=0.0)
    manifest = json.loads((tmp_path / layout.manifest("cafe", "boot")).read_text())
    generators = {"ipa": {"kind": "ip_adapter", "steps": 30, "image_size": 512},
                  "profusion": {"kind": "profusion", "steps": 50}}
    manifest["config"] = {"plan": {"generator": "ipa", "jobs_per_reference": 4},
                          "generate": {"num_gpus": 0, "generators": generators}}
    figures = tmp_path / "figures.json"
    measured = {"ip_adapter_sample_step_s": 0.04, "ip_adapter_decode_s": 0.3, "ip_adapter_reference_s": 2.0,
                "profusion_sample_step_s": 9.0, "profusion_decode_s": 9.0}  # ProFusion's must not be used
    write_device_figures({"measured": "2026-12-01", "figures": {
        name: {"value": value, "source": "measured"} for name, value in measured.items()}}, "H200", figures)

    paper, h200 = version_estimates(manifest, figures)

    accepted_candidates = 1e6 / (207 / 3_000)
    assert h200["stages"]["generate"] == pytest.approx(accepted_candidates * (30 * 0.04 + 0.3 + 2.0 / 4) / 3600)
    assert h200["sources"]["generate"] == "measured"
    assert paper["stages"]["generate"] == pytest.approx(accepted_candidates * 30 * 0.05 / 3600)  # SD steps, derived
    assert paper["sources"]["generate"] == "derived"
