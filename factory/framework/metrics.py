"""The factory's counters through Ray's metrics API, so Ray's Prometheus endpoint serves them.

A unit worker running inside Ray records a unit's counters here when it has written the unit's
file: the same counters the file's footer keeps, so what Prometheus sums over a run equals the
funnel and cost its manifest states. Every metric is tagged with `run` and `stage`. Ray names
them `ray_<name>` in Prometheus, and counters get a `_total` suffix (`ray_factory_candidates_total`);
docs/grafana-factory.json plots them. The inline loop (tests, bench/device_check.py on a machine
without Ray) records nothing and never imports ray.
"""

from __future__ import annotations

from collections.abc import Mapping

from filters.rules import RULES

TAGS = ("run", "stage")
REJECTED = "rejected:"
# unit latency buckets, in seconds: a tiny CPU unit takes about a second, a paper-size GPU unit an hour
UNIT_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]

# metric name -> (the unit counter it adds up, what it counts)
COUNTER_METRICS = {
    "factory_candidates": ("rows", "candidate rows in the units a stage finished (rejected upstream included)"),
    "factory_candidates_live": ("live_in", "candidates still alive when they reached the stage"),
    "factory_candidates_accepted": ("live_out", "candidates the stage let through"),
    "factory_attempts": ("attempts", "model calls made for the stage's candidates (dialogue: drafts tried)"),
    "factory_stage_seconds": ("seconds", "actor seconds the stage spent on its units"),
}
UNITS, REJECTIONS, RULE_PASSES = "factory_units", "factory_candidates_rejected", "factory_filter_passed"
GPU_SECONDS, UNIT_SECONDS = "factory_gpu_seconds", "factory_unit_seconds"


def prometheus_names() -> set[str]:
    """The names Ray's endpoint serves these under: `ray_` first, `_total` after a counter, a histogram's series."""
    counters = (*COUNTER_METRICS, UNITS, REJECTIONS, RULE_PASSES, GPU_SECONDS)
    histogram = {f"ray_{UNIT_SECONDS}_{part}" for part in ("bucket", "count", "sum")}
    return {f"ray_{name}_total" for name in counters} | histogram


class UnitMetrics:
    """The Ray metrics of one stage in one run; `record` adds one finished unit."""

    def __init__(self, run_id: str, stage: str, num_gpus: float):
        from ray.util import metrics  # ray: only inside Ray actors (the inline loop runs without it)

        self.tags = {"run": run_id, "stage": stage}
        self.num_gpus = num_gpus
        self.counters = {name: metrics.Counter(name, description=text, tag_keys=TAGS)
                         for name, (_, text) in COUNTER_METRICS.items()}
        self.units = metrics.Counter(UNITS, description="work units finished", tag_keys=TAGS)
        self.rejected = metrics.Counter(REJECTIONS, description="candidates the stage rejected, by reason",
                                        tag_keys=(*TAGS, "reason"))
        self.passed = metrics.Counter(RULE_PASSES, description="candidates that passed a filter rule and every "
                                      "rule before it", tag_keys=(*TAGS, "rule"))
        self.gpu_seconds = metrics.Counter(GPU_SECONDS, description="accelerator seconds: actor seconds times the "
                                           "stage's GPUs per actor", tag_keys=TAGS)
        self.unit_seconds = metrics.Histogram(UNIT_SECONDS, description="wall seconds per work unit",
                                              boundaries=UNIT_SECONDS_BOUNDARIES, tag_keys=TAGS)

    def record(self, counters: Mapping[str, float], unit_seconds: float) -> None:
        self.units.inc(1, tags=self.tags)
        self.unit_seconds.observe(unit_seconds, tags=self.tags)
        for name, (counter, _) in COUNTER_METRICS.items():
            if counters.get(counter):
                self.counters[name].inc(counters[counter], tags=self.tags)
        if counters.get("seconds") and self.num_gpus:
            self.gpu_seconds.inc(counters["seconds"] * self.num_gpus, tags=self.tags)
        for name, count in counters.items():
            if name.startswith(REJECTED) and count:
                self.rejected.inc(count, tags={**self.tags, "reason": name[len(REJECTED):]})
        for rule in RULES.values():
            if counters.get(rule.funnel):
                self.passed.inc(counters[rule.funnel], tags={**self.tags, "rule": rule.name})
