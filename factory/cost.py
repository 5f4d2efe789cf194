"""What a candidate costs, per GPU: the figures and the per-1M-accepted report.

Every figure says where it came from, and its source starts with one word:
- `paper`: the CAFE paper (sections 3.3 and 4.1, Table 3), on A100s;
- `measured`: timed on this code, either by `bench/real_size.py` for one device kind
  (`factory/cost_figures.json`) or by a factory run (a version manifest's funnel and cost);
- `derived`: computed from the figures above (named in the source);
- `assumed`: neither gives one;
- `config`: a setting of the run's config.

`factory.estimate` turns these figures and a config into a plan's GPU-hours (the dry run);
`bench/cost_model.py` prints `report(inputs)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
PAPER_GPU = "A100"

TRIAL_SECONDS_PER_CANDIDATE = PAPER_TRIAL_GPU_HOURS * 3600 / PAPER_TRIAL_GENERATED  # 12 s

FIGURES_FILE = Path(__file__).with_name("cost_figures.json")
FIGURES_SCHEMA = "factory.cost_figures/1"
SOURCE_KINDS = ("measured", "paper", "derived", "assumed", "config")


def sid_seconds_per_accepted() -> float:
    return PAPER_SID_GPU_HOURS * 3600 / PAPER_SID_ACCEPTED


@dataclass
class Inputs:
    """Per-GPU seconds and rates; `source` says where each number came from."""

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
    sd_step_s: float = 0.05  # one Stable Diffusion 2 denoising step with CFG, one 512-px image
    ip_adapter_sample_s: float | None = None  # measured only; otherwise derived from sd_step_s
    train_generator_sample_s: float = 0.12  # one sample through G's training step
    train_assistant_sample_s: float = 0.4  # one sample through the assistant heads' training step
    gpu: str = PAPER_GPU
    unit: str = "GPU-hours"
    source: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCES))

    def generate_seconds(self) -> float:
        if self.generate_candidates_per_s:
            return 1.0 / self.generate_candidates_per_s
        return self.generate_finetune_s / self.jobs_per_reference + self.generate_sample_s

    def sid_pass(self) -> float:
        if self.sid_pass_rate is not None:
            return self.sid_pass_rate
        return sum(PAPER_CAFE_SECONDS) / 2 / sid_seconds_per_accepted()  # at the paper's G seconds, whatever G's

    def dialogue_seconds(self) -> float:
        """GPU-seconds per accepted sample (all GPUs of the tensor-parallel group)."""
        tokens = self.dialogue_tokens_per_sample * self.dialogue_attempts
        return tokens / self.dialogue_tokens_per_s * self.dialogue_gpus

    def set(self, name: str, value: float, source: str) -> None:
        """Set one figure and say where it came from."""
        if not source.startswith(SOURCE_KINDS):
            raise ValueError(f"a source starts with one of {SOURCE_KINDS}: {source!r}")
        setattr(self, name, value)
        self.source[name] = source


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
    "sid_pass_rate": "derived: implied by paper's D3 (1,500 h -> 148K)",
    "sd_step_s": "assumed: SD2 at 512 px, fp16, ~20 steps/s with CFG (paper gives none)",
    "train_generator_sample_s": "assumed: SD2-size UNet fine-tuning at 512 px, bf16 (paper gives none)",
    "train_assistant_sample_s": "assumed: Llama-2-13B forward and backward, ~600 tokens (paper gives none)",
}


def mixed_kind(*sources: str) -> str:
    """The kinds of several sources, e.g. "paper+derived"."""
    return "+".join(dict.fromkeys(source_kind(source) for source in sources))


def generate_kind(inputs: Inputs) -> str:
    """Where ProFusion's seconds per candidate come from (fine-tuning and sampling may differ)."""
    if inputs.generate_candidates_per_s:
        return source_kind(inputs.source.get("generate_candidates_per_s", "measured"))
    return mixed_kind(inputs.source["generate_finetune_s"], inputs.source["generate_sample_s"])


