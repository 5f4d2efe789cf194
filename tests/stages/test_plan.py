import pytest

from factory.framework import layout
from factory.framework.config import load_config
from factory.framework.context import RunContext
from stages import plan, references
from stages.plan import PlanError
from tests.factory.conftest import jpeg


@pytest.fixture
def ctx_factory(tmp_path):
    images = tmp_path / "images"
    for subject in ("dog", "teapot"):
        (images / subject).mkdir(parents=True)
        for n in range(3):
            (images / subject / f"{n}.jpg").write_bytes(jpeg(n + (10 if subject == "dog" else 20), size=64))

    def make(*overrides):
        config = load_config(None, [f"storage.root={tmp_path / 'root'}", "references.min_side=8",
                                    f"references.sources=[{{kind: folder, path: {images}}}]", *overrides])
        return RunContext(config)

    return make


def test_same_config_same_plan_byte_for_byte(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    assert plan.run(ctx) == {"jobs": 18, "units": 3}
    first = ctx.storage.read_bytes("runs/demo/plan.parquet")
    again = plan.build_plan(ctx_factory())
    assert again.equals(ctx.storage.read_parquet("runs/demo/plan.parquet"))
    ctx.storage.delete("runs/demo/plan.parquet")
    plan.run(ctx_factory())
    assert ctx.storage.read_bytes("runs/demo/plan.parquet") == first


def test_a_changed_seed_changes_the_plan_and_an_existing_plan_is_not_replaced(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    plan.run(ctx)
    other = plan.build_plan(ctx_factory("plan.seed=1")).to_pandas()
    base = plan.build_plan(ctx).to_pandas()
    assert list(base["key"]) != list(other["key"])
    with pytest.raises(PlanError, match="differs from the plan this config draws"):
        plan.run(ctx_factory("plan.seed=1"))


def test_jobs_per_reference_units_and_keys(ctx_factory):
    ctx = ctx_factory("plan.jobs_per_reference=4", "plan.unit_size=5")
    references.run(ctx)
    jobs = plan.build_plan(ctx).to_pandas()
    assert len(jobs) == 24 and jobs["key"].is_unique
    assert (jobs.groupby("reference_id").size() == 4).all()
    assert list(jobs["unit"]) == [n // 5 for n in range(24)]
    assert set(jobs["subject"]) == {"dog", "teapot"}
    for row in jobs.itertuples():
        assert row.subject in row.instruction and "{subject}" not in row.instruction
        assert row.domain == "object" and row.instruction_id.startswith("obj-")


def test_total_jobs_mode_draws_exactly_that_many(ctx_factory):
    ctx = ctx_factory("plan.total_jobs=7")
    references.run(ctx)
    assert plan.build_plan(ctx).num_rows == 7


def test_an_unfinished_reference_set_is_never_planned_from(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    ctx.storage.delete(layout.reference_complete("demo"))
    with pytest.raises(PlanError, match="unfinished reference set"):
        plan.run(ctx)
