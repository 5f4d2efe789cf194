"""The version report's eval section: the stored eval reports of generators trained on the version."""

from __future__ import annotations

import json

import pytest

from factory.framework import layout
from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from factory.report.data import VersionData
from factory.report.evals import evals_of_version
from factory.report.page import evals_section
from factory.report.summary import IndexSummary


def version_data(version: str, evals: list[dict]) -> VersionData:
    """The report's own VersionData, with only the evals filled in."""
    manifest = {"dataset": "demo", "version": version}
    return VersionData(manifest, IndexSummary(version), None, "no candidates kept", evals=evals)


def eval_report(version: str, created: str, clip_t: float) -> bytes:
    return json.dumps({
        "checkpoint": f"checkpoints/generator/g-{version}/step-00000002", "eval_set": "dreambench-bench",
        "semantic": "clip_text", "images": 12, "created": created,
        "metrics": {"dino": 0.5, "clip_i": 0.25, "clip_t": clip_t},
        "trained_on": {"dataset": "demo", "version": version, "step": 2},
    }).encode()


def test_the_report_lists_the_evals_of_generators_trained_on_the_version_newest_first(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    storage.write_bytes(layout.eval_result("generator", "g-v1/step-00000002", "dreambench-bench"),
                        eval_report("v1", "2026-12-01T01:00:00+00:00", 0.125))
    storage.write_bytes(layout.eval_result("generator", "g-v1/step-00000004", "dreambench-bench"),
                        eval_report("v1", "2026-12-02T01:00:00+00:00", 0.375))
    storage.write_bytes(layout.eval_result("generator", "g-v2/step-00000002", "dreambench-bench"),
                        eval_report("v2", "2026-12-03T01:00:00+00:00", 0.875))

    found = evals_of_version(storage, "demo", "v1")
    assert [r["metrics"]["clip_t"] for r in found] == [0.375, 0.125]
    html = evals_section(version_data("v1", found))
    assert "CLIP-T" in html and "0.375" in html and "0.125" in html and "0.875" not in html
    assert "checkpoints/generator/g-v1/step-00000002" in html


def test_a_version_without_evals_says_how_to_run_one(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    assert evals_of_version(storage, "demo", "v1") == []
    assert "--stage eval" in evals_section(version_data("v1", []))


TRAINED_ON_V1 = b'"trained_on": {"dataset": "demo", "version": "v1"}'


@pytest.mark.parametrize("body", [b"not json", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'{"trained_on": "v1"}',
                                  b"{" + TRAINED_ON_V1 + b"}",
                                  b"{" + TRAINED_ON_V1 + b', "metrics": {"dino": "high", "clip_i": 0, "clip_t": 0}}'],
                         ids=["not-json", "nested-too-deep", "not-an-object", "trained-on-not-an-object",
                              "no-metrics", "a-metric-not-a-number"])
def test_an_eval_report_of_another_shape_is_skipped_and_the_good_ones_listed(tmp_path, body, caplog):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    storage.write_bytes(layout.eval_result("generator", "g-v1/step-00000002", "dreambench-bench"),
                        eval_report("v1", "2026-12-01T01:00:00+00:00", 0.125))
    storage.write_bytes(layout.eval_result("generator", "g-v1/step-00000004", "dreambench-bench"), body)
    assert [r["metrics"]["clip_t"] for r in evals_of_version(storage, "demo", "v1")] == [0.125]
    assert "skipping" in caplog.text and "step-00000004" in caplog.text
