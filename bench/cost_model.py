"""GPU-hours per 1M accepted quadruplets, from per-stage throughputs, next to the paper's figures.

    python bench/cost_model.py [--measured FILE] [--no-results]

Inputs, per GPU (A100 in the paper):
- generate: ProFusion's ~30 s test-time fine-tuning per reference, amortised over the jobs
  drawn per reference, plus the sampling seconds per image (or candidates/s directly);
- filter: candidates/s (CLIP ViT-B/32 + DINO ViT-S/16);
- dialogue: generated tokens/s of Llama-2-70B-chat on one tensor-parallel group of GPUs,
  tokens per accepted sample, attempts per sample;
- the filter's pass rate (accepted / generated).

Without --measured every input is the paper's figure, or a stated assumption where the paper
gives none (each row says which). --measured takes either a JSON of the input names below
(any subset; the rest stay the paper's) or a version manifest (`manifest.json`, schema
factory.manifest/1) from a factory run, whose funnel and per-stage GPU-seconds give the
per-candidate costs and the pass rate. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MILLION = 1_000_000

# The paper (CAFE, sections 3.3 and 4.1, Table 3)
PAPER_TRIAL_GPU_HOURS = 10_000  # ProFusion bootstrap, initial trial
PAPER_TRIAL_GENERATED = 3_000_000
PAPER_TRIAL_AUTO_PASSED = 207_000  # Table 3, D1: automatically filtered samples of those 10,000 hours
PAPER_TRIAL_HUMAN_PASSED = 93_000  # after ~1,500 worker-hours of human filtering
PAPER_HUMAN_HOURS = 1_500
PAPER_FINAL_GPU_HOURS = 20_000  # the ~1M-sample final dataset
PAPER_FINAL_SAMPLES = 1_000_000
PAPER_SID_GPU_HOURS = 1_500  # Table 3, D3: samples drawn by the model trained on D1, auto-filtered
PAPER_SID_ACCEPTED = 148_000
PAPER_FINETUNE_S = 30.0  # ProFusion's fine-tuning per reference image
PAPER_CAFE_SECONDS = (2.0, 5.0)  # tuning-free generation with G

TRIAL_SECONDS_PER_CANDIDATE = PAPER_TRIAL_GPU_HOURS * 3600 / PAPER_TRIAL_GENERATED  # 12 s


@dataclass
class Inputs:
    """Per-GPU throughputs and rates; `source` says where each number came from."""

    jobs_per_reference: float = 4  # plan.jobs_per_reference default
    generate_finetune_s: float = PAPER_FINETUNE_S
    generate_sample_s: float = TRIAL_SECONDS_PER_CANDIDATE - PAPER_FINETUNE_S / 4
    generate_candidates_per_s: float | None = None  # overrides the two above when set
    filter_candidates_per_s: float = 500.0
    dialogue_tokens_per_s: float = 2_000.0  # generated tokens/s of one tensor-parallel group
    dialogue_gpus: float = 4  # the group: Llama-2-70B on 4 GPUs
    dialogue_tokens_per_sample: float = 300.0
    dialogue_attempts: float = 1.1
    pass_rate: float = PAPER_TRIAL_AUTO_PASSED / PAPER_TRIAL_GENERATED
    sid_sample_s: float = sum(PAPER_CAFE_SECONDS) / 2
    sid_pass_rate: float | None = None  # default: implied by D3's 1,500 GPU-h -> 148K at sid_sample_s
    gpu: str = "A100"
    unit: str = "GPU-hours"
    source: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCES))

    def generate_seconds(self) -> float:
        if self.generate_candidates_per_s:
            return 1.0 / self.generate_candidates_per_s
        return self.generate_finetune_s / self.jobs_per_reference + self.generate_sample_s

    def sid_pass(self) -> float:
        if self.sid_pass_rate is not None:
            return self.sid_pass_rate
        return self.sid_sample_s / sid_seconds_per_accepted()


DEFAULT_SOURCES = {
    "jobs_per_reference": "config default (plan.jobs_per_reference)",
    "generate_finetune_s": "paper (~30 s per reference)",
    "generate_sample_s": "derived: paper's 10,000 h / 3M = 12 s per candidate, less 30 s / 4",
    "filter_candidates_per_s": "assumed (paper gives none)",
    "dialogue_tokens_per_s": "assumed: vLLM, Llama-2-70B, 4-way TP, large batches",
    "dialogue_gpus": "paper setup (70B on one 4-GPU group)",
    "dialogue_tokens_per_sample": "assumed (user + assistant JSON)",
    "dialogue_attempts": "assumed (re-draws of invalid answers)",
    "pass_rate": "paper: 207K auto-filtered of 3M generated",
    "sid_sample_s": "paper: G takes 2-5 s per image",
    "sid_pass_rate": "implied by paper's D3 (1,500 h -> 148K)",
}


def sid_seconds_per_accepted() -> float:
    return PAPER_SID_GPU_HOURS * 3600 / PAPER_SID_ACCEPTED


def from_manifest(manifest: dict, inputs: Inputs) -> Inputs:
    """Per-candidate costs and the pass rate from a factory version's funnel and cost."""
    funnel, cost = manifest["funnel"], manifest["cost"]
    generated = max(funnel["generated"], 1)
    passed = funnel["passed_dino"]
    gpu_seconds = {stage: cost.get(stage, {}).get("gpu_seconds", 0.0) for stage in ("generate", "filter", "dialogue")}
    kind = "gpu_seconds"
    if not any(gpu_seconds.values()):  # a CPU run: count actor-seconds, and say so
        gpu_seconds = {stage: cost.get(stage, {}).get("actor_seconds", 0.0) for stage in gpu_seconds}
        kind, inputs.unit = "actor_seconds", "actor-hours (CPU run, not GPU)"
    label = f"measured: {manifest.get('dataset')}/{manifest.get('version')} {kind}"
    inputs.generate_candidates_per_s = generated / max(gpu_seconds["generate"], 1e-9)
    inputs.filter_candidates_per_s = generated / max(gpu_seconds["filter"], 1e-9)
    # dialogue as tokens/s of one group: express the per-sample cost with tokens_per_sample fixed
    per_sample = gpu_seconds["dialogue"] / max(passed, 1)
    inputs.dialogue_gpus = 1
    inputs.dialogue_tokens_per_s = inputs.dialogue_tokens_per_sample * inputs.dialogue_attempts / max(per_sample, 1e-9)
    inputs.pass_rate = passed / generated
    for name in ("generate_candidates_per_s", "filter_candidates_per_s", "dialogue_tokens_per_s", "pass_rate"):
        inputs.source[name] = label
    inputs.source["dialogue_gpus"] = label
    gpus = manifest.get("config", {}).get("generate", {}).get("num_gpus", "?")
    inputs.gpu = f"as run ({gpus} GPU per generate actor)"
    return inputs


