"""The live progress lines of `factory.run`: their numbers checked against a run's unit files at a known
point (a run stopped halfway), and the watch refreshing while the units run."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from factory.framework import layout
from factory.framework.config import load_config
from factory.framework.executor import Step, run_steps_inline
from factory.framework.stage import RunContext, Stage
from factory.framework.units import read_unit, unit_meta, write_plan
from factory.progress import HOUR, LogLines, ProgressWatch, StageProgress, watch_progress
from filters.rules import RULES, first_failure, funnel_counts, rule_flags
from tests.factory.stage_doubles import Stamp


class ScoresByKey(Stage):
    """A filter double with the real filter's rules and counters, scores made from the key's number."""

    name = "filter"
    source = "plan"
    adds = ("clip_t", "dino", "pass_clip_t", "pass_dino")
    shaped_by = ("filter",)

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        number = rows["key"].str[1:].astype(int).to_numpy()
        thresholds = self.config.filter.thresholds
        scores = {"clip_t": thresholds["clip_t"] + np.where(number % 3, 0.05, -0.05),  # fails one key in three
                  "dino": thresholds["dino"] + np.where(number % 2, 0.05, -0.05)}  # fails even keys
        flags = rule_flags(scores, thresholds)
        rows = rows.assign(**scores, **flags)
        rows["reject"] = first_failure(flags)
        for gate, count in funnel_counts(np.ones(len(rows), dtype=bool), flags).items():
            self.count(gate, count)
        return rows


class Drafts(Stamp):
    """A dialogue step that rejects one key in four of those the filter let through."""

    name = "dialogue"
    source = "filter"
    adds = ()

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows["reject"] = [("not_json" if int(key[1:]) % 4 == 3 else None) for key in rows["key"]]
        return rows


STEPS = [Step("filter", ScoresByKey), Step("dialogue", Drafts)]


def stopped_run(tmp_path, units=6, per_unit=4):
    """Both stages done on every unit, then the last three dialogue files lost: a run stopped halfway."""
    ctx = RunContext(load_config(None, [f"storage.root={tmp_path}", "run_id=r", "filter.num_gpus=1"]))
    keys = [f"k{n:03d}" for n in range(units * per_unit)]
    plan = pd.DataFrame({"key": keys, "unit": [n // per_unit for n in range(len(keys))]})
    write_plan(ctx.storage, "r", pa.Table.from_pandas(plan, preserve_index=False), per_unit)
    run_steps_inline(ctx, STEPS)
    for unit in (3, 4, 5):
        ctx.storage.delete(layout.unit_file("r", "dialogue", unit))
    return ctx


class Recorder:
    def __init__(self):
        self.shown: list[list[StageProgress]] = []
        self.closed: list[StageProgress] | None = None

    def show(self, lines):
        self.shown.append(lines)

    def close(self, lines):
        self.closed = lines


def test_the_progress_lines_are_what_the_unit_files_say(tmp_path):
    ctx = stopped_run(tmp_path)
    watch = ProgressWatch(ctx, ["filter", "dialogue"], Recorder(), every=5.0, estimate={"filter": 2.5})
    watch.started = 0.0  # every unit finished inside the watch's window
    filter_line, dialogue_line = watch.snapshot()

    filtered = pd.concat([read_unit(ctx.storage, "r", "filter", unit) for unit in range(6)])
    drafted = pd.concat([read_unit(ctx.storage, "r", "dialogue", unit) for unit in range(3)])
    assert (filter_line.done, filter_line.planned, dialogue_line.done) == (6, 6, 3)
    assert filter_line.pass_rate == round(filtered["reject_reason"].isna().mean(), 4)
    for rule in RULES.values():  # each rule with those before it, over what the filter saw
        upto = list(RULES.values())[:list(RULES).index(rule.name) + 1]
        passed = np.logical_and.reduce([filtered[earlier.flag] for earlier in upto])
        assert 0 < passed.mean() < 1
        assert filter_line.rule_pass_rates[rule.name] == round(passed.mean(), 4)
    reached = drafted["reject_stage"].ne("filter")
    assert dialogue_line.pass_rate == round(drafted.loc[reached, "reject_reason"].isna().mean(), 4)
    assert dialogue_line.rule_pass_rates == {}
    seconds = sum(unit_meta(ctx.storage, "r", "filter", unit)["counters"]["seconds"] for unit in range(6))
    assert filter_line.gpu_hours == round(seconds / 3600, 4)  # the filter on one GPU, the dialogue on none
    assert (filter_line.estimated_gpu_hours, dialogue_line.estimated_gpu_hours) == (2.5, None)
    # every unit finished within the last hour: the pace is the last hour's
    assert dialogue_line.candidates_per_second == round(len(drafted) / HOUR, 4)
    assert dialogue_line.eta_seconds == 3 * HOUR / 3  # three units left at three an hour
    assert filter_line.eta_seconds == 0.0


def test_the_watch_reads_only_new_footers_and_drops_lost_ones(tmp_path):
    ctx = stopped_run(tmp_path)
    watch = ProgressWatch(ctx, ["filter", "dialogue"], Recorder(), every=5.0, estimate=None)
    watch.snapshot()
    ctx.storage.delete(layout.unit_file("r", "filter", 0))
    ctx.storage.write_bytes(layout.unit_file("r", "dialogue", 4), b"torn")
    filter_line, dialogue_line = watch.snapshot()
    assert (filter_line.done, dialogue_line.done) == (5, 3)
    assert sorted(watch.known["filter"].index) == [1, 2, 3, 4, 5]


def test_a_run_under_the_watch_ends_with_its_last_lines(tmp_path, caplog):
    ctx = stopped_run(tmp_path)
    recorder = Recorder()
    with ProgressWatch(ctx, ["filter", "dialogue"], recorder, every=0.01, estimate=None):
        run_steps_inline(ctx, STEPS)
    assert [(line.stage, line.done, line.planned) for line in recorder.closed] == [("filter", 6, 6), ("dialogue", 6, 6)]

    with caplog.at_level(logging.INFO, logger="factory.progress"):
        logged = LogLines()
        logged.close(recorder.closed)
        assert not caplog.records  # nothing logged during the block: a short run adds no lines
        logged.show(recorder.closed)
        assert [record.getMessage().split(",")[0] for record in caplog.records] == \
            ["progress filter: 6/6 units", "progress dialogue: 6/6 units"]


@pytest.mark.parametrize("terminal", [False, True])
def test_the_command_lines_display_prices_the_plan_with_the_dry_runs_figures(tmp_path, terminal, capsys):
    ctx = stopped_run(tmp_path)
    with watch_progress(ctx, ["filter", "dialogue"], terminal=terminal, log_every=60.0) as watch:
        pass
    assert set(watch.estimate) == {"generate", "filter", "dialogue"} and watch.estimate["filter"] > 0
    assert watch_progress(ctx, ["filter"], terminal=False, log_every=0).__enter__() is None  # switched off
