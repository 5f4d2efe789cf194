"""The live progress lines of `factory.run`: their numbers checked against a run's unit files at a known
point (a run stopped halfway), and the watch refreshing while the units run."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from factory.dataset.reference_sets import write_parts
from factory.framework import layout
from factory.framework.config import FactoryConfig, load_config
from factory.framework.executor import Step, run_steps_inline
from factory.framework.stage import RunContext
from factory.framework.units import read_unit, unit_meta, write_plan, write_unit
from factory.progress import HOUR, LogLines, ProgressWatch, StageProgress, watch_progress
from filters.rules import RULES
from stages.dialogue import Dialogue
from stages.filter import Filter
from tests.factory.conftest import jpeg

REFERENCES = {f"ref{n}": jpeg(200 + n, size=32) for n in range(3)}
SUBJECTS = ["dog", "red car", "teapot", "cat", "blue vase"]


def candidates(count: int, per_unit: int) -> pd.DataFrame:
    """What a generate stage left for the filter: each job's reference, instruction and drawn target."""
    return pd.DataFrame({
        "key": [f"k{n:03d}" for n in range(count)], "unit": [n // per_unit for n in range(count)],
        "reference_part": layout.reference_part("refs", 0), "reference_id": [f"ref{n % 3}" for n in range(count)],
        "instruction": [f"a photo of a {SUBJECTS[n % 5]} number {n}" for n in range(count)],
        "target_image": [jpeg(n, size=32) for n in range(count)]})


@pytest.fixture(scope="module")
def filter_settings(tmp_path_factory):
    """The real filter's settings on a tiny CLIP and DINO, each threshold the median of its scores
    over the run's candidates: every rule then passes some candidates and rejects others."""
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino
    root = tmp_path_factory.mktemp("progress-models")
    clip = build_tiny_clip(root / "clip")
    settings = {"clip_model": clip.model_name, "clip_pretrained": clip.pretrained,
                "clip_model_config": clip.model_config, "dino_model": build_tiny_dino(root / "dino")}
    rows = candidates(24, 4).assign(input_image=lambda frame: frame["reference_id"].map(REFERENCES))
    scored = Filter(FactoryConfig.model_validate({"filter": settings}), device="cpu")(rows)
    return {**settings, "thresholds": {rule: float(np.median(scored[rule])) for rule in RULES}}


class Drafts(Dialogue):
    """The dialogue stage as the run declares it (its columns, kept images, facts), its drafts not
    written by an LLM: a tiny random-weight one writes all or none of them validly, and the line's
    pass rate needs some of each. Every other row the filter let through is rejected."""

    def setup(self) -> None:  # no engine
        pass

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows["style"], rows["dialogue_attempts"] = "plain", 1
        rows["user"] = "Draw " + rows["instruction"]
        rows["assistant"] = "Here it is: " + rows["instruction"]
        rows["reject"] = ["not_json" if n % 2 else None for n in range(len(rows))]
        return rows


STEPS = [Step("filter", Filter), Step("dialogue", Drafts)]


def run_context(root, filter_settings) -> RunContext:
    overrides = [f"storage.root={root}", "run_id=r", "filter.num_gpus=1", "references.set=refs"]
    overrides += [f"filter.{name}={value}" for name, value in filter_settings.items() if name != "thresholds"]
    overrides += [f"filter.thresholds.{rule}={value!r}" for rule, value in filter_settings["thresholds"].items()]
    return RunContext(load_config(None, overrides))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, filter_settings):
    """A run's storage root with generate, the real filter and the dialogue done on every unit, then
    the last three dialogue files lost: a run stopped halfway."""
    root = tmp_path_factory.mktemp("stopped")
    ctx = run_context(root, filter_settings)
    units, per_unit = 6, 4
    write_parts(ctx.storage, "refs", ({"reference_id": name, "image": image, "width": 32, "height": 32,
                                        "subject": "dog", "domain": "object", "source": "test", "origin": name,
                                        "prompt": None, "seed": None} for name, image in REFERENCES.items()),
                part_size=8)
    drawn = candidates(units * per_unit, per_unit)
    plan = drawn.drop(columns="target_image")
    write_plan(ctx.storage, "r", pa.Table.from_pandas(plan, preserve_index=False), per_unit)
    for unit, rows in drawn.groupby("unit"):
        rows = rows.assign(input_bytes=rows["reference_id"].map(REFERENCES).str.len(),
                           target_bytes=rows["target_image"].str.len(), reject_stage=None, reject_reason=None)
        write_unit(ctx.storage, "r", "generate", int(unit), rows,
                   {"stage": "generate", "unit": int(unit), "finished_at": time.time(),
                    "counters": {"rows": per_unit, "live_in": per_unit, "live_out": per_unit, "seconds": 1.0}})
    run_steps_inline(ctx, STEPS)
    for unit in (3, 4, 5):
        ctx.storage.delete(layout.unit_file("r", "dialogue", unit))
    return root


