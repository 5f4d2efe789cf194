"""One device check: what a session lent a GPU runs first, in one call of the device tool.

    python bench/device_check.py [--cpu] [--out DIR] [--sections a,b,...] [--budget SECONDS]

Sections, each in its own process with its own time limit (a crash or a hang in one leaves the
others' results), in this order:

  environment        torch, the device, which packages import (the carried wheels, and Ray's absence)
  cuda_tests         pytest -m cuda (tests/models/test_cuda.py): half precision on the real device
  demo               the demo's references, plan, generate and filter (`run_steps_inline`: the
                     executor's loop, no Ray) and the generator's and the assistant's training
                     (`train_in_process`) on a version published from the filter's survivors, with
                     the generate and filter pools and training on the device (tiny models)
  real_size          bench/real_size.py at the paper's model sizes (production counts on CUDA)
  real_size_compile  the same with --compile (CUDA only)

Everything lands under --out (default $OUT, else bench/out/device-check): summary.json (each
section's status, seconds and findings), one log per section, cuda_tests.xml, real_size's
figures (cost_figures*.json) and RESULTS sections (RESULTS*.md) for bench/README.md's next steps.

--cpu (automatic without a GPU) runs the same sections on tiny models in a minute or two; the
test suite runs it so the check cannot rot. It also refuses imports of what the device image
lacks and nobody carries (ABSENT_ON_DEVICE), so a module-level `import ray` on the check's path
fails here before it fails there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from filters.precision import CPU_DTYPE_VARIABLE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTIONS = ("environment", "cuda_tests", "demo", "real_size", "real_size_compile")
CARRIED = ("diffusers", "open_clip", "webdataset", "pydantic", "ftfy", "braceexpand", "gguf")  # device_wheels.txt
PRESENT_ON_DEVICE = ("torch", "torchvision", "transformers", "accelerate", "timm", "safetensors", "pyarrow",
                     "pandas", "yaml", "PIL", "matplotlib", "pytest")
ABSENT_ON_DEVICE = ("ray", "boto3", "faiss", "vllm", "llguidance")  # not in the image, not carried
CUDA_TESTS = ("tests/models/test_cuda.py",)
REAL_SIZE_PARTS = ("filter", "profusion", "cafe", "ip_adapter", "train_g", "train_assistant")  # cheapest first
COMPILED_PARTS = ("profusion", "cafe", "ip_adapter")  # --compile compiles the UNets: the sampling parts
# seconds per section on a GPU (the whole check stays under 8 minutes on one H100); on a CPU, tiny models
GPU_LIMITS = {"environment": 30, "cuda_tests": 90, "demo": 90, "real_size": 150, "real_size_compile": 150}
CPU_LIMITS = {"environment": 60, "cuda_tests": 90, "demo": 240, "real_size": 240, "real_size_compile": 60}
DEMO_GPU_OVERRIDES = ["generate.num_gpus=1", "filter.num_gpus=1", "train.use_gpu=true"]
DEMO_OVERRIDES = [
    "storage.root=./factory-data",
    "dialogue.model=./factory-data/models/tiny-llama",  # SmolLM2 (98 MB) is not carried; dialogue does not run
    "train.max_steps=2",
    "train.checkpoint_every=2",
]


# --- the parent: one process per section --------------------------------------------------


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def section_commands(name: str, out: Path, cpu: bool) -> list[tuple[str, list[str]]]:
    """(label, command) of each process one section runs: its own processes, so a crash or a hang
    stays in one; real_size runs a process per part (its figures file keeps the other parts')."""
    python = sys.executable
    if name == "cuda_tests":
        return [(name, [python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--junitxml={out / 'cuda_tests.xml'}", *CUDA_TESTS])]
    if name.startswith("real_size"):
        parts = COMPILED_PARTS if name.endswith("compile") else REAL_SIZE_PARTS
        if cpu:  # tiny models: seconds of work, one process (a process per part would be mostly imports)
            return [("all parts", real_size_command(",".join(parts), False, out, cpu))]
        return [(part, real_size_command(part, name.endswith("compile"), out, cpu)) for part in parts]
    return [(name, [python, str(Path(__file__).resolve()), "--section", name, "--out", str(out),
                    *(["--cpu"] if cpu else [])])]


def real_size_command(part: str, compiled: bool, out: Path, cpu: bool) -> list[str]:
    suffix = "_compile" if compiled else ""
    return [sys.executable, str(REPO / "bench" / "real_size.py"), "--parts", part,
            *(["--tiny", "--threads", "1"] if cpu else []), *(["--compile"] if compiled else []),
            "--figures", str(out / f"cost_figures{suffix}.json"), "--results", str(out / f"RESULTS{suffix}.md")]


def section_env(cpu: bool, work: Path, cpu_dtype: str = "float32") -> dict[str, str]:
    """The environment a section runs in: the repository importable, offline, one thread on a
    shared CPU, and (in CPU mode) the device's missing packages refused (bench/absent)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    if cpu:
        paths.insert(0, str(REPO / "bench" / "absent"))
        env["DEVICE_CHECK_ABSENT"] = ",".join(ABSENT_ON_DEVICE)
        env["OMP_NUM_THREADS"] = "1"
        env[CPU_DTYPE_VARIABLE] = cpu_dtype  # bfloat16: the CUDA path's half precision, rehearsed on the CPU
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["DEVICE_CHECK_WORK"] = str(work)  # the demo's models and storage: not under out, which travels back
    return env


def run_section(name: str, out: Path, work: Path, cpu: bool, limit: float,
                cpu_dtype: str = "float32") -> dict[str, Any]:
    """Run one section's processes within `limit` seconds; their output goes to out/<name>.log."""
    if cpu and name == "real_size_compile":
        return {"status": "skipped", "why": "real_size compiles only on CUDA"}
    started, outcomes = time.perf_counter(), {}
    with (out / f"{name}.log").open("w") as log:
        for label, command in section_commands(name, out, cpu):
            left = limit - (time.perf_counter() - started)
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            env = section_env(cpu, work, cpu_dtype)
            outcomes[label] = run_process(command, env, log, left) if left > 5 else "skipped: out of time"
    failed = {label: outcome for label, outcome in outcomes.items() if outcome != "passed"}
    result = {"status": "passed" if not failed else "failed", "seconds": round(time.perf_counter() - started, 1),
              "runs": outcomes}
    findings = out / f"{name}.json"
    if findings.exists():
        result["findings"] = json.loads(findings.read_text())
    return result


def run_process(command: list[str], env: dict[str, str], log, limit: float) -> str:
    try:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return f"timed out after {limit:.0f} s"
    return "passed" if code == 0 else f"failed (exit {code})"


def run_all(out: Path, work: Path, cpu: bool, sections: list[str], budget: float,
            cpu_dtype: str = "float32") -> dict[str, Any]:
    limits = CPU_LIMITS if cpu else GPU_LIMITS
    mode = f"cpu (tiny models, {cpu_dtype})" if cpu else "cuda"
    summary: dict[str, Any] = {"mode": mode, "machine": platform.node(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    deadline = time.monotonic() + budget
    for name in sections:
        left = deadline - time.monotonic()
        if left < 10:
            summary["sections"][name] = {"status": "skipped", "why": "out of the check's time budget"}
            continue
        summary["sections"][name] = run_section(name, out, work, cpu, min(limits[name], left), cpu_dtype)
        print(f"[{name}] {summary['sections'][name]['status']} in {summary['sections'][name].get('seconds', 0)} s",
              flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))  # a killed check still leaves a summary
    return summary


# --- sections run inside their own process ------------------------------------------------


def environment(cpu: bool) -> dict[str, Any]:
    """What is importable, and the device."""
    import importlib

    import torch

    found: dict[str, str] = {}
    for name in (*PRESENT_ON_DEVICE, *CARRIED, *ABSENT_ON_DEVICE):
        try:
            module = importlib.import_module(name)
            found[name] = str(getattr(module, "__version__", "present"))
        except ImportError as err:
            found[name] = f"missing: {err}"
    device = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device |= {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                   "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
    missing = [name for name in (*PRESENT_ON_DEVICE, *CARRIED) if found[name].startswith("missing")]
    if missing:
        raise SystemExit(f"missing packages the check needs: {missing}; {json.dumps(found)}")
    return {"device": device, "packages": found}


def demo_config(cpu: bool):
    from factory.framework.config import load_config

    return load_config(None, DEMO_OVERRIDES + ([] if cpu else DEMO_GPU_OVERRIDES))


def demo(cpu: bool) -> dict[str, Any]:
    """references -> plan -> generate -> filter (one process, no Ray) -> publish the survivors -> train."""
    import torch

    import stages.filter
    import stages.generate
    import stages.plan
    import stages.references
    from factory.demo import prepare_demo
    from factory.framework.executor import Step, run_steps_inline
    from factory.framework.stage import RunContext

    work = Path(os.environ.get("DEVICE_CHECK_WORK") or tempfile.mkdtemp(prefix="device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the demo's model paths are relative (./factory-data/models)
    config = demo_config(cpu)
    steps = [Step("generate", stages.generate.Generate), Step("filter", stages.filter.Filter)]
    ctx = RunContext(config, unit_steps=tuple(steps))
    findings: dict[str, Any] = {"seconds": {}}
    for label, work_step in (("models", lambda: prepare_demo(config)),
                             ("references", lambda: stages.references.run(ctx)),
                             ("plan", lambda: stages.plan.run(ctx)),
                             ("generate+filter", lambda: run_steps_inline(ctx, steps))):
        findings["seconds"][label], findings[label] = timed_call(work_step)
    findings["filter"] = filter_outcome(ctx)
    findings["seconds"]["train"], findings["train"] = timed_call(lambda: train_on_survivors(ctx, cpu))
    if torch.cuda.is_available():
        findings["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return findings


def timed_call(work) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return round(time.perf_counter() - started, 2), json.loads(json.dumps(result, default=str)) if result else None


def candidate_rows(ctx):
    """Every filtered candidate of the run, scores and reasons (no images)."""
    import pandas as pd

    from factory.framework.units import plan_units, read_unit

    units = plan_units(ctx.storage, ctx.config.run_id)
    return pd.concat([read_unit(ctx.storage, ctx.config.run_id, "filter", unit) for unit in units], ignore_index=True)


def filter_outcome(ctx) -> dict[str, Any]:
    import numpy as np

    rows = candidate_rows(ctx)
    passed = rows["reject_stage"].isna()
    scores = {name: [float(v) for v in rows[name] if v is not None and np.isfinite(v)] for name in ("clip_t", "dino")}
    if any(len(values) != len(rows) for values in scores.values()):
        raise AssertionError(f"filter scores missing or not finite: {scores}")
    return {"candidates": len(rows), "passed": int(passed.sum()),
            "rejected": rows.loc[~passed, "reject_reason"].value_counts().to_dict(),
            "score_range": {name: [min(values), max(values)] for name, values in scores.items()}}


def survivor_samples(ctx) -> list:
    """Samples of the filter's survivors (every candidate when fewer than 2 pass: training still runs).
    y and y~ are written from the instruction: the dialogue stage's chat model is not carried."""
    from factory.dataset.shards import Sample
    from factory.framework.units import ImageJoin

    rows = candidate_rows(ctx)
    passed = rows["reject_stage"].isna()
    chosen = rows[passed] if passed.sum() >= 2 else rows
    chosen = ImageJoin(ctx.storage, ctx.config.run_id).add(chosen.copy(), ("input_image", "target_image"))
    return [Sample(row.key, row.input_image, row.target_image, f"Can you show {row.instruction}?",
                   f"Here is {row.instruction}.", {"key": row.key, "subject": row.subject,
                                                   "scores": {"clip_t": row.clip_t, "dino": row.dino}})
            for row in chosen.itertuples()]


def train_on_survivors(ctx, cpu: bool) -> dict[str, Any]:
    from factory.dataset.manifest import VersionSpec
    from factory.dataset.publisher import publish_samples
    from models.training.job import make_job
    from models.training.runner import train_in_process

    samples = survivor_samples(ctx)
    publish_samples(ctx.storage, VersionSpec(ctx.config.dataset, "device-check", "bootstrap"), samples,
                    shard_max_samples=8)
    device = "cpu" if cpu else "cuda"
    trained = {"samples": len(samples)}
    for model in ("generator", "assistant"):
        result = train_in_process(make_job(ctx.config, "device-check", model, f"device-check-{model}"),
                                  ctx.storage, device)
        trained[model] = {key: result.get(key) for key in ("step", "loss", "checkpoint")}
    return trained


def run_inside(name: str, out: Path, cpu: bool) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cpu:
        import torch

        torch.set_num_threads(1)
    findings = {"environment": environment, "demo": demo}[name](cpu)
    (out / f"{name}.json").write_text(json.dumps(findings, indent=2, default=str))
    print(json.dumps(findings, indent=2, default=str))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (automatic without a GPU)")
    parser.add_argument("--out", help="where figures, logs and summary.json go (default $OUT)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--cpu-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="CPU mode: run the models in bfloat16 where CUDA runs half precision")
    parser.add_argument("--work", help="scratch folder for the demo's models and storage (default: a new temp dir)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole check (default 420: 7 minutes on the GPU)")
    parser.add_argument("--section", choices=("environment", "demo"), help=argparse.SUPPRESS)  # a child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "out" / "device-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu or not has_gpu()
    if args.section:
        return run_inside(args.section, out, cpu)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="device-check-")).resolve()
    summary = run_all(out, work, cpu, sections, args.budget, args.cpu_dtype)
    failed = [name for name, result in summary["sections"].items() if result["status"] not in ("passed", "skipped")]
    print(f"device check ({summary['mode']}): {len(failed)} section(s) not passed {failed}; {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