def load_inputs(path: str | None) -> Inputs:
    inputs = Inputs()
    if not path:
        return inputs
    data = json.loads(Path(path).read_text())
    if data.get("schema", "").startswith("factory.manifest/"):
        return from_manifest(data, inputs)
    known = set(Inputs.__dataclass_fields__) - {"source", "unit"}
    unknown = set(data) - known
    if unknown:
        raise SystemExit(f"unknown input(s) {sorted(unknown)} in {path}; known: {sorted(known)}")
    for name, value in data.items():
        setattr(inputs, name, value)
        inputs.source[name] = f"measured ({Path(path).name})"
    return inputs


def generate_source(inputs: Inputs) -> str:
    if inputs.generate_candidates_per_s:
        return inputs.source.get("generate_candidates_per_s", "measured")
    return inputs.source["generate_sample_s"]


def stage_rows(inputs: Inputs, generate_seconds: float, pass_rate: float) -> list[tuple[str, str, float, str]]:
    """(stage, throughput per GPU, GPU-hours per 1M accepted, source) for one pipeline."""
    candidates = MILLION / pass_rate
    dialogue_gpu_s = (inputs.dialogue_tokens_per_sample * inputs.dialogue_attempts
                      / inputs.dialogue_tokens_per_s * inputs.dialogue_gpus)
    return [
        ("generate", f"{1 / generate_seconds:.3f} candidates/s ({generate_seconds:.2f} s each)",
         candidates * generate_seconds / 3600, generate_source(inputs)),
        ("filter", f"{inputs.filter_candidates_per_s:.0f} candidates/s",
         candidates / inputs.filter_candidates_per_s / 3600, inputs.source["filter_candidates_per_s"]),
        ("dialogue", f"{inputs.dialogue_tokens_per_s:.0f} tokens/s per {inputs.dialogue_gpus:g} GPU(s)",
         MILLION * dialogue_gpu_s / 3600, inputs.source["dialogue_tokens_per_s"]),
    ]


def table(title: str, rows: list[tuple[str, str, float, str]], unit: str) -> list[str]:
    total = sum(row[2] for row in rows)
    lines = [title, f"  {'stage':<9} {'throughput per GPU':<44} {unit + ' per 1M':>16}  share  source"]
    for stage, rate, hours, source in rows:
        lines.append(f"  {stage:<9} {rate:<44} {hours:16,.0f}  {hours / total:5.1%}  {source}")
    lines.append(f"  {'total':<9} {'':<44} {total:16,.0f}")
    lines.append(f"  ratio to the paper's {PAPER_FINAL_GPU_HOURS:,} A100-hours for ~1M: "
                 f"{total / PAPER_FINAL_GPU_HOURS:.2f}")
    return lines