def ip_adapter_seconds(inputs: Inputs, steps: int, image_size: int) -> tuple[float, str]:
    """Seconds per IP-Adapter candidate and their source: the device's measured figures when it has
    them, else SD steps at the image size (tuning-free: no fine-tuning)."""
    if inputs.ip_adapter_sample_s is not None:
        return inputs.ip_adapter_sample_s, inputs.source["ip_adapter_sample_s"]
    scale = (image_size / 512) ** 2
    return (steps * inputs.sd_step_s * scale,
            f"derived: {steps} steps x {inputs.sd_step_s:g} s ({inputs.source['sd_step_s']}) "
            f"x {scale:g} for {image_size} px, no fine-tuning")


def bootstrap_generator(config: dict[str, Any]) -> dict[str, Any]:
    """The spec of the generator a config snapshot's bootstrap drew with (empty when unnamed)."""
    name = (config.get("plan") or {}).get("generator", "profusion")
    return ((config.get("generate") or {}).get("generators") or {}).get(name) or {}


def source_kind(source: str) -> str:
    """measured / paper / derived / assumed / config: the first word of a source (or several, joined by "+")."""
    word = source.replace(":", " ").replace("(", " ").split(" ", 1)[0]
    if word and all(part in SOURCE_KINDS for part in word.split("+")):
        return word
    return next((kind for kind in SOURCE_KINDS if source.startswith(kind)), "assumed")


# --- a version's funnel and cost -------------------------------------------------------


def manifest_seconds(manifest: dict) -> tuple[dict[str, float], str]:
    """Seconds per model stage of a version and their kind: GPU-seconds, or actor-seconds of a CPU run."""
    cost = manifest.get("cost") or {}
    stages = ("generate", "filter", "dialogue")
    gpu_seconds = {stage: float(cost.get(stage, {}).get("gpu_seconds", 0.0)) for stage in stages}
    if any(gpu_seconds.values()):
        return gpu_seconds, "gpu_seconds"
    return {stage: float(cost.get(stage, {}).get("actor_seconds", 0.0)) for stage in stages}, "actor_seconds"


def pass_rate_of(manifest: dict) -> float | None:
    funnel = manifest.get("funnel") or {}
    generated = int(funnel.get("generated") or 0)
    return funnel.get("passed_dino", 0) / generated if generated else None


def from_manifest(manifest: dict, inputs: Inputs, seconds: str = "always") -> Inputs:
    """Pass rate, and per-candidate seconds, from a factory version's funnel and cost.

    `seconds`: "always" takes the run's seconds (a CPU run's actor-seconds turn the unit into
    actor-hours); "gpu" takes them only from a run that spent GPU-seconds; "never" takes none."""
    label = f"measured: {manifest.get('dataset')}/{manifest.get('version')}"
    rate = pass_rate_of(manifest)
    if rate is not None:
        inputs.set("pass_rate", rate, f"{label} funnel")
    spent, kind = manifest_seconds(manifest)
    if seconds == "never" or (seconds == "gpu" and kind != "gpu_seconds"):
        return inputs
    funnel = manifest["funnel"]
    generated, passed = max(funnel["generated"], 1), max(funnel["passed_dino"], 1)
    if kind == "actor_seconds":
        inputs.unit = "actor-hours (CPU run, not GPU)"
    label = f"{label} {kind}"
    inputs.set("generate_candidates_per_s", generated / max(spent["generate"], 1e-9), label)
    inputs.set("filter_candidates_per_s", generated / max(spent["filter"], 1e-9), label)
    # dialogue as tokens/s of one GPU: the per-sample cost with tokens_per_sample fixed
    per_sample = spent["dialogue"] / passed
    inputs.set("dialogue_gpus", 1, label)
    tokens = inputs.dialogue_tokens_per_sample * inputs.dialogue_attempts
    inputs.set("dialogue_tokens_per_s", tokens / max(per_sample, 1e-9), label)
    gpus = manifest.get("config", {}).get("generate", {}).get("num_gpus", "?")
    inputs.gpu = f"as run ({gpus} GPU per generate actor)"
    return inputs


