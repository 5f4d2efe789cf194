import pandas as pd
import pyarrow as pa
import pytest
import yaml

from factory.dataset import planning
from factory.dataset.manifest import VersionError
from factory.dataset.publisher import check_references_unchanged, publish_run
from factory.dataset.reference_sets import set_digest
from factory.framework import layout
from factory.framework.config import load_config
from factory.framework.stage import RunContext
from factory.framework.units import PlanFormatError, plan_index, read_plan, read_plan_unit
from stages import plan, references
from stages.plan import PlanError
from tests.factory.conftest import jpeg


def stored(ctx) -> pd.DataFrame:
    return pa.concat_tables(read_plan(ctx.storage, ctx.config.run_id)).to_pandas()


def stored_bytes(ctx) -> dict[str, bytes]:
    return {key: ctx.storage.read_bytes(key) for key in ctx.storage.list(layout.run_dir(ctx.config.run_id))}


def drawn(ctx_factory, *overrides) -> pd.DataFrame:
    """The plan a config draws, in a run of its own."""
    ctx = ctx_factory(*overrides, f"run_id=probe{abs(hash(overrides)) % 10**6}")
    plan.run(ctx)
    return stored(ctx)


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
    first = stored_bytes(ctx)
    assert plan.run(ctx_factory()) == {"jobs": 18, "units": 3}  # the stored plan is what the config draws
    for key in first:
        ctx.storage.delete(key)
    plan.run(ctx_factory())
    assert stored_bytes(ctx) == first


