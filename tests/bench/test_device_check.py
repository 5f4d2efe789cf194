"""bench/device_check.py's CPU mode: the check a lent GPU runs, on tiny models, with the packages
that machine lacks (Ray among them) refused, so the check cannot rot between GPU loans."""

from __future__ import annotations

import importlib.metadata
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.device_check import ABSENT_ON_DEVICE, CUDA_TESTS, main

WHEELS = Path(__file__).resolve().parents[2] / "bench" / "device_wheels.txt"


@pytest.mark.slow
def test_the_device_check_runs_every_section_on_tiny_models_without_ray(tmp_path):
    out = tmp_path / "out"
    assert main(["--cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert summary["mode"] == "cpu (tiny models, float32)"
    assert {name: result["status"] for name, result in sections.items()} == {
        "environment": "passed", "cuda_tests": "passed", "demo": "passed", "real_size": "passed",
        "real_size_compile": "skipped"}
    packages = sections["environment"]["findings"]["packages"]
    assert all(packages[name].startswith("missing") for name in ABSENT_ON_DEVICE)  # as on the GPU machine

    demo = sections["demo"]["findings"]
    assert demo["generate+filter"]["ran"] == demo["plan"]["units"] > 0
    assert demo["filter"]["candidates"] == demo["plan"]["jobs"]
    assert demo["train"]["samples"] >= 2
    for model in ("generator", "assistant"):
        assert demo["train"][model]["step"] == 2 and demo["train"][model]["loss"] > 0

    tests = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    assert int(tests.get("tests")) >= 4 and int(tests.get("skipped")) == int(tests.get("tests"))  # no GPU here
    figures = json.loads((out / "cost_figures.json").read_text())["devices"]["cpu (tiny models)"]["figures"]
    assert {"filter_candidate_s", "profusion_sample_step_s", "train_generator_sample_s"} <= set(figures)
    assert not list(out.rglob("*.safetensors"))  # models and storage stay in the work folder, not in $OUT


def test_the_carried_wheels_are_the_versions_the_tests_use():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", WHEELS.read_text(), flags=re.M))
    assert {"diffusers", "open_clip_torch", "webdataset", "pydantic", "pydantic_core"} <= set(pins)
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, name
    assert not {"ray", "boto3", "faiss-cpu"} & set(pins)


def test_the_cuda_tests_the_check_runs_are_marked_cuda():
    for path in CUDA_TESTS:
        source = (Path(__file__).resolve().parents[2] / path).read_text()
        assert "pytestmark = pytest.mark.cuda" in source, path
