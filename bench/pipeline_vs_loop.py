"""The Ray pipeline (`run_steps`) vs a plain single-process loop (`run_steps_inline`).

    python bench/pipeline_vs_loop.py [--threads 1] [--cases tiny,compute] [--no-results]

Both sides run generate -> filter -> dialogue (the same `UnitWorker` code) on the same plan
(drawn twice from the same config under two fresh run ids, checked equal), in one run:

- loop: `factory.framework.executor.run_steps_inline` in a fresh Python process, timed from process
  start to exit (imports and model loads included);
- pipeline: `factory.framework.executor.run_steps` on a local Ray cluster started beforehand (its
  start is not counted: a production cluster is already up), timed around the call (actor
  start, imports and model loads included).

Threads: every process doing model work gets `OMP_NUM_THREADS=--threads` from its environment
(the loop process directly; Ray actors inherit it from the driver, and Ray keeps a value that
is already set instead of deriving one from num_cpus), checked with `torch.get_num_threads()`
on both sides. The default, 1, is what Ray gives the demo's 0.5-CPU actors anyway; on this
shared 2-core machine 2 threads per process fall into OpenMP oversubscription.

Cases: `tiny` is the embedded demo as configured (tiny random-weight models: the fixed cost
per run and per unit shows); `compute` is the same demo with the ProFusion generator scaled
up (see COMPUTE_OVERRIDES) so that model compute dominates. Both cut the demo's 18 jobs
into 6 units of 3 (one reference each) instead of 3 units of 6, to have more units to time.

CPU seconds are summed over every process of each side (for the pipeline: the driver, Ray's
daemons and every actor, read from /proc); they move much less than wall time when other
jobs share the machine. Each case also prints a model wall = fixed + units x per-unit (the
per-unit cost from the spacing of the last stage's units) and the run length from which the
pipeline reaches 0.9x the loop. The last line of each case is `ratio pipeline/loop: X`
(throughput). Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
sys.path.insert(0, str(REPO))

from factory.framework.config import FactoryConfig, load_config, validate_config  # noqa: E402

STEP_NAMES = ("generate", "filter", "dialogue")
PROFUSION = "generate.generators.profusion"
COMPUTE_OVERRIDES = [
    f"{PROFUSION}.image_size=128",  # demo: 64 (latents 16x16 instead of 8x8)
    f"{PROFUSION}.steps=20",  # demo: 3
    f"{PROFUSION}.options.finetune_steps=40",  # demo: 5
]
UNIT_OVERRIDES = ["plan.unit_size=3"]  # demo: 6; one reference (3 jobs) per unit gives 6 units to time
CASES = {
    "tiny": ("demo models as configured (generator 64 px, 3 steps, 5 fine-tune steps)", []),
    "compute": ("demo models, generator scaled up: 128 px, 20 steps, 40 fine-tune steps", COMPUTE_OVERRIDES),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in every working process")
    parser.add_argument("--cases", default="tiny,compute", help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--workdir", default=str(REPO / "bench" / "out" / "pipeline_vs_loop"),
                        help="models are built here once; the storage root under it is wiped per run")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="markdown file to append to")
    parser.add_argument("--no-results", action="store_true", help="print only")
    parser.add_argument("--timeline", action="store_true", help="also print when each stage ran each unit")
    parser.add_argument("--loop-child", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- measuring ---------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def process_name(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = words[0].decode(errors="replace").strip()
    if not first:  # an exited process not reaped yet
        return "?"
    if first.startswith("ray::"):
        return "ray::MapWorker (actor)" if "MapWorker" in first else first.split("(")[0].split(".")[0]
    if "python" in Path(first).name and len(words) > 1:
        script = next((w.decode(errors="replace") for w in words[1:] if w and not w.startswith(b"-")), "")
        return f"python {Path(script).name}"[:40]
    return Path(first).name[:40]


def descendants_cpu(root: int) -> dict[int, float]:
    """pid -> CPU seconds so far, for `root` and every process below it."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        cpu = cpu_seconds(pid)
        if cpu is not None:
            found[pid] = cpu
            todo.extend(child_pids(pid))
    return found