@pytest.fixture
def stopped_run(tmp_path, stopped, filter_settings) -> RunContext:
    """A copy of the stopped run for one test to read and change."""
    shutil.copytree(stopped, tmp_path / "root")
    return run_context(tmp_path / "root", filter_settings)


class Recorder:
    def __init__(self):
        self.shown: list[list[StageProgress]] = []
        self.closed: list[StageProgress] | None = None

    def show(self, lines):
        self.shown.append(lines)

    def close(self, lines):
        self.closed = lines


def test_the_progress_lines_are_what_the_unit_files_say(stopped_run):
    ctx = stopped_run
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
    assert 0 < dialogue_line.pass_rate < 1
    assert dialogue_line.pass_rate == round(drafted.loc[reached, "reject_reason"].isna().mean(), 4)
    assert dialogue_line.rule_pass_rates == {}
    seconds = sum(unit_meta(ctx.storage, "r", "filter", unit)["counters"]["seconds"] for unit in range(6))
    assert filter_line.gpu_hours == round(seconds / 3600, 4)  # the filter on one GPU, the dialogue on none
    assert (filter_line.estimated_gpu_hours, dialogue_line.estimated_gpu_hours) == (2.5, None)
    # every unit finished within the last hour: the pace is the last hour's
    assert dialogue_line.candidates_per_second == round(len(drafted) / HOUR, 4)
    assert dialogue_line.eta_seconds == 3 * HOUR / 3  # three units left at three an hour
    assert filter_line.eta_seconds == 0.0


def test_the_watch_reads_only_new_footers_and_drops_lost_ones(stopped_run):
    ctx = stopped_run
    watch = ProgressWatch(ctx, ["filter", "dialogue"], Recorder(), every=5.0, estimate=None)
    watch.snapshot()
    ctx.storage.delete(layout.unit_file("r", "filter", 0))
    ctx.storage.write_bytes(layout.unit_file("r", "dialogue", 4), b"torn")
    filter_line, dialogue_line = watch.snapshot()
    assert (filter_line.done, dialogue_line.done) == (5, 3)
    assert sorted(watch.known["filter"].index) == [1, 2, 3, 4, 5]


def test_a_run_under_the_watch_ends_with_its_last_lines(stopped_run, caplog):
    ctx = stopped_run
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
def test_the_command_lines_display_prices_the_plan_with_the_dry_runs_figures(stopped_run, terminal, capsys):
    ctx = stopped_run
    with watch_progress(ctx, ["filter", "dialogue"], terminal=terminal, log_every=60.0) as watch:
        pass
    assert set(watch.estimate) == {"generate", "filter", "dialogue"} and watch.estimate["filter"] > 0
    assert watch_progress(ctx, ["filter"], terminal=False, log_every=0).__enter__() is None  # switched off
