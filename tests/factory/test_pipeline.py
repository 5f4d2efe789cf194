
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from factory.framework import layout
from factory.framework.config import load_config
from factory.framework.executor import RunChanged, Step, changed_settings, run_steps, run_steps_inline
from factory.framework.stage import RunContext, fingerprint
from factory.framework.units import finished_units as finished
from factory.framework.units import read_plan_unit, read_unit, unit_meta, write_plan
from factory.run import UNIT_STEPS
from tests.factory.stage_doubles import DropsRows, Stamp

STAMP = Step("filter", Stamp)


def finished_units(ctx, stage):
    return finished(ctx.storage, ctx.config.run_id, stage)


def read_stage(ctx, stage):
    units = sorted(finished_units(ctx, stage))
    return pd.concat([read_unit(ctx.storage, ctx.config.run_id, stage, unit) for unit in units], ignore_index=True)



def make_ctx(tmp_path, units=5, per_unit=3) -> RunContext:
    ctx = RunContext(load_config(None, [f"storage.root={tmp_path}", "run_id=t"]))
    keys = [f"k{n:03d}" for n in range(units * per_unit)]
    plan = pd.DataFrame({"key": keys, "unit": [n // per_unit for n in range(len(keys))]})
    write_plan(ctx.storage, ctx.config.run_id, pa.Table.from_pandas(plan, preserve_index=False), per_unit)
    return ctx


def test_inline_loop_writes_one_file_per_unit(tmp_path):
    ctx = make_ctx(tmp_path)
    assert run_steps_inline(ctx, [STAMP])["ran"] == 5
    out = read_stage(ctx, "filter")
    assert list(out["stamped"]) == [k.upper() for k in out["key"]]
    assert (out["seconds_filter"] >= 0).all()
    odd = out["key"].str[1:].astype(int) % 2 == 1
    assert (out.loc[odd, "reject_reason"] == "odd_key").all() and (out.loc[odd, "reject_stage"] == "filter").all()
    assert out.loc[~odd, "reject_reason"].isna().all()
    assert run_steps_inline(ctx, [STAMP])["ran"] == 0


def test_unit_files_keep_their_counters_and_the_settings_that_made_them(tmp_path):
    ctx = make_ctx(tmp_path, units=2)
    run_steps_inline(ctx, [STAMP])
    meta = unit_meta(ctx.storage, "t", "filter", 1)  # keys k003, k004, k005
    assert meta["counters"]["rows"] == 3 and meta["counters"]["live_out"] == 1
    assert meta["counters"]["rejected:odd_key"] == 2
    assert meta["shaped_by"]["filter.thresholds.clip_t"] == ctx.config.filter.thresholds["clip_t"]
    assert "filter.concurrency" not in meta["shaped_by"]


def test_rows_rejected_upstream_reach_no_stage_and_come_back_untouched(tmp_path):
    from tests.factory.stage_doubles import Stamp

    ctx = make_ctx(tmp_path, units=1)
    rows = pd.DataFrame({"key": ["k000", "k002", "k004"], "unit": [0, 0, 0],
                         "reject_stage": [None, "generate", None], "reject_reason": [None, "bad_job", None]})
    out = Stamp(ctx.config)(rows)
    assert out["reject_reason"].tolist() == [None, "bad_job", None]
    assert out["reject_stage"].tolist() == [None, "generate", None]
    assert out["stamped"].tolist()[0] == "K000" and pd.isna(out["stamped"].iloc[1])


def test_a_run_refuses_units_made_with_other_settings(tmp_path):
    ctx = make_ctx(tmp_path, units=3)
    (tmp_path / "RAISE_UNIT").write_text("2")
    with pytest.raises(Exception, match="injected failure"):
        run_steps_inline(ctx, [STAMP])
    changed = RunContext(load_config(None, [f"storage.root={tmp_path}", "run_id=t", "filter.thresholds.clip_t=0.35"]))
    old = ctx.config.filter.thresholds["clip_t"]
    with pytest.raises(RunChanged, match=rf"filter.thresholds.clip_t: {old} -> 0.35"):
        run_steps_inline(changed, [STAMP])
    moved = RunContext(load_config(None, [f"storage.root={tmp_path}", "run_id=t", "filter.concurrency=3",
                                          "filter.memory=1073741824"]))
    assert run_steps_inline(moved, [STAMP])["ran"] == 1  # where a stage runs is not what it makes


def test_a_run_may_change_how_fast_it_runs_and_reaches_its_server_but_not_what_it_makes():
    """Raising the LLM timeout after timeouts, or the reader threads, is how a run is rescued."""
    sections = ("references", "generate", "filter", "dialogue")
    made_with = fingerprint(load_config(None, []), sections)
    rescued = load_config(None, ["references.io_threads=2", "dialogue.request_timeout_s=600",
                                 "dialogue.max_retries=9", "dialogue.retry_backoff_s=5",
                                 "dialogue.max_concurrency=2", "dialogue.api_key_env=OTHER_KEY"])
    assert changed_settings(rescued, made_with) == []
    reshaped = load_config(None, ["dialogue.max_attempts=5", "dialogue.temperature=0.1"])
    assert len(changed_settings(reshaped, made_with)) == 2


def test_a_stage_that_drops_rows_is_an_error(tmp_path):
    ctx = make_ctx(tmp_path, units=1)
    with pytest.raises(RuntimeError, match="keeps every live row"):
        run_steps_inline(ctx, [Step("filter", DropsRows)])


def test_killed_actor_is_restarted_and_its_unit_retried(tmp_path, ray_local):
    ctx = make_ctx(tmp_path, units=6)
    (tmp_path / "KILL_UNIT").write_text("4")
    summary = run_steps(ctx, [STAMP])
    assert not (tmp_path / "KILL_UNIT").exists()  # the actor did die on unit 4
    assert summary["ran"] == 6 and finished_units(ctx, "filter") == set(range(6))
    assert summary["filter"]["candidates"] == 18 and summary["filter"]["gpu_seconds"] == 0
    out = read_stage(ctx, "filter")
    assert out["key"].is_unique and len(out) == 18 and out["stamped"].notna().all()


def test_failed_run_resumes_only_missing_units(tmp_path, ray_local):
    ctx = make_ctx(tmp_path, units=6)
    (tmp_path / "RAISE_UNIT").write_text("3")
    with pytest.raises(Exception, match="injected failure"):
        run_steps(ctx, [STAMP])
    done_before = finished_units(ctx, "filter")
    assert 3 not in done_before
    again = run_steps(ctx, [STAMP])
    assert again["skipped"] == len(done_before) and again["ran"] == 6 - len(done_before)
    out = read_stage(ctx, "filter")
    assert out["key"].is_unique and len(out) == 18


def test_a_truncated_unit_file_is_redone_on_ray_and_not_counted_skipped(tmp_path, ray_local):
    ctx = make_ctx(tmp_path, units=3)
    run_steps(ctx, [STAMP])
    path = tmp_path / layout.unit_file(ctx.config.run_id, "filter", 1)
    path.write_bytes(path.read_bytes()[:50])
    again = run_steps(ctx, [STAMP])
    assert (again["skipped"], again["ran"]) == (2, 1)
    assert len(read_unit(ctx.storage, ctx.config.run_id, "filter", 1)) == 3


def test_neighbouring_steps_with_equal_resources_share_an_actor(tmp_path):
    from factory.framework.executor import pool_groups

    ctx = make_ctx(tmp_path, units=1)
    steps = list(UNIT_STEPS)
    assert [[s.name for s in group] for group in pool_groups(steps, ctx.config)] == [["generate", "filter", "dialogue"]]
    ctx.config.filter.num_gpus = 0.25
    groups = pool_groups(steps, ctx.config)
    assert [[s.name for s in group] for group in groups] == [["generate"], ["filter"], ["dialogue"]]


def test_a_unit_with_no_live_row_still_gets_the_stage_columns(tmp_path):
    from tests.factory.stage_doubles import Stamp

    ctx = make_ctx(tmp_path, units=1)
    rows = pd.DataFrame({"key": ["k000", "k002"], "unit": [0, 0],
                         "reject_stage": ["generate", "generate"], "reject_reason": ["bad_job", "bad_job"]})
    out = Stamp(ctx.config)(rows)
    assert "stamped" in out and out["stamped"].isna().all()
    assert out["reject_reason"].tolist() == ["bad_job", "bad_job"]


def test_a_stage_adds_only_the_columns_it_declares_and_every_one_of_them(tmp_path):
    class Undeclared(Stamp):
        def process(self, rows):
            rows = super().process(rows)
            rows["surprise"] = 1
            return rows

    class DeclaresMore(Stamp):
        adds = ("stamped", "later")

    ctx = make_ctx(tmp_path, units=1)
    with pytest.raises(RuntimeError, match=r"does not declare in `adds`: \['surprise'\]"):
        Undeclared(ctx.config)(read_plan_unit(ctx.storage, ctx.config.run_id, 0))
    out = DeclaresMore(ctx.config)(read_plan_unit(ctx.storage, ctx.config.run_id, 0))
    assert "later" in out and out["later"].isna().all()


def test_the_candidate_rows_table_in_the_docs_lists_what_each_stage_declares():
    """docs/architecture.md's contract between stages is the stages' own `adds`."""
    table = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    table = table[table.index("## Candidate rows"):table.index("## Module map")]
    for step in UNIT_STEPS:
        documented = set()
        for line in table.splitlines():
            cells = [cell.strip() for cell in line.split("|")]
            if len(cells) > 3 and cells[2] == step.name:
                documented.update(re.findall(r"`([a-z_]+)`", cells[1]))
        assert documented == set(step.stage_class.adds), step.name