class TreeCpuMeter:
    """CPU seconds used by this process and all its descendants while running (polled /proc;
    a process that exits between polls loses at most one poll interval)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.baseline = descendants_cpu(os.getpid())
        self.latest = dict(self.baseline)
        self.names = {pid: process_name(pid) for pid in self.baseline}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        seen = descendants_cpu(os.getpid())
        for pid in seen:  # Ray renames a worker when it becomes an actor: keep the latest name
            name = process_name(pid)
            if name != "?":
                self.names[pid] = name
        self.latest.update(seen)

    def by_name(self) -> dict[str, float]:
        """CPU seconds per kind of process, largest first."""
        totals: dict[str, float] = {}
        for pid, cpu in self.latest.items():
            name = self.names.get(pid, "?")
            totals[name] = totals.get(name, 0.0) + cpu - self.baseline.get(pid, 0.0)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def __enter__(self) -> TreeCpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._update()
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(cpu - self.baseline.get(pid, 0.0) for pid, cpu in self.latest.items())


@dataclass
class Side:
    name: str
    wall: float
    cpu: float
    started: float  # epoch seconds
    load: tuple[float, float]  # 1-minute load average before and after
    units: list[dict] = field(default_factory=list)  # per stage and unit: end time, seconds
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    threads: str = ""
    candidates: int = 0
    outputs: dict[str, tuple] = field(default_factory=dict)  # key -> (reject reason, image hash)


def unit_timeline(ctx, stage: str, started: float) -> list[dict]:
    """When each unit's file of `stage` was written (seconds after `started`) and its stage seconds."""
    from factory.framework.units import finished_units, read_unit

    rows = []
    for unit in sorted(finished_units(ctx.storage, ctx.config.run_id, stage)):
        path = Path(ctx.storage.url(ctx.unit_key(stage, unit)))
        frame = read_unit(ctx.storage, ctx.config.run_id, stage, unit)
        rows.append({"stage": stage, "unit": unit, "end": path.stat().st_mtime - started,
                     "seconds": float(frame[f"seconds_{stage}"].sum())})
    return rows


def final_outputs(ctx) -> dict[str, tuple]:
    import pandas as pd

    from factory.framework.units import finished_units, read_unit

    units = sorted(finished_units(ctx.storage, ctx.config.run_id, STEP_NAMES[-1]))
    run = ctx.config.run_id
    last = pd.concat([read_unit(ctx.storage, run, STEP_NAMES[-1], unit) for unit in units], ignore_index=True)
    drawn = pd.concat([read_unit(ctx.storage, run, "generate", unit, ["key", "target_image"]) for unit in units])
    images = dict(zip(drawn["key"], drawn["target_image"]))  # x~ is stored once, in generate's files
    digest = [hashlib.sha256(images[key]).hexdigest()[:16] if isinstance(images.get(key), bytes) else None
              for key in last["key"]]
    reasons = last["reject_reason"].where(last["reject_reason"].notna(), None)
    return dict(zip(last["key"], zip(reasons, digest)))


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# --- the two sides -------------------------------------------------------------------------


def loop_child(config_path: str) -> None:
    """Inside the fresh loop process: run the plain loop, print one JSON line."""
    started = time.perf_counter()
    import torch

    from factory.framework.executor import run_steps_inline
    from factory.framework.stage import RunContext
    from factory.run import UNIT_STEPS  # imports the stage modules (torch, diffusers, transformers, open_clip)

    steps = [step for step in UNIT_STEPS if step.name in STEP_NAMES]
    imported = time.perf_counter() - started
    config = validate_config(json.loads(Path(config_path).read_text()))
    summary = run_steps_inline(RunContext(config), steps)
    total = time.perf_counter() - started
    print(json.dumps({"threads": torch.get_num_threads(), "import_s": imported,
                      "construct_s": total - imported - summary["wall_seconds"], **summary}))


