"""Scale: does the data flow hold at 100x the data? Memory, overhead and publish at 1k/10k/100k.

    python bench/scale.py [--sizes 1000 10000 100000] [--unit-size 64] [--alive-every 14]
    python bench/scale.py --plan-only [--sizes 100000 1000000]      the plan stage alone, per size
    python bench/scale.py --sid-jobs 1500000                          a SID round's planning alone

`--plan-only` and `--sid-jobs` run each case in a fresh process (no Ray: planning runs in the
driver) and report that process's peak RSS over the planning alone (`/proc/self/clear_refs`
resets it once the inputs are written), the planning's wall time and its time per job. The SID
case plans one round over the demo's instruction bank (the shipped bank) with a tiny CLIP and a
pool of 1,000 images; the parent version's index (categories, and which pool images were drawn
from which reference, for the exclusions) is given in memory instead of a published version.

The stages here cost nothing: `FreeGenerate`, `FreeFilter` and `FreeDialogue` are stages on
the real base (`factory.framework.stage.Stage`), for this benchmark only, that run no model. FreeGenerate
"draws" a pre-encoded 512-px photo-like JPEG (about the bytes of a real candidate), FreeFilter
keeps one candidate in `--alive-every` by a hash of its key, FreeDialogue writes fixed texts.
Everything else is the factory's: a reference set of 512-px JPEGs, the plan stage, the unit
pipeline on local Ray (`factory.framework.executor.run_steps`: actor pools, image joins, unit files), then
`factory.dataset.publisher.write_version` from the run (local disk) to a moto S3 server on 127.0.0.1
in its own process.

Printed per size: peak private RSS (`RssAnon`: Ray's shared object store pages are not the
process's own) of the largest process (the driver and every Ray process it started; the S3
server is not ours and not counted) and of the driver (with, in brackets, what the driver held
before the pipeline started: the benchmark writes the references and draws the plan in this
process first, and what an allocator keeps from them counts in the peak), wall seconds per candidate,
orchestration overhead per unit and per candidate (pipeline wall minus the stages' own time,
spread over the actors), and publish throughput against a bare boto3 `upload_file` of the same
shard bytes. Goals (issue 13): largest-process peak at 100k <= 1.3x that at 1k; overhead
<= 5 ms per candidate at 100k; publish >= 0.8x the bare upload. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.publish_s3 import BUCKET, FAKE_KEYS, MotoProcess, machine, s3_client  # noqa: E402
from bench.synthetic import photo_like_jpeg  # noqa: E402
from factory.framework.stage import Stage  # noqa: E402
from stages.dialogue import Dialogue  # noqa: E402
from stages.filter import Filter  # noqa: E402
from stages.generate import Generate  # noqa: E402


def image_px() -> int:
    """The side of every drawn and reference image (`--image-px`, passed to Ray workers by environment)."""
    return int(os.environ.get("SCALE_IMAGE_PX", "512"))


# --- stages that cost nothing (benchmark only) -----------------------------------------------


class FreeGenerate(Stage):
    """Benchmark-only: "draws" a stored JPEG (`image_px()` a side) per job; no model runs."""

    name = "generate"
    adds = Generate.adds
    source = "plan"
    needs_images = ("input_image",)
    draws_images = ("target_image",)
    shaped_by = ("plan",)

    def setup(self) -> None:
        self.jpegs = [photo_like_jpeg(seed, image_px()) for seed in range(8)]

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows["target_image"] = [self.jpegs[int(seed) % len(self.jpegs)] for seed in rows["seed"]]
        rows["input_bytes"] = rows["input_image"].map(len)
        rows["target_bytes"] = rows["target_image"].map(len)
        rows["generator_info"] = json.dumps({"name": "free", "kind": "free", "checkpoint": None, "steps": 0})
        rows["gpu_seconds"] = 0.0
        rows["reject"] = None
        return rows


class FreeFilter(Stage):
    """Benchmark-only: keeps one candidate in ALIVE_EVERY by a hash of its key; joins both
    images like the real filter, decodes none."""

    name = "filter"
    adds = Filter.adds
    source = "generate"
    needs_images = ("target_image", "input_image")
    shaped_by = ("plan",)
    alive_every = int(os.environ.get("SCALE_ALIVE_EVERY", "14"))

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        draws = [int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % self.alive_every for key in rows["key"]]
        keep = [draw == 0 for draw in draws]
        rows["clip_t"] = [0.35 if kept else 0.1 for kept in keep]
        rows["dino"] = 0.7
        rows["pass_clip_t"], rows["pass_dino"] = keep, True
        rows["reject"] = [None if kept else "clip_t_below_threshold" for kept in keep]
        self.count("passed_clip", sum(keep))
        self.count("passed_dino", sum(keep))
        return rows


class FreeDialogue(Stage):
    """Benchmark-only: fixed user and assistant texts."""

    name = "dialogue"
    adds = Dialogue.adds
    keeps_images = Dialogue.keeps_images
    unit_facts = Dialogue.unit_facts
    source = "filter"
    shaped_by = ("plan",)

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows["user"] = [f"Show my {subject} somewhere new, please." for subject in rows["subject"]]
        rows["assistant"] = "Here it is: the same subject, in the place you asked for, lit the way it would be there."
        rows["style"], rows["dialogue_attempts"], rows["reject"] = "command", 1, None
        return rows


# --- measuring ---------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, private RSS, total RSS, command) for every process, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            status = Path(f"/proc/{entry}/status").read_text()
            # private memory: RSS less the shared pages (Ray's object store is mapped into its workers)
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                      if line.startswith(("RssAnon:", "VmRSS:"))}
            rss, total = fields["RssAnon"], fields["VmRSS"]
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError, KeyError):
            continue
        table[int(entry)] = (parent, rss, total, command[:60])
    return table


class PeakRss:
    """Polls the RSS of this process and of every process it started (Ray's), except `skip`."""

    def __init__(self, skip: set[int], every_s: float = 0.2):
        self.skip, self.every_s = skip, every_s
        self.driver = 0
        self.largest = 0
        self.largest_total = 0
        self.largest_name = ""
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.driver_before = process_table()[os.getpid()][1]  # what the driver held before (set-up included)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            table = process_table()
            ours, frontier = {me}, [me]
            while frontier:
                parent = frontier.pop()
                children = [pid for pid, (ppid, *_) in table.items() if ppid == parent and pid not in ours]
                ours.update(children)
                frontier.extend(children)
            for pid in ours - self.skip:
                if pid not in table:
                    continue
                _, rss, total, command = table[pid]
                self.largest_total = max(self.largest_total, total)
                if pid == me:
                    self.driver = max(self.driver, rss)
                if rss > self.largest:
                    self.largest, self.largest_name = rss, command
            self._stop.wait(self.every_s)


def mib(value: float) -> float:
    return value / 2**20


# --- one size ----------------------------------------------------------------------------------


def config_for(root: Path, size: int, unit_size: int):
    from factory.framework.config import load_config

    return load_config(None, [
        f"storage.root={root}", f"run_id=scale{size}", f"plan.total_jobs={size}", f"plan.unit_size={unit_size}",
        "references.set=scale", "publish.shard_max_bytes=67108864", "publish.shard_max_samples=10000",
        *[f"{stage}.{key}" for stage in ("generate", "filter", "dialogue")
          for key in ("concurrency=2", "num_cpus=1", "num_gpus=0")],
    ])


SUBJECTS = {"object": ["dog", "cat", "teapot", "backpack", "vase", "clock", "sneaker", "robot", "car", "chair",
                       "bowl", "candle", "guitar", "lamp", "bicycle", "duck toy", "cup", "boot", "bear plushie",
                       "sunglasses"],
            "human": ["person", "man", "woman", "child", "old man", "old woman", "girl", "boy"]}


def write_references(storage, count: int, images: list[bytes] | None = None, part_size: int = 256,
                     set_name: str = "scale") -> None:
    """`count` references (all dogs, or, with `images`, subjects of both domains and those bytes)."""
    from factory.dataset.reference_sets import write_parts
    from factory.framework import layout

    pictures = images or [photo_like_jpeg(10_000 + n, image_px()) for n in range(64)]
    subjects = [("object", "dog")] if images is None else [(domain, subject) for domain, names in SUBJECTS.items()
                                                           for subject in names]
    side = image_px() if images is None else 32
    rows = ({"reference_id": f"ref{n:07d}", "image": pictures[n % len(pictures)], "width": side, "height": side,
             "subject": subjects[n % len(subjects)][1], "domain": subjects[n % len(subjects)][0], "source": "bench",
             "origin": f"bench/{n}", "prompt": None, "seed": n} for n in range(count))
    write_parts(storage, set_name, rows, part_size)
    storage.write_bytes(layout.reference_complete(set_name), b"{}")


def prepare_run(root: Path, size: int, unit_size: int) -> None:
    """The references and the plan of one size, in a process of their own: the driver's peak is then
    the pipeline's and publish's, not what writing them left in its allocator."""
    from factory.framework.stage import RunContext
    from stages import plan

    ctx = RunContext(config_for(root, size, unit_size))
    write_references(ctx.storage, max(8, size // 12))
    plan.run(ctx)


def run_size(size: int, unit_size: int, endpoint: str, moto_pid: int, scratch: Path) -> dict:
    from factory.dataset.manifest import VersionSpec
    from factory.dataset.publisher import RayPasses, RunSamples, write_version
    from factory.framework.config import StorageConfig
    from factory.framework.executor import Step, run_steps
    from factory.framework.stage import RunContext
    from factory.framework.storage import S3Storage
    from factory.framework.units import finished_units, unit_meta

    root = scratch / f"root{size}"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as setup:
        setup.submit(prepare_run, root, size, unit_size).result()
    ctx = RunContext(config_for(root, size, unit_size))
    steps = [Step("generate", FreeGenerate), Step("filter", FreeFilter), Step("dialogue", FreeDialogue)]
    with PeakRss({moto_pid}) as pipeline_rss:
        started = time.perf_counter()
        summary = run_steps(ctx, steps)
        pipeline_wall = time.perf_counter() - started
    units = sorted(finished_units(ctx.storage, ctx.config.run_id, "dialogue"))
    stage_seconds = sum(unit_meta(ctx.storage, ctx.config.run_id, stage, unit)["counters"]["seconds"]
                        for stage in ("generate", "filter", "dialogue") for unit in units)
    actors = ctx.config.generate.concurrency
    overhead = max(pipeline_wall - stage_seconds / actors, 0.0)

    s3_root = f"s3://{BUCKET}/scale{size}"
    s3_config = StorageConfig(root=s3_root, endpoint_url=endpoint)
    spec = VersionSpec(dataset="scale", version=f"v{size}", kind="bootstrap", funnel={"written": 0})
    source = RunSamples(ctx.config.storage, ctx.config.run_id, "scale", spec.version)
    with PeakRss({moto_pid}) as publish_rss:
        started = time.perf_counter()
        manifest = write_version(S3Storage(s3_root, s3_config), spec, source, ctx.config.publish.shard_max_bytes,
                                 ctx.config.publish.shard_max_samples, RayPasses(s3_config))
        publish_wall = time.perf_counter() - started
    boto3_seconds = bare_upload(endpoint, s3_root, manifest, scratch / f"shards{size}")
    return {
        "size": size, "units": summary["units"], "samples": manifest["samples"],
        "shard_mib": mib(sum(shard["bytes"] for shard in manifest["shards"])),
        "largest_mib": mib(max(pipeline_rss.largest, publish_rss.largest)),
        "largest_total_mib": mib(max(pipeline_rss.largest_total, publish_rss.largest_total)),
        "largest_name": (pipeline_rss if pipeline_rss.largest >= publish_rss.largest else publish_rss).largest_name,
        "driver_mib": mib(max(pipeline_rss.driver, publish_rss.driver)),
        "driver_before_mib": mib(pipeline_rss.driver_before),
        "driver_pipeline_mib": mib(pipeline_rss.driver), "driver_publish_mib": mib(publish_rss.driver),
        "pipeline_s": pipeline_wall, "wall_ms_per_candidate": 1000 * pipeline_wall / size,
        "overhead_ms_per_unit": 1000 * overhead / max(len(units), 1),
        "overhead_ms_per_candidate": 1000 * overhead / size,
        "publish_s": publish_wall, "boto3_s": boto3_seconds, "publish_vs_boto3": boto3_seconds / publish_wall,
    }


def bare_upload(endpoint: str, s3_root: str, manifest: dict, folder: Path) -> float:
    """Seconds for boto3 `upload_file` of the very same shard bytes (fetched back first)."""
    client = s3_client(endpoint)
    prefix = s3_root.split(f"s3://{BUCKET}/", 1)[1]
    folder.mkdir(parents=True)
    paths = []
    for shard in manifest["shards"]:
        path = folder / Path(shard["path"]).name
        client.download_file(BUCKET, f"{prefix}/datasets/scale/{manifest['version']}/{shard['path']}", str(path))
        paths.append(path)
    started = time.perf_counter()
    for path in paths:
        client.upload_file(str(path), BUCKET, f"bare/{prefix}/{path.name}")
    return time.perf_counter() - started


# --- planning alone (one fresh process per case, no Ray) ---------------------------------------


def planning_peak_reset() -> None:
    """From here on VmHWM is this process's peak RSS (Linux: 5 to clear_refs resets it)."""
    Path("/proc/self/clear_refs").write_text("5")


def own_memory() -> dict[str, float]:
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in
              Path("/proc/self/status").read_text().splitlines() if line.startswith(("VmHWM:", "VmRSS:"))}
    return {"peak_mib": mib(fields["VmHWM"]), "rss_mib": mib(fields["VmRSS"])}


def plan_case(size: int, unit_size: int, scratch: Path) -> dict:
    """The plan stage for `size` candidates (plan.total_jobs, 12 per reference) in this process."""
    from factory.framework.stage import RunContext
    from factory.framework.units import plan_index
    from stages import plan

    ctx = RunContext(config_for(scratch / f"plan{size}", size, unit_size))
    write_references(ctx.storage, max(8, size // 12), images=[photo_like_jpeg(1, 32)], part_size=4096)
    before = own_memory()["rss_mib"]
    planning_peak_reset()
    started = time.perf_counter()
    written = plan.run(ctx)
    seconds = time.perf_counter() - started
    index = plan_index(ctx.storage, ctx.config.run_id)
    return {"case": "plan", "size": size, **written,
            "partitions": index.meta["partitions"], "plan_s": seconds,
            "us_per_job": 1e6 * seconds / written["jobs"], "before_mib": before, **own_memory(),
            "load": os.getloadavg()[0]}


def sid_case(jobs: int, unit_size: int, scratch: Path, jobs_per_reference: int = 6) -> dict:
    """One SID round's planning (`stages.sid.plan_round`) of about `jobs` jobs in this process."""
    import numpy as np
    import pyarrow as pa

    import stages.sid as sid
    from factory.dataset.planning import instruction_table
    from factory.dataset.pool import build_pool
    from factory.framework import layout
    from factory.framework.config import load_config
    from factory.framework.stage import RunContext
    from factory.framework.units import plan_index
    from factory.tiny.clip import build_tiny_clip

    clip = build_tiny_clip(scratch / "clip")
    config = load_config(None, [
        f"storage.root={scratch / 'sid'}", "run_id=sidplan", "references.set=scale", "sid.pool=benchpool",
        "sid.parent=parent", f"sid.jobs_per_reference={jobs_per_reference}", f"sid.unit_size={unit_size}",
        f"filter.clip_model={clip.model_name}", f"filter.clip_pretrained={clip.pretrained}",
        f"filter.clip_model_config={clip.model_config}"])
    ctx = RunContext(config)
    references = jobs // jobs_per_reference
    write_references(ctx.storage, references, images=[photo_like_jpeg(1, 32)], part_size=4096)
    pool = {f"key{n:05d}": photo_like_jpeg(n, 32) for n in range(1000)}
    build_pool(ctx.storage, "benchpool", list(pool.items()), sid.clip_scorer(config))
    rng = np.random.default_rng(0)
    categories = instruction_table(None)["category"].to_numpy()
    parent = pa.table({"key": [f"key{n:05d}" for n in range(148_000)],  # the first 1000 are the pool's ids
                       "category": rng.choice(categories, size=148_000),
                       "reference_id": [f"ref{int(n):07d}" for n in rng.integers(0, references, size=148_000)]})
    ctx.storage.write_parquet(layout.index(config.dataset, "parent"), parent)
    ctx.storage.write_bytes(layout.manifest(config.dataset, "parent"), b"{}")
    before = own_memory()["rss_mib"]
    planning_peak_reset()
    started = time.perf_counter()
    written = sid.plan_round(ctx, "parent", 1, "bench/g")
    seconds = time.perf_counter() - started
    index = plan_index(ctx.storage, ctx.config.run_id)
    return {"case": "sid", "size": jobs, **written, "partitions": index.meta["partitions"], "plan_s": seconds,
            "us_per_job": 1e6 * seconds / written["jobs"], "before_mib": before, **own_memory(),
            "load": os.getloadavg()[0]}


def planning_in_fresh_process(case: str, size: int, unit_size: int) -> dict:
    """Run one planning case in a new Python process (its own peak RSS) and return its result."""
    import subprocess

    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, __file__, f"--{case}-case", str(size), "--unit-size", str(unit_size),
                               "--scratch", scratch],
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def planning_table(results: list[dict]) -> list[str]:
    lines = ["| case | jobs | units | partitions | planning s | us per job | driver peak MiB (before planning) | "
             "load average |", "|" + "---|" * 8]
    for r in results:
        lines.append(f"| {r['case']} {r['size']:,} | {r['jobs']:,} | {r['units']:,} | {r['partitions']} | "
                     f"{r['plan_s']:.1f} | {r['us_per_job']:.1f} | {r['peak_mib']:.0f} ({r['before_mib']:.0f}) | "
                     f"{r['load']:.1f} |")
    return lines


# --- report ---------------------------------------------------------------------------------------


def table(results: list[dict]) -> list[str]:
    lines = ["| candidates | units | samples | shard MiB | largest process peak, private (total RSS) MiB | "
             "driver peak MiB (before the pipeline / pipeline / publish) | wall ms/candidate | overhead ms/unit | "
             "overhead ms/candidate | "
             "publish s | bare boto3 s | publish vs boto3 |", "|" + "---|" * 12]
    for r in results:
        lines.append(f"| {r['size']:,} | {r['units']} | {r['samples']} | {r['shard_mib']:.0f} | "
                     f"{r['largest_mib']:.0f} ({r['largest_total_mib']:.0f}) "
                     f"| {r['driver_mib']:.0f} ({r['driver_before_mib']:.0f} / {r['driver_pipeline_mib']:.0f} / "
                     f"{r['driver_publish_mib']:.0f}) | {r['wall_ms_per_candidate']:.2f} | "
                     f"{r['overhead_ms_per_unit']:.1f} | "
                     f"{r['overhead_ms_per_candidate']:.2f} | {r['publish_s']:.1f} | {r['boto3_s']:.1f} | "
                     f"{r['publish_vs_boto3']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--unit-size", type=int, default=64)
    parser.add_argument("--alive-every", type=int, default=14)
    parser.add_argument("--image-px", type=int, default=512,
                        help="side of the drawn and reference JPEGs (small: a 1M run fits this machine's disk)")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--plan-only", action="store_true", help="the plan stage alone at each size")
    parser.add_argument("--sid-jobs", type=int, help="a SID round's planning alone, of about this many jobs")
    parser.add_argument("--plan-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sid-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_case or args.sid_case:
        scratch = Path(args.scratch)
        result = (plan_case(args.plan_case, args.unit_size, scratch) if args.plan_case
                  else sid_case(args.sid_case, args.unit_size, scratch))
        print(json.dumps(result), flush=True)
        return
    if args.plan_only or args.sid_jobs:
        planning_main(args)
        return
    os.environ.update(FAKE_KEYS)
    os.environ["SCALE_IMAGE_PX"] = str(args.image_px)
    os.environ["SCALE_ALIVE_EVERY"] = str(args.alive_every)
    import ray

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "SCALE_ALIVE_EVERY": str(args.alive_every),
                                       "SCALE_IMAGE_PX": str(args.image_px)}})
    results = []
    with MotoProcess() as moto, tempfile.TemporaryDirectory() as scratch:
        s3_client(moto.endpoint).create_bucket(Bucket=BUCKET)
        for size in args.sizes:
            result = run_size(size, args.unit_size, moto.endpoint, moto.process.pid, Path(scratch))
            print(json.dumps(result), flush=True)
            results.append(result)
    ray.shutdown()
    lines = table(results)
    first, last = results[0], results[-1]
    lines.append("")
    ratio = last["largest_mib"] / first["largest_mib"]
    lines.append(f"largest-process peak at {last['size']:,} / at {first['size']:,}: {ratio:.2f}x (goal <= 1.3x); "
                 f"largest was `{last['largest_name'].strip()}`")
    print("\n".join(lines))
    if not args.no_results:
        with open(args.results, "a", encoding="utf-8") as out:
            out.write(f"\n## Scale: the data flow at {', '.join(f'{s:,}' for s in args.sizes)} candidates "
                      f"(bench/scale.py, {date.today()})\n\nMachine: {machine()}; units of {args.unit_size}, one "
                      f"candidate in {args.alive_every} accepted, {args.image_px}-px JPEGs, stages that cost "
                      "nothing.\n\n")
            out.write("\n".join(lines) + "\n")


def planning_main(args: argparse.Namespace) -> None:
    results = []
    cases = [("plan", size) for size in args.sizes] if args.plan_only else []
    cases += [("sid", args.sid_jobs)] if args.sid_jobs else []
    for case, size in cases:
        results.append(planning_in_fresh_process(case, size, args.unit_size))
        print(json.dumps(results[-1]), flush=True)
    lines = planning_table(results)
    plans = [r for r in results if r["case"].startswith("plan")]
    if len(plans) > 1:
        lines += ["", f"driver peak at {plans[-1]['size']:,} / at {plans[0]['size']:,}: "
                      f"{plans[-1]['peak_mib'] / plans[0]['peak_mib']:.2f}x (goal <= 1.1x)"]
    print("\n".join(lines))
    if not args.no_results:
        with open(args.results, "a", encoding="utf-8") as out:
            out.write(f"\n## Planning alone (bench/scale.py --plan-only / --sid-jobs, {date.today()})\n\n"
                      f"Machine: {machine()}; units of {args.unit_size}; one fresh process per case, no Ray.\n\n")
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