def report(inputs: Inputs) -> list[str]:
    generate_s = inputs.generate_seconds()
    bootstrap = stage_rows(inputs, generate_s, inputs.pass_rate)
    candidates = MILLION / inputs.pass_rate
    lines = [
        f"inputs: pass rate {inputs.pass_rate:.3f} ({inputs.source['pass_rate']}) -> "
        f"{candidates:,.0f} candidates per 1M accepted; GPU {inputs.gpu}",
    ]
    if not inputs.generate_candidates_per_s:
        lines.append(
            f"  generate per candidate: {inputs.generate_finetune_s:g} s fine-tune / "
            f"{inputs.jobs_per_reference:g} jobs per reference + {inputs.generate_sample_s:.2f} s sampling "
            f"= {generate_s:.2f} s")
    lines += table("bootstrap (ProFusion -> filter -> dialogue), per 1M accepted quadruplets:", bootstrap, inputs.unit)
    human = PAPER_TRIAL_HUMAN_PASSED / PAPER_TRIAL_AUTO_PASSED
    lines.append(
        f"  with the paper's human filtering too (keeps {human:.0%} of auto-passed): "
        f"{sum(r[2] for r in stage_rows(inputs, generate_s, inputs.pass_rate * human)):,.0f} {inputs.unit} "
        f"+ {PAPER_HUMAN_HOURS / PAPER_TRIAL_HUMAN_PASSED * MILLION:,.0f} worker-hours per 1M")
    if inputs.unit == "GPU-hours":
        lines += [""] + sid_report(inputs, generate_s)
    else:
        lines.append("(SID comparison skipped: a CPU run's actor-hours do not compare with the paper's GPU-hours)")
    return lines


def sid_report(inputs: Inputs, bootstrap_generate_s: float) -> list[str]:
    """What tuning-free generation with G changes."""
    sid_pass = inputs.sid_pass()
    sid = stage_rows(inputs, inputs.sid_sample_s, sid_pass)
    sid[0] = (sid[0][0], sid[0][1], sid[0][2], inputs.source["sid_sample_s"])
    lo, hi = PAPER_CAFE_SECONDS
    bootstrap_per_accepted = bootstrap_generate_s / inputs.pass_rate
    sid_per_accepted = sid_seconds_per_accepted()
    total_sid = sum(row[2] for row in sid)
    bootstrap_hours, bootstrap_samples = PAPER_TRIAL_GPU_HOURS, PAPER_TRIAL_AUTO_PASSED
    rest_hours = (PAPER_FINAL_SAMPLES - bootstrap_samples) * sid_per_accepted / 3600
    return [
        "what SID changes (G is tuning-free: no ~30 s fine-tuning per reference, 2-5 s per image):",
        f"  generate seconds per candidate: {bootstrap_generate_s:.2f} (ProFusion) -> {lo:g}-{hi:g} (G): "
        f"{bootstrap_generate_s / hi:.1f}-{bootstrap_generate_s / lo:.1f}x fewer",
        f"  generate seconds per accepted sample: {bootstrap_per_accepted:.0f} (bootstrap) -> "
        f"{sid_per_accepted:.1f} (paper's D3: {PAPER_SID_GPU_HOURS:,} h -> {PAPER_SID_ACCEPTED // 1000}K), "
        f"{bootstrap_per_accepted / sid_per_accepted:.1f}x fewer",
        *table(f"SID round (G at {inputs.sid_sample_s:g} s, pass rate {sid_pass:.3f}: "
               f"{inputs.source['sid_pass_rate']}), per 1M accepted:", sid, inputs.unit),
        f"  paper's mix, as modelled: {bootstrap_hours:,} h bootstrap -> {bootstrap_samples // 1000}K, the other "
        f"{(PAPER_FINAL_SAMPLES - bootstrap_samples) // 1000}K by SID at {sid_per_accepted:.1f} s -> "
        f"{rest_hours:,.0f} h; "
        f"total {bootstrap_hours + rest_hours:,.0f} h vs the paper's {PAPER_FINAL_GPU_HOURS:,} "
        f"(ratio {(bootstrap_hours + rest_hours) / PAPER_FINAL_GPU_HOURS:.2f})",
        f"  all 1M by bootstrap instead: "
        f"{sum(r[2] for r in stage_rows(inputs, bootstrap_generate_s, inputs.pass_rate)):,.0f} h; "
        f"all by SID (after a bootstrap to train G): {total_sid:,.0f} h",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", help="JSON of measured inputs, or a factory version manifest.json")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="markdown file to append to")
    parser.add_argument("--no-results", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lines = report(load_inputs(args.measured))
    print("\n".join(lines))
    if not args.no_results:
        where = f"--measured {Path(args.measured).name}" if args.measured else "the paper's figures (no GPU lent)"
        section = [f"## cost_model: {where}, computed {date.today().isoformat()} on this CPU machine", "",
                   "```", *lines, "```", ""]
        with Path(args.results).open("a") as handle:
            handle.write("\n".join(section) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
