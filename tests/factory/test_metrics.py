"""The factory's counters through Ray's metrics API: scraped over HTTP from a real local Ray's
Prometheus endpoint after the demo's run, they equal its manifest's funnel and its unit files' counters."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from factory.demo import prepare_demo
from factory.framework.config import QUIET_ENV, load_config
from factory.framework.metrics import prometheus_names
from factory.framework.stage import RunContext
from factory.framework.units import read_unit, unit_counters
from factory.progress import ProgressWatch
from factory.run import UNIT_STEPS, run_all
from filters.rules import RULES
from tests.factory.test_progress import Recorder
from tests.reliability.harness import DEMO_SETTINGS

REPO = Path(__file__).resolve().parents[2]
SCRAPE_SECONDS = 30  # Ray exports its metrics periodically


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_metrics_port(tmp_path, monkeypatch):
    """A local Ray sized as the demo's, its metrics served at http://127.0.0.1:PORT/metrics."""
    import ray

    monkeypatch.chdir(tmp_path)
    port = free_port()
    ray.init(include_dashboard=False, _metrics_export_port=port,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **QUIET_ENV}}, **load_config().ray.local_cluster())
    yield port
    ray.shutdown()


def scrape(port: int, run_id: str) -> dict[tuple[str, ...], float]:
    """{(sample name, stage, reason or rule): value summed over Ray's workers} of the run's factory metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_factory_") and sample.labels.get("run") == run_id:
                detail = sample.labels.get("reason") or sample.labels.get("rule") or ""
                sums[sample.name, sample.labels["stage"], detail] += sample.value
    return dict(sums)


def expected_metrics(ctx: RunContext, funnel: dict) -> dict[tuple[str, ...], float]:
    """What the manifest's funnel and the unit files say the endpoint must serve."""
    run_id = ctx.config.run_id
    counters = {step.name: unit_counters(ctx.storage, run_id, step.name) for step in UNIT_STEPS}
    units = len(counters["generate"])
    expected = {
        ("ray_factory_candidates_accepted_total", "generate", ""): funnel["generated"],
        ("ray_factory_candidates_accepted_total", "dialogue", ""): funnel["dialogue_accepted"],
        **{("ray_factory_filter_passed_total", "filter", rule.name): funnel[rule.funnel] for rule in RULES.values()},
        **{("ray_factory_candidates_rejected_total", *reason.split(":", 1)): count
           for reason, count in funnel["rejections"].items()},
        ("ray_factory_attempts_total", "dialogue", ""): sum(
            read_unit(ctx.storage, run_id, "dialogue", unit)["dialogue_attempts"].fillna(0).sum()
            for unit in counters["dialogue"].index),
    }
    for stage in counters:
        expected.update({("ray_factory_candidates_total", stage, ""): funnel["planned"],
                         ("ray_factory_units_total", stage, ""): units,
                         ("ray_factory_unit_seconds_count", stage, ""): units})
    expected[("ray_factory_candidates_accepted_total", "filter", "")] = counters["filter"]["live_out"].sum()
    return {key: float(value) for key, value in expected.items() if value}


@pytest.mark.slow
def test_rays_endpoint_serves_the_demos_counters_equal_to_its_manifest(tmp_path, ray_metrics_port, one_torch_thread):
    config = load_config(None, list(DEMO_SETTINGS))
    prepare_demo(config)
    progress = Recorder()
    ctx = RunContext(config, unit_steps=UNIT_STEPS,
                     progress=lambda run, stages: ProgressWatch(run, stages, progress, every=1.0, estimate=None))
    funnel = run_all(ctx)["publish"]["funnel"]
    assert funnel["dialogue_accepted"] and funnel["rejections"]  # the demo keeps some candidates, rejects others

    expected = expected_metrics(ctx, funnel)
    deadline = time.monotonic() + SCRAPE_SECONDS
    served = scrape(ray_metrics_port, config.run_id)
    while any(served.get(key) != value for key, value in expected.items()) and time.monotonic() < deadline:
        time.sleep(2)
        served = scrape(ray_metrics_port, config.run_id)
    assert {key: served.get(key) for key in expected} == expected
    for step in UNIT_STEPS:  # actor seconds, as the manifest's cost counts them
        seconds = unit_counters(ctx.storage, config.run_id, step.name)["seconds"].sum()
        assert served[("ray_factory_stage_seconds_total", step.name, "")] == pytest.approx(seconds, rel=1e-6)
    assert not any(name == "ray_factory_gpu_seconds_total" for name, *_ in served)  # the demo runs on no GPU

    units = served[("ray_factory_units_total", "dialogue", "")]
    assert [(line.stage, line.done, line.planned) for line in progress.closed] == \
        [(stage, units, units) for stage in ("generate", "filter", "dialogue")]  # the watch saw the run end


def test_the_grafana_dashboard_plots_every_metric_the_factory_emits_and_no_other():
    dashboard = json.loads((REPO / "docs" / "grafana-factory.json").read_text())
    queries = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", []))
    plotted = set(re.findall(r"\bray_factory_[a-z_]+", queries))
    assert plotted <= prometheus_names()
    assert {name for name in prometheus_names() if not name.endswith(("_sum", "_count"))} <= plotted
    assert {row["title"] for row in dashboard["panels"] if row["type"] == "row"} == {"Funnel", "Throughput", "Cost"}
