"""`versions status RUN`: a run's progress from its storage root alone, checked against its unit files."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa

from factory.framework import layout
from factory.framework.config import load_config
from factory.framework.executor import Step, run_steps_inline
from factory.framework.stage import RunContext
from factory.framework.units import read_unit, unit_meta, write_plan
from factory.status import HOUR, run_status
from factory.versions import main as versions_main
from tests.factory.stage_doubles import Stamp


class Drafts(Stamp):
    """A dialogue step that keeps every row the filter let through."""

    name = "dialogue"
    adds = ()

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows


def stopped_run(tmp_path, units=4, per_unit=3):
    """Filter (odd keys rejected) and dialogue done on every unit, then the last two dialogue files lost:
    a run stopped halfway through its last stage."""
    overrides = [f"storage.root={tmp_path}", "run_id=r", "dialogue.num_gpus=1"]
    ctx = RunContext(load_config(None, overrides))
    keys = [f"k{n:03d}" for n in range(units * per_unit)]
    plan = pd.DataFrame({"key": keys, "unit": [n // per_unit for n in range(len(keys))]})
    write_plan(ctx.storage, "r", pa.Table.from_pandas(plan, preserve_index=False), per_unit)
    run_steps_inline(ctx, [Step("filter", Stamp), Step("dialogue", Drafts)])
    for unit in (2, 3):
        ctx.storage.delete(layout.unit_file("r", "dialogue", unit))
    return ctx


def test_a_stopped_runs_status_is_what_its_unit_files_say(tmp_path):
    ctx = stopped_run(tmp_path)
    finished = {unit: unit_meta(ctx.storage, "r", "dialogue", unit)["finished_at"] for unit in (0, 1)}
    status = run_status(ctx.storage, ctx.config, "r", now=max(finished.values()) + 60)

    assert status["units"] == 4
    assert {stage: part["done"] for stage, part in status["stages"].items()} == \
        {"generate": 0, "filter": 4, "dialogue": 2}
    dialogue = pd.concat([read_unit(ctx.storage, "r", "dialogue", unit) for unit in (0, 1)])
    assert status["funnel"]["planned"] == len(dialogue) == 6
    assert status["funnel"]["dialogue_accepted"] == int(dialogue["reject_reason"].isna().sum())
    filtered = pd.concat([read_unit(ctx.storage, "r", "filter", unit) for unit in range(4)])
    assert status["funnel"]["rejections"] == {"filter:odd_key": int((filtered["reject_reason"] == "odd_key").sum())}
    seconds = sum(unit_meta(ctx.storage, "r", "dialogue", unit)["counters"]["seconds"] for unit in (0, 1))
    assert status["gpu_hours"] == round(seconds / HOUR, 4)  # dialogue on one GPU; filter on none
    assert status["stages"]["dialogue"]["units_last_hour"] == 2
    assert status["eta_seconds"] == 2 * HOUR / 2  # two units left at two an hour
    assert run_status(ctx.storage, ctx.config, "r", now=max(finished.values()) + 2 * HOUR)["eta_seconds"] is None
    assert status["publish"] == {"version": "r", "lock_held": False, "published": False}


def test_status_sees_a_held_publish_lock_and_prints_json(tmp_path, capsys):
    ctx = stopped_run(tmp_path)
    ctx.storage.write_bytes(layout.publish_lock(ctx.config.dataset, "r"), b"{}")
    assert versions_main(["--set", f"storage.root={tmp_path}", "status", "r", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["publish"]["lock_held"] is True and printed["stages"]["dialogue"]["done"] == 2
    assert versions_main(["--set", f"storage.root={tmp_path}", "status", "r"]) == 0
    assert re.search(r"dialogue +2/4 units", capsys.readouterr().out)
    assert versions_main(["--set", f"storage.root={tmp_path}", "status", "../r"]) == 2
    capsys.readouterr()
    assert versions_main(["--set", f"storage.root={tmp_path}", "status", "nope"]) == 2  # a misspelt run id
    assert "run 'nope' has nothing under" in capsys.readouterr().err


def test_unit_counters_keep_each_units_time_and_counters_in_columns_and_nothing_else(tmp_path, monkeypatch):
    import factory.framework.units as units

    monkeypatch.setattr(units, "COUNTER_CHUNK", 2)  # footers parsed in several chunks
    storage = RunContext(load_config(None, [f"storage.root={tmp_path}"])).storage
    plan = pd.DataFrame({"key": [f"k{n}" for n in range(10)], "unit": [n // 2 for n in range(10)]})
    write_plan(storage, "r", pa.Table.from_pandas(plan, preserve_index=False), 2)
    for unit in range(5):
        counters = {"rows": 2, "seconds": 0.5 * unit, **({"rejected:blurry": 1} if unit % 2 else {})}
        meta = {"stage": "filter", "unit": unit, "counters": counters, "finished_at": 100.0 + unit,
                "shaped_by": {"filter": {"model": "x" * 1000}}, "describe": {"prompt": "y" * 1000}}
        units.write_unit(storage, "r", "filter", unit, plan[plan["unit"] == unit].copy(), meta)
    storage.write_bytes(layout.unit_file("r", "filter", 3), b"torn")  # a damaged file is not counted

    counted = units.unit_counters(storage, "r", "filter")

    assert sorted(counted.index) == [0, 1, 2, 4]
    assert set(counted.columns) == {"finished_at", "shaped_by", "rows", "seconds", "rejected:blurry"}
    assert counted["shaped_by"].nunique() == 1  # a digest of the settings that shaped the unit: all alike here
    assert all(dtype.kind == "f" for dtype in counted.dtypes)  # numbers only: no footer dict is kept
    assert counted.loc[[0, 1, 2, 4], "rejected:blurry"].tolist() == [0, 1, 0, 0]
    assert counted["seconds"].sum() == 0.5 * (0 + 1 + 2 + 4)
    assert counted.loc[4, "finished_at"] == 104.0