def test_a_changed_seed_changes_the_plan_and_an_existing_plan_is_not_replaced(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    plan.run(ctx)
    other = drawn(ctx_factory, "plan.seed=1")
    assert list(stored(ctx)["key"]) != list(other["key"])
    with pytest.raises(PlanError, match="differs from the plan this config draws"):
        plan.run(ctx_factory("plan.seed=1"))


def test_jobs_per_reference_units_and_keys(ctx_factory):
    ctx = ctx_factory("plan.jobs_per_reference=4", "plan.unit_size=5")
    references.run(ctx)
    plan.run(ctx)
    jobs = stored(ctx)
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
    assert plan.run(ctx)["jobs"] == 7 and len(stored(ctx)) == 7


def test_an_unfinished_reference_set_is_never_planned_from(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    ctx.storage.delete(layout.reference_complete("demo"))
    with pytest.raises(PlanError, match="unfinished reference set"):
        plan.run(ctx)


# --- partitions ------------------------------------------------------------------------------


@pytest.fixture
def many_parts(ctx_factory, monkeypatch):
    """Six reference parts of one reference each, and partitions of at most 8 jobs: several partitions."""
    monkeypatch.setattr(planning, "PARTITION_JOBS", 8)
    ctx = ctx_factory("references.part_size=1")
    references.run(ctx)
    return ctx


@pytest.mark.parametrize("overrides", [("plan.jobs_per_reference=5", "plan.unit_size=3"),
                                       ("plan.total_jobs=40", "plan.unit_size=4")])
@pytest.mark.usefixtures("ray_local")
def test_the_partitioned_plan_is_the_same_drawn_here_or_by_ray_tasks(ctx_factory, many_parts, overrides):
    plans = {}
    for executor in ("local", "ray"):
        ctx = ctx_factory("references.part_size=1", *overrides, f"run_id={executor}", f"plan.executor={executor}")
        plan.run(ctx)
        plans[executor] = {key.rsplit("/", 1)[-1]: ctx.storage.read_bytes(key)
                           for key in ctx.storage.list(layout.run_dir(ctx.config.run_id))}
    assert plans["local"] == plans["ray"]
    assert len([name for name in plans["local"] if name.startswith("part-")]) > 2  # several partitions
    index = plan_index(ctx.storage, ctx.config.run_id)
    jobs = stored(ctx)
    assert jobs["key"].is_unique and sorted(jobs["unit"].unique()) == index.units()
    for unit in index.units():
        rows = read_plan_unit(ctx.storage, ctx.config.run_id, unit)
        assert len(rows) == index.rows[unit] and set(rows["unit"]) == {unit}
    units_by_part = [set(part.column("unit").to_pylist()) for part in read_plan(ctx.storage, ctx.config.run_id)]
    assert sum(map(len, units_by_part)) == len(set().union(*units_by_part))  # a unit never spans partitions


def test_a_plan_stopped_half_way_keeps_its_drawn_partitions_and_ends_the_same(ctx_factory, many_parts):
    ctx = ctx_factory("references.part_size=1", "plan.jobs_per_reference=5")
    plan.run(ctx)
    whole = stored_bytes(ctx)
    ctx.storage.delete(layout.plan(ctx.config.run_id))  # the index is written last
    ctx.storage.delete(layout.plan_part(ctx.config.run_id, 1))
    plan.run(ctx)
    assert stored_bytes(ctx) == whole


def test_a_stored_plan_of_another_format_is_refused(ctx_factory):
    ctx = ctx_factory()
    references.run(ctx)
    old = pa.table({"key": ["k0"], "unit": [0]})  # format 1: one plan.parquet of jobs, no format recorded
    ctx.storage.write_parquet(layout.plan(ctx.config.run_id), old)
    for attempt in (lambda: plan.run(ctx), lambda: read_plan_unit(ctx.storage, ctx.config.run_id, 0)):
        with pytest.raises(PlanFormatError, match="plan of format 1.*run_id=NEW"):
            attempt()


def test_the_command_line_exits_2_on_a_refusal_found_inside_a_stage(ctx_factory, tmp_path, capsys, monkeypatch):
    import factory.run

    monkeypatch.setattr(factory.run, "check_inputs", lambda config, stage: None)  # the models are not the point
    ctx = ctx_factory()
    references.run(ctx)
    ctx.storage.write_parquet(layout.plan(ctx.config.run_id), pa.table({"key": ["k0"], "unit": [0]}))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(ctx.config.snapshot()))
    assert factory.run.main(["--stage", "plan", "--config", str(config_file)]) == 2
    assert "refused" in capsys.readouterr().err


def test_a_run_whose_reference_set_was_rebuilt_since_its_plan_is_refused_at_publish(ctx_factory, tmp_path):
    """Its units join references by (part, id): a set rebuilt with other images moves them."""
    ctx = ctx_factory()
    references.run(ctx)
    plan.run(ctx)
    digest = set_digest(ctx.storage, "demo")
    assert plan_index(ctx.storage, ctx.config.run_id).meta["reference_digest"] == digest
    references.run(ctx)  # the same images again: the same set
    assert set_digest(ctx.storage, "demo") == digest
    check_references_unchanged(ctx)
    (tmp_path / "images" / "dog" / "new.jpg").write_bytes(jpeg(99, size=64))
    references.run(ctx)
    assert set_digest(ctx.storage, "demo") not in (None, digest)
    with pytest.raises(VersionError, match="reference set 'demo' was rebuilt .* since run 'demo' was planned"):
        check_references_unchanged(ctx)
    ctx.storage.delete(layout.reference_complete("demo"))  # being rebuilt
    with pytest.raises(VersionError, match="was rebuilt \\(or is being rebuilt\\)"):
        publish_run(ctx)


def test_publishing_a_run_with_nothing_to_publish_exits_2_without_a_traceback(ctx_factory, tmp_path, capsys,
                                                                               monkeypatch):
    import factory.run

    monkeypatch.setattr(factory.run, "check_inputs", lambda config, stage: None)
    ctx = ctx_factory()
    references.run(ctx)
    plan.run(ctx)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(ctx.config.snapshot()))
    assert factory.run.main(["--stage", "publish", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "error: stage publish refused: nothing to publish: no dialogue output under" in err
    assert "Traceback" not in err


def test_ctrl_c_in_a_stage_ends_in_one_line_and_exit_130(ctx_factory, tmp_path, capsys, monkeypatch):
    import factory.run

    def pressed_ctrl_c(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(factory.run, "check_inputs", lambda config, stage: None)
    monkeypatch.setitem(factory.run.STAGE_RUNS, "plan", pressed_ctrl_c)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(ctx_factory().config.snapshot()))
    assert factory.run.main(["--stage", "plan", "--config", str(config_file)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: stage plan stopped; what it finished is kept" in err and "Traceback" not in err

