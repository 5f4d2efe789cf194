"""`versions status` against the number of units: seconds per thousand units, halfway and finished,
and the memory its unit counters hold.

    python bench/status.py [--units 1000 4000] [--per-unit 64]

For each size, writes a run the way the unit pipeline does (a plan of `units x per-unit` jobs,
and generate, filter and dialogue unit files with their footers: rows without images, as the
executor writes them), then times `factory.status.run_status` from the storage root alone, with
no Ray started: once with the last half of the dialogue files missing (a run stopped halfway)
and once finished. Prints seconds per thousand units for each; the issue's goal is well under 1.
Then the bytes per unit file that the counters (`factory.status.run_counters`: what the live
progress keeps through a run, and publish sums) hold, against keeping each footer's JSON as dicts
(what they held before), with footers that carry the settings that shaped the unit as a real run's
do. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.framework import layout  # noqa: E402
from factory.framework.config import load_config  # noqa: E402
from factory.framework.storage import open_storage  # noqa: E402
from factory.framework.units import unit_meta, write_plan, write_unit  # noqa: E402
from factory.status import run_counters, run_status  # noqa: E402

STAGES = ("generate", "filter", "dialogue")


def write_run(root: Path, units: int, per_unit: int):
    config = load_config(None, [f"storage.root={root}", "run_id=bench"])
    storage = open_storage(config.storage)
    keys = [f"k{n:09d}" for n in range(units * per_unit)]
    plan = pd.DataFrame({"key": keys, "unit": np.arange(len(keys)) // per_unit})
    write_plan(storage, "bench", pa.Table.from_pandas(plan, preserve_index=False), per_unit)
    now = time.time()
    snapshot = config.snapshot()
    shaped_by = {section: snapshot[section] for section in ("plan", "generate", "filter", "dialogue")}
    for unit in range(units):
        rows = plan[plan["unit"] == unit].assign(reject_stage=None, reject_reason=None, clip_t=0.5, dino=0.7)
        for stage in STAGES:
            counters = {"rows": per_unit, "live_in": per_unit, "live_out": per_unit - 1, "seconds": 2.0,
                        "rejected:clip_t_below_threshold": 1}
            meta = {"stage": stage, "unit": unit, "shaped_by": shaped_by, "counters": counters, "describe": {},
                    "finished_at": now - (units - unit)}
            write_unit(storage, "bench", stage, unit, rows, meta)
    return storage, config


def timed_status(storage, config) -> tuple[float, dict]:
    started = time.perf_counter()
    status = run_status(storage, config, "bench")
    return time.perf_counter() - started, status


def measure(units: int, per_unit: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        storage, config = write_run(Path(folder), units, per_unit)
        finished_seconds, status = timed_status(storage, config)
        assert status["stages"]["dialogue"]["done"] == units
        for unit in range(units // 2, units):
            storage.delete(layout.unit_file("bench", "dialogue", unit))
        halfway_seconds, status = timed_status(storage, config)
        assert status["stages"]["dialogue"]["done"] == units // 2
        counters_bytes = held_bytes(lambda: run_counters(storage, "bench"))
        footers_bytes = held_bytes(lambda: [unit_meta(storage, "bench", stage, unit) for stage in STAGES
                                            for unit in range(units // (2 if stage == "dialogue" else 1))])
    files = 3 * units - units // 2
    return {"units": units, "halfway_s_per_1000": 1000 * halfway_seconds / units,
            "finished_s_per_1000": 1000 * finished_seconds / units,
            "counters_bytes_per_file": counters_bytes / files, "footers_bytes_per_file": footers_bytes / files}


def held_bytes(read) -> int:
    """Python-allocated bytes still held by what `read()` returns."""
    tracemalloc.start()
    try:
        kept = read()
        gc.collect()  # what pandas left in reference cycles is not held
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--per-unit", type=int, default=64)
    args = parser.parse_args()
    for units in args.units:
        result = measure(units, args.per_unit)
        print(f"{units:>7} units x 3 stages: halfway {result['halfway_s_per_1000']:.3f} s per 1000 units, "
              f"finished {result['finished_s_per_1000']:.3f} s per 1000 units; held per unit file: "
              f"{result['counters_bytes_per_file']:,.0f} B as counters, {result['footers_bytes_per_file']:,.0f} B "
              "as footer dicts", flush=True)


if __name__ == "__main__":
    main()
