from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from factory.config import load_config
from factory.context import RunContext
from factory.pipeline import Step, finished_units, read_stage, run_steps, run_steps_inline

REPO = Path(__file__).resolve().parents[2]
STAMP = Step("filter", "tests.factory.stage_doubles:Stamp", "plan")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def make_ctx(tmp_path, units=5, per_unit=3) -> RunContext:
    ctx = RunContext(load_config(None, [f"storage.root={tmp_path}", "run_id=t"]))
    keys = [f"k{n:03d}" for n in range(units * per_unit)]
    plan = pd.DataFrame({"key": keys, "unit": [n // per_unit for n in range(len(keys))]})
    ctx.storage.write_parquet(f"{ctx.run_dir}/plan.parquet", pa.Table.from_pandas(plan, preserve_index=False))
    return ctx


def test_inline_loop_writes_one_file_per_unit(tmp_path):
    ctx = make_ctx(tmp_path)
    assert run_steps_inline(ctx, [STAMP])["ran"] == 5
    out = read_stage(ctx, "filter")
    assert list(out["stamped"]) == [k.upper() for k in out["key"]]
    assert out["reject_reason"].isna().all() and (out["seconds_filter"] >= 0).all()
    assert run_steps_inline(ctx, [STAMP])["ran"] == 0


def test_a_stage_that_drops_rows_is_an_error(tmp_path):
    ctx = make_ctx(tmp_path, units=1)
    with pytest.raises(RuntimeError, match="must keep every row"):
        run_steps_inline(ctx, [Step("filter", "tests.factory.stage_doubles:DropsRows", "plan")])


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


def test_neighbouring_steps_with_equal_resources_share_an_actor(tmp_path):
    from factory.pipeline import STEPS, pool_groups

    ctx = make_ctx(tmp_path, units=1)
    steps = [STEPS["generate"], STEPS["filter"], STEPS["dialogue"]]
    assert [[s.name for s in group] for group in pool_groups(steps, ctx.config)] == [["generate", "filter", "dialogue"]]
    ctx.config.filter.num_gpus = 0.25
    groups = pool_groups(steps, ctx.config)
    assert [[s.name for s in group] for group in groups] == [["generate"], ["filter"], ["dialogue"]]