def sid_from_manifest(manifest: dict, inputs: Inputs) -> Inputs:
    """A SID round's pass rate, and G's GPU-seconds per candidate when the round ran on GPUs."""
    label = f"measured: {manifest.get('dataset')}/{manifest.get('version')}"
    rate = pass_rate_of(manifest)
    if rate is not None:
        inputs.set("sid_pass_rate", rate, f"{label} funnel")
    spent, kind = manifest_seconds(manifest)
    generated = (manifest.get("funnel") or {}).get("generated") or 0
    if kind == "gpu_seconds" and generated:
        inputs.set("sid_sample_s", spent["generate"] / generated, f"{label} gpu_seconds")
    return inputs


def load_inputs(path: str | None) -> Inputs:
    """The paper's figures, overridden by a JSON of input names or by a version manifest."""
    inputs = Inputs()
    if not path:
        return inputs
    data = json.loads(Path(path).read_text())
    if data.get("schema", "").startswith("factory.manifest/"):
        return from_manifest(data, inputs)
    known = set(Inputs.__dataclass_fields__) - {"source", "unit"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown input(s) {sorted(unknown)} in {path}; known: {sorted(known)}")
    for name, value in data.items():
        inputs.set(name, value, f"measured ({Path(path).name})")
    return inputs


# --- measured figures per device kind (bench/real_size.py) -----------------------------


def figures_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("FACTORY_COST_FIGURES") or FIGURES_FILE)


def read_figures(path: str | Path | None = None) -> dict[str, Any]:
    """{device kind: entry} from the figures file; {} when the default one is absent (a file named by
    `--figures` or $FACTORY_COST_FIGURES must be there)."""
    where = figures_path(path)
    if not where.exists():
        if path or os.environ.get("FACTORY_COST_FIGURES"):
            raise ValueError(f"figures file {where} does not exist")
        return {}
    try:
        data = json.loads(where.read_text())
    except (ValueError, OSError) as err:  # not JSON, not text, or not a file
        raise ValueError(f"figures file {where} does not read as JSON: {err}") from None
    if not isinstance(data, dict) or data.get("schema") != FIGURES_SCHEMA:
        raise ValueError(f"{where} is not a {FIGURES_SCHEMA} file")
    return data.get("devices", {})


def write_device_figures(entry: dict[str, Any], kind: str, path: str | Path | None = None) -> Path:
    """Put one device kind's entry into the figures file, keeping the other kinds'. An entry that
    covers only some parts keeps the figures of the kind's other parts (each figure says when)."""
    where = figures_path(path)
    devices = read_figures(where) if where.exists() else {}
    devices[kind] = merge_entry(devices.get(kind), entry)
    where.write_text(json.dumps({"schema": FIGURES_SCHEMA, "devices": dict(sorted(devices.items()))}, indent=2)
                     + "\n")
    return where