def run_loop(config: FactoryConfig, workdir: Path, threads: int) -> tuple[Side, dict]:
    from factory.framework.stage import RunContext

    config_path = workdir / f"{config.run_id}.json"
    config_path.write_text(json.dumps(config.snapshot()))
    env = {**os.environ, **thread_env(threads), "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    started, clock = time.time(), time.perf_counter()
    before = os.times()
    done = subprocess.run([sys.executable, str(SCRIPT), "--loop-child", str(config_path)], cwd=workdir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - clock
    after = os.times()
    if done.returncode:
        raise RuntimeError(f"loop process failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ctx = RunContext(config)
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    side = Side("loop", wall, cpu, started, (load_before, os.getloadavg()[0]), threads=str(summary["threads"]))
    side.units = [row for name in STEP_NAMES for row in unit_timeline(ctx, name, started)]
    side.outputs = final_outputs(ctx)
    return side, summary


def init_ray(threads: int) -> float:
    import logging

    import ray

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.update(thread_env(threads))  # inherited by the raylet and every worker it starts
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - started


def actor_threads(config: FactoryConfig) -> str:
    """torch's thread count inside an actor with each pool's num_cpus (how Ray sets OMP)."""
    import ray

    @ray.remote
    class ThreadProbe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    found = []
    for name in STEP_NAMES:
        probe = ThreadProbe.options(num_cpus=getattr(config, name).num_cpus).remote()
        found.append(f"{name} {ray.get(probe.threads.remote())}")
        ray.kill(probe)
    return ", ".join(found)


def run_pipeline(config: FactoryConfig) -> Side:
    from factory.framework.executor import run_steps
    from factory.framework.stage import RunContext
    from factory.run import UNIT_STEPS

    ctx = RunContext(config)
    load_before = os.getloadavg()[0]
    started, clock = time.time(), time.perf_counter()
    with TreeCpuMeter() as meter:
        summary = run_steps(ctx, [step for step in UNIT_STEPS if step.name in STEP_NAMES])
    wall = time.perf_counter() - clock
    side = Side("pipeline", wall, meter.seconds, started, (load_before, os.getloadavg()[0]))
    if summary["ran"] != summary["units"]:
        raise RuntimeError(f"pipeline ran {summary['ran']} of {summary['units']} units")
    side.cpu_by_process = meter.by_name()
    side.units = [row for name in STEP_NAMES for row in unit_timeline(ctx, name, started)]
    side.outputs = final_outputs(ctx)
    return side


# --- setup ---------------------------------------------------------------------------------


def prepare(workdir: Path) -> Path:
    """Build the demo's tiny models under workdir (once) and a fresh storage root with references."""
    from factory.demo import prepare_demo
    from factory.framework.stage import RunContext
    from stages import references

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the demo config names its models relative to the working directory
    store = workdir / "store"
    shutil.rmtree(store, ignore_errors=True)
    config = load_config(None, [f"storage.root={store}"])
    prepare_demo(config)
    references.run(RunContext(config))
    return store


def case_config(case: str, side: str, store: Path, stamp: str) -> FactoryConfig:
    _, overrides = CASES[case]
    return load_config(None, [f"storage.root={store}", f"run_id={case}-{side}-{stamp}", *UNIT_OVERRIDES, *overrides])


def plan(config: FactoryConfig) -> list[str]:
    from factory.framework.executor import read_plan
    from factory.framework.stage import RunContext
    from stages import plan as plan_stage

    ctx = RunContext(config)
    plan_stage.run(ctx)
    return list(read_plan(ctx)["key"])


# --- reporting -----------------------------------------------------------------------------


def stage_starts(side: Side) -> dict[str, float]:
    """Seconds from the side's start until each stage began its first unit."""
    starts = {}
    for name in STEP_NAMES:
        rows = [row for row in side.units if row["stage"] == name]
        if rows:
            first = min(rows, key=lambda row: row["end"])
            starts[name] = first["end"] - first["seconds"]
    return starts


def steady_seconds_per_unit(side: Side) -> float | None:
    ends = sorted(row["end"] for row in side.units if row["stage"] == STEP_NAMES[-1])
    return (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None


def generate_gaps(side: Side) -> float:
    """Mean idle seconds between consecutive generate units (the per-unit hand-off cost)."""
    rows = sorted((row for row in side.units if row["stage"] == "generate"), key=lambda row: row["end"])
    gaps = [b["end"] - b["seconds"] - a["end"] for a, b in zip(rows, rows[1:])]
    return sum(gaps) / len(gaps) if gaps else 0.0


def side_line(side: Side, units: int) -> str:
    stage_seconds = {name: sum(r["seconds"] for r in side.units if r["stage"] == name) for name in STEP_NAMES}
    starts = stage_starts(side)
    steady = steady_seconds_per_unit(side)
    return (
        f"  {side.name:<8} wall {side.wall:6.1f} s  {units / side.wall:6.3f} units/s  "
        f"{side.candidates / side.wall:6.3f} candidates/s  cpu {side.cpu:6.1f} s  "
        f"load {side.load[0]:.1f}->{side.load[1]:.1f}\n"
        f"           stage seconds " + ", ".join(f"{n} {s:.1f}" for n, s in stage_seconds.items())
        + "; first unit began: " + ", ".join(f"{n} {s:.1f} s" for n, s in starts.items())
        + (f"; steady {steady:.1f} s/unit" if steady else "")
        + (f"; idle between generate units {generate_gaps(side):.2f} s" if side.name == "pipeline" else "")
        + ("\n           cpu by process: "
           + ", ".join(f"{n} {c:.1f}" for n, c in side.cpu_by_process.items() if c >= 0.1)
           if side.cpu_by_process else "")
    )


def fixed_and_per_unit(side: Side, units: int) -> tuple[float, float] | None:
    steady = steady_seconds_per_unit(side)
    return None if steady is None else (side.wall - units * steady, steady)


def break_even(loop: Side, pipeline: Side, units: int, goal: float = 0.9) -> str:
    """Fixed cost per run and cost per unit on each side, and from how many units the pipeline reaches `goal`."""
    lf, pf = fixed_and_per_unit(loop, units) or (None, None), fixed_and_per_unit(pipeline, units) or (None, None)
    if lf[0] is None or pf[0] is None:
        return "  fixed cost: needs 2+ units"
    (loop_fixed, loop_unit), (pipe_fixed, pipe_unit) = lf, pf
    text = (f"  model: wall = fixed + units x per-unit: loop {loop_fixed:.1f} s + {loop_unit:.2f} s/unit, "
            f"pipeline {pipe_fixed:.1f} s + {pipe_unit:.2f} s/unit; ")
    if loop_unit <= goal * pipe_unit:
        return text + f"the pipeline stays below {goal}x at any length"
    needed = (goal * pipe_fixed - loop_fixed) / (loop_unit - goal * pipe_unit)
    return text + f"pipeline >= {goal}x loop from about {max(needed, 1):.0f} units of this size"


def timeline(side: Side) -> str:
    rows = sorted(side.units, key=lambda row: row["end"])
    return f"  {side.name} timeline (stage unit: began-ended s): " + ", ".join(
        f"{r['stage'][0]}{r['unit']}: {r['end'] - r['seconds']:.1f}-{r['end']:.1f}" for r in rows)


def compare_outputs(loop: Side, pipeline: Side) -> str:
    same_keys = loop.outputs.keys() == pipeline.outputs.keys()
    same = sum(loop.outputs[k] == pipeline.outputs.get(k) for k in loop.outputs)
    accepted = sum(reason is None for reason, _ in loop.outputs.values())
    return (f"same keys: {'yes' if same_keys else 'NO'}; identical (rejection, target image) on "
            f"{same}/{len(loop.outputs)} candidates; {accepted} accepted")


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"this {os.cpu_count()}-core CPU machine ({model}), no GPU, shared with other jobs"


def append_results(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def run_case(case: str, store: Path, workdir: Path, stamp: str, threads: int, loop_first: bool,
             show_timeline: bool) -> tuple[list[str], str]:
    """Both sides of one case on the same plan; returns the printed lines and the loop's threads."""
    loop_config = case_config(case, "loop", store, stamp)
    pipe_config = case_config(case, "pipeline", store, stamp)
    keys = plan(loop_config)
    if plan(pipe_config) != keys:
        raise RuntimeError(f"case {case}: the two plans differ")
    units = len(set(plan_units_of(loop_config)))
    if loop_first:
        loop, loop_summary = run_loop(loop_config, workdir, threads)
    pipeline = run_pipeline(pipe_config)
    if not loop_first:
        loop, loop_summary = run_loop(loop_config, workdir, threads)
    for side in (loop, pipeline):
        side.candidates = len(keys)
    steady_loop, steady_pipeline = steady_seconds_per_unit(loop), steady_seconds_per_unit(pipeline)
    lines = [
        f"case {case}: {CASES[case][0]}; {units} units, {len(keys)} candidates; "
        f"{'loop' if loop_first else 'pipeline'} ran first",
        side_line(loop, units),
        loop_breakdown(loop, loop_summary),
        side_line(pipeline, units),
        *([timeline(loop), timeline(pipeline)] if show_timeline else []),
        f"  outputs: {compare_outputs(loop, pipeline)}",
        f"  cpu seconds pipeline/loop: {pipeline.cpu / loop.cpu:.2f} ({pipeline.cpu - loop.cpu:+.1f} s)",
        *([f"  steady-state ratio pipeline/loop (last-stage unit spacing, start-up excluded): "
           f"{steady_loop / steady_pipeline:.2f}"] if steady_loop and steady_pipeline else []),
        break_even(loop, pipeline, units),
        f"  ratio pipeline/loop: {loop.wall / pipeline.wall:.2f}",
    ]
    return lines, loop.threads


def loop_breakdown(loop: Side, summary: dict) -> str:
    python_start = loop.wall - summary["import_s"] - summary["construct_s"] - summary["wall_seconds"]
    return (f"           loop process: python start {python_start:.1f} s, imports {summary['import_s']:.1f} s, "
            f"stage construction {summary['construct_s']:.1f} s, units {summary['wall_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.loop_child:
        loop_child(args.loop_child)
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {sorted(CASES)}")
    workdir = Path(args.workdir).resolve()
    stamp = time.strftime("%H%M%S")
    store = prepare(workdir)
    ray_start = init_ray(args.threads)
    threads = actor_threads(case_config(cases[0], "probe", store, stamp))
    notes = [
        f"threads: OMP_NUM_THREADS={args.threads} in the loop process and in every Ray actor; "
        f"torch.get_num_threads() in actors: {threads}; loop: {{loop}}. "
        f"Local Ray started beforehand in {ray_start:.1f} s (not counted).",
        "Loop timed from process start to exit; pipeline from the run_steps call to its return "
        "(actor start, imports and model loads counted on both sides).",
    ]
    print("\n".join(notes).replace("{loop}", "see below"), flush=True)
    body, loop_threads = [], "?"
    for index, case in enumerate(cases):
        # alternate which side goes first, so a load change on the machine hits both
        lines, loop_threads = run_case(case, store, workdir, stamp, args.threads, index % 2 == 0, args.timeline)
        print("\n".join(lines), flush=True)
        body += lines + [""]
    if not args.no_results:
        header = [f"## pipeline_vs_loop: {machine()}, {date.today().isoformat()}", ""]
        notes = [note.replace("{loop}", loop_threads) for note in notes]
        append_results(Path(args.results), header + notes + ["", "```", *body[:-1], "```", ""])
        print(f"appended to {args.results}")


def plan_units_of(config: FactoryConfig) -> list[int]:
    from factory.framework.stage import RunContext
    from factory.framework.units import plan_units

    return plan_units(RunContext(config).storage, config.run_id)


if __name__ == "__main__":
    main()
