"""The driver's memory against the number of units the unit pipeline streams (issue 26).

    python bench/driver_memory.py [--units 1563 15625 234375] [--before 1563 6250]

Runs the unit pipeline's Ray Data job shape with steps that do nothing: `run_map` over a table of
unit numbers through two actor-pool steps (as `run_steps` builds its chains), one fresh process per
case, on a local Ray with 2 CPUs. "now" is the executor as it is: at most `MAX_BLOCKS` blocks and
one call per block. "before" is the shape the executor had until 2026-12-06: one block per unit
and one call per unit (`MAX_BLOCKS` raised to the unit count, `batch_size=1`). A unit is 64
candidates, so 1,563 units are 100k candidates, 15,625 are 1M and 234,375 are 15M.

Prints the driver's private memory (`RssAnon`) after Ray starts and at the end, and the job's
wall time, and appends them to bench/RESULTS.md with the machine named (`--no-results`: print only).
Not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.publish_s3 import machine  # noqa: E402
from factory.framework import executor  # noqa: E402
from factory.framework.executor import MapStep, run_map  # noqa: E402


class NoWork:
    """A unit chain that does nothing: returns the counts a chain returns."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(**{f"seconds_{self.name}": 0.0, f"rows_{self.name}": 64})


def private_mib() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssAnon"].split()[0]) / 1024


def one_case(units: int, shape: str) -> str:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started_mib = private_mib()
    batch_size = None
    if shape == "before":
        executor.MAX_BLOCKS, batch_size = units, 1
    steps = [MapStep(NoWork, (name,), batch_size, 1, {"num_cpus": 0.5}) for name in ("generate", "dialogue")]
    started = time.perf_counter()
    results = pd.concat(list(run_map(pd.DataFrame({"unit": range(units)}), steps, blocks=units)))
    wall = time.perf_counter() - started
    assert len(results) == units
    return f"| {shape} | {units:,} | {started_mib:.0f} | {private_mib():.0f} | {wall:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="*", default=[1563, 15625, 234375])
    parser.add_argument("--before", type=int, nargs="*", default=[1563, 6250])
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # units, shape: one case, in this process
    args = parser.parse_args()
    if args.case:
        print(one_case(int(args.case[0]), args.case[1]), flush=True)
        return
    lines = ["| shape | units | driver MiB after Ray starts | driver MiB at the end | wall s |",
             "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    cases = [(units, "before") for units in args.before] + [(units, "now") for units in args.units]
    for units, shape in cases:
        done = subprocess.run([sys.executable, __file__, "--case", str(units), shape], capture_output=True,
                              text=True, check=True)
        lines.append(done.stdout.strip().splitlines()[-1])
        print(lines[-1], flush=True)
    if not args.no_results:
        with (REPO / "bench" / "RESULTS.md").open("a") as results:
            results.write(f"\n## driver_memory: {machine()}, {date.today()}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