def merge_entry(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`, plus the figures of `old` that `new` did not measure (stamped with their own date)."""
    if not old:
        return new
    kept = {name: {**figure, "measured": figure.get("measured", old.get("measured"))}
            for name, figure in old.get("figures", {}).items() if name not in new.get("figures", {})}
    stamped = {name: {**figure, "measured": new.get("measured")} for name, figure in new.get("figures", {}).items()}
    parts = list(dict.fromkeys([*old.get("parts", []), *new.get("parts", [])]))
    return {**new, "parts": parts, "figures": dict(sorted({**kept, **stamped}.items()))}


@dataclass
class GeneratorSettings:
    """The config settings the measured per-step figures are multiplied by."""

    profusion_steps: int = 50
    finetune_steps: int = 50
    cafe_steps: int = 50
    ip_adapter_steps: int = 50
    jobs_per_reference: int = 32  # the bootstrap's: IP-Adapter's reference embedding is shared by them
    sid_jobs_per_reference: int = 2


def figure(entry: dict[str, Any], name: str) -> tuple[float, str] | None:
    """(value, its source) of one figure of a device entry, or None when not measured."""
    found = entry.get("figures", {}).get(name)
    if not found or found.get("value") is None:
        return None
    return float(found["value"]), found.get("source", "measured")


def apply_device_figures(inputs: Inputs, kind: str, entry: dict[str, Any], settings: GeneratorSettings) -> Inputs:
    """Per-candidate seconds from one device kind's measured per-step figures and the config's step counts."""
    label = f"{kind}, {entry.get('measured', '?')}"

    def take(name: str) -> tuple[float, str] | None:
        found = figure(entry, name)
        return None if found is None else (found[0], f"{found[1]} ({label}: {name})")

    steps = {"profusion_finetune_step_s": settings.finetune_steps, "profusion_sample_step_s": settings.profusion_steps,
             "cafe_sample_step_s": settings.cafe_steps}
    parts = {name: take(name) for name in (*steps, "profusion_reference_s", "profusion_decode_s",
                                           "cafe_reference_s", "cafe_w_s", "cafe_decode_s")}
    if parts["profusion_finetune_step_s"] and parts["profusion_reference_s"]:
        value = steps["profusion_finetune_step_s"] * parts["profusion_finetune_step_s"][0]
        inputs.set("generate_finetune_s", value + parts["profusion_reference_s"][0],
                   f"{parts['profusion_finetune_step_s'][1]} x {settings.finetune_steps} steps + reference encoding")
    if parts["profusion_sample_step_s"] and parts["profusion_decode_s"]:
        value = steps["profusion_sample_step_s"] * parts["profusion_sample_step_s"][0] + parts["profusion_decode_s"][0]
        inputs.set("generate_sample_s", value, f"{parts['profusion_sample_step_s'][1]} x {settings.profusion_steps}"
                                               " steps + decode")
    cafe = [parts[name] for name in ("cafe_sample_step_s", "cafe_decode_s", "cafe_w_s", "cafe_reference_s")]
    if all(cafe):
        value = (settings.cafe_steps * cafe[0][0] + cafe[1][0] + cafe[2][0]
                 + cafe[3][0] / max(settings.sid_jobs_per_reference, 1))
        inputs.set("sid_sample_s", value, f"{cafe[0][1]} x {settings.cafe_steps} steps + decode + F(w) + E, F of x")
    ip_adapter = [take(name) for name in ("ip_adapter_sample_step_s", "ip_adapter_decode_s", "ip_adapter_reference_s")]
    if all(ip_adapter):
        value = (settings.ip_adapter_steps * ip_adapter[0][0] + ip_adapter[1][0]
                 + ip_adapter[2][0] / max(settings.jobs_per_reference, 1))
        inputs.set("ip_adapter_sample_s", value,
                   f"{ip_adapter[0][1]} x {settings.ip_adapter_steps} steps + decode + reference embedding")
    single = {"filter_candidate_s": "filter_candidates_per_s", "sd_step_s": "sd_step_s",
              "train_generator_sample_s": "train_generator_sample_s",
              "train_assistant_sample_s": "train_assistant_sample_s"}
    for name, target in single.items():
        found = take(name)
        if found:
            value = 1.0 / found[0] if target == "filter_candidates_per_s" else found[0]
            inputs.set(target, value, found[1])
    inputs.gpu, inputs.unit = kind, f"{kind}-hours"
    return inputs


# --- the per-1M-accepted report (bench/cost_model.py) ----------------------------------


def generate_source(inputs: Inputs) -> str:
    if inputs.generate_candidates_per_s:
        return inputs.source.get("generate_candidates_per_s", "measured")
    return inputs.source["generate_sample_s"]


def stage_rows(inputs: Inputs, generate_seconds: float, pass_rate: float) -> list[tuple[str, str, float, str]]:
    """(stage, throughput per GPU, GPU-hours per 1M accepted, source) for one pipeline."""
    candidates = MILLION / pass_rate
    return [
        ("generate", f"{1 / generate_seconds:.3f} candidates/s ({generate_seconds:.2f} s each)",
         candidates * generate_seconds / 3600, generate_source(inputs)),
        ("filter", f"{inputs.filter_candidates_per_s:.0f} candidates/s",
         candidates / inputs.filter_candidates_per_s / 3600, inputs.source["filter_candidates_per_s"]),
        ("dialogue", f"{inputs.dialogue_tokens_per_s:.0f} tokens/s per {inputs.dialogue_gpus:g} GPU(s)",
         MILLION * inputs.dialogue_seconds() / 3600, inputs.source["dialogue_tokens_per_s"]),
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
    """GPU-hours per 1M accepted quadruplets, bootstrap and SID, next to the paper's figures."""
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
    if not inputs.unit.startswith(("actor-hours", "cpu")):
        lines += [""] + sid_report(inputs, generate_s)
    else:
        lines.append(f"(SID comparison skipped: {inputs.unit} do not compare with the paper's GPU-hours)")
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


# --- what a version's figures say about 1M samples (the version report) --------------------


def version_estimates(manifest: dict, figures: str | Path | None = None) -> list[dict[str, Any]]:
    """GPU-hours per 1M accepted at this version's pass rate: on the paper's A100 figures (with this
    version's GPU-seconds when it ran on GPUs) and on each device kind bench/real_size.py measured.
    Each row: device, unit, hours per stage, total, and the kind of source behind each stage."""
    kind = manifest.get("kind")
    if kind not in ("bootstrap", "sid") or pass_rate_of(manifest) is None:
        return []
    rows = [version_row(manifest, PAPER_GPU, None)]
    for device, entry in read_figures(figures).items():
        rows.append(version_row(manifest, device, entry))
    return rows


def version_row(manifest: dict, device: str, entry: dict[str, Any] | None) -> dict[str, Any]:
    inputs = Inputs()
    config = manifest.get("config") or {}
    jobs = (config.get("plan") or {}).get("jobs_per_reference")
    if jobs:
        inputs.set("jobs_per_reference", jobs, "config (plan.jobs_per_reference)")
    if entry is not None:
        apply_device_figures(inputs, device, entry, settings_from_snapshot(config))
    sid = manifest.get("kind") == "sid"
    if sid and entry is None:
        sid_from_manifest(manifest, inputs)
    elif sid:  # the device's seconds, this round's pass rate
        inputs.set("sid_pass_rate", pass_rate_of(manifest), f"measured: {manifest.get('version')} funnel")
    if sid:
        stages = stage_rows(inputs, inputs.sid_sample_s, inputs.sid_pass())
        kinds = [source_kind(inputs.source["sid_sample_s"])]
    else:
        from_manifest(manifest, inputs, seconds="gpu" if entry is None else "never")
        spec = bootstrap_generator(config)
        if spec.get("kind") == "ip_adapter" and not inputs.generate_candidates_per_s:  # not ProFusion's figures
            seconds, source = ip_adapter_seconds(inputs, spec.get("steps", 50), spec.get("image_size", 512))
            stages, kinds = stage_rows(inputs, seconds, inputs.pass_rate), [source_kind(source)]
        else:
            stages = stage_rows(inputs, inputs.generate_seconds(), inputs.pass_rate)
            kinds = [generate_kind(inputs)]
    kinds += [source_kind(inputs.source[name]) for name in ("filter_candidates_per_s", "dialogue_tokens_per_s")]
    if entry is not None:  # a figure the device kind has no measurement of stays the paper's GPU's
        kinds = [kind if "measured" in kind else f"{kind}, {PAPER_GPU}" for kind in kinds]
    return {"device": inputs.gpu, "unit": inputs.unit, "total": sum(row[2] for row in stages),
            "stages": {row[0]: row[2] for row in stages}, "sources": dict(zip((row[0] for row in stages), kinds))}


def settings_from_snapshot(config: dict[str, Any]) -> GeneratorSettings:
    """Step counts from a manifest's config snapshot (the defaults where it has none)."""
    settings = GeneratorSettings()
    generators = (config.get("generate") or {}).get("generators") or {}
    for spec in generators.values():
        if spec.get("kind") == "profusion":
            settings.profusion_steps = spec.get("steps", settings.profusion_steps)
            settings.finetune_steps = (spec.get("options") or {}).get("finetune_steps", settings.finetune_steps)
        elif spec.get("kind") == "cafe":
            settings.cafe_steps = spec.get("steps", settings.cafe_steps)
        elif spec.get("kind") == "ip_adapter":
            settings.ip_adapter_steps = spec.get("steps", settings.ip_adapter_steps)
    settings.jobs_per_reference = (config.get("plan") or {}).get("jobs_per_reference") or settings.jobs_per_reference
    settings.sid_jobs_per_reference = (config.get("sid") or {}).get("jobs_per_reference", 2)
    return settings
