"""The bill before the run: plan size, work units and GPU-hours per stage, for `--dry-run`.

Reads the config, the stored reference set (or the configured sources, when it is missing),
the latest published versions (pass rates, and GPU-seconds of GPU runs) and the measured
figures of one device kind (`factory/cost_figures.json`, written by bench/real_size.py).
Writes nothing: storage is only listed and read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from factory.cost import (
    PAPER_GPU,
    GeneratorSettings,
    Inputs,
    apply_device_figures,
    from_manifest,
    ip_adapter_seconds,
    mixed_kind,
    read_figures,
    sid_from_manifest,
    source_kind,
)
from factory.dataset.manifest import list_versions
from factory.dataset.reference_sets import list_parts, set_complete
from factory.dataset.reference_sources import is_image_name, walk_files
from factory.framework.config import FactoryConfig
from factory.framework.storage import S3Storage, Storage, StorageError, open_storage

SID_GENERATOR = "cafe"


@dataclass
class StageEstimate:
    """One stage of the plan: what it processes, how many units, and what that costs."""

    stage: str
    items: float | None  # None: unknown
    item: str  # what an item is: "references to draw", "candidates", ...
    seconds_per_item: float  # GPU-seconds (of the device kind) per item; 0 for CPU-only stages
    source: str
    units: int | None = None
    note: str = ""
    kind: str = ""  # measured / paper / derived / assumed / config, or several joined by "+"

    def __post_init__(self) -> None:
        self.kind = self.kind or source_kind(self.source)

    @property
    def hours(self) -> float:
        return (self.items or 0) * self.seconds_per_item / 3600


@dataclass
class Estimate:
    stage: str
    rows: list[StageEstimate]
    inputs: Inputs
    notes: list[str] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return sum(row.hours for row in self.rows)


# --- how many references ------------------------------------------------------------------


@dataclass
class ReferenceCount:
    stored: int | None  # in the complete stored set; None when the set is missing
    to_draw: int  # generated sources, drawn with Stable Diffusion
    to_ingest: int | None  # folder and S3 sources; None when some count is unknown
    note: str = ""

    @property
    def total(self) -> int | None:
        if self.stored is not None:
            return self.stored
        return None if self.to_ingest is None else self.to_draw + self.to_ingest


def stored_reference_count(storage: Storage, set_name: str) -> int | None:
    """Rows of the complete stored set (from the part files' footers), None when it is missing."""
    if not set_complete(storage, set_name):
        return None
    total = 0
    for part in list_parts(storage, set_name):
        total += storage.parquet_footer(part).num_rows
    return total


def source_count(source, config: FactoryConfig) -> int | None:
    """Images a configured source would offer: counted for folders and S3, None for shards."""
    if source.kind == "generated":
        return len(source.prompts) * source.per_prompt
    if source.kind == "folder":
        root = Path(source.path).expanduser()
        return sum(1 for name, _ in walk_files(root) if is_image_name(name)) if root.is_dir() else 0
    if source.kind == "s3":
        try:
            objects = S3Storage(source.path, config.storage).list_objects("")
        except StorageError:
            return None
        return sum(1 for name, _, _ in objects if is_image_name(name))
    return None


def count_references(config: FactoryConfig, storage: Storage) -> ReferenceCount:
    stored = stored_reference_count(storage, config.references.set)
    if stored is not None:
        return ReferenceCount(stored, 0, 0, f"stored set {config.references.set!r}")
    to_draw, to_ingest, unknown = 0, 0, []
    for source in config.references.sources:
        count = source_count(source, config)
        if count is None:
            unknown.append(f"{source.kind} {source.path}")
        elif source.kind == "generated":
            to_draw += count
        else:
            to_ingest += count
    note = "from the configured sources (every image assumed to pass ingest)"
    if unknown:
        note += f"; not counted: {', '.join(unknown)}"
    return ReferenceCount(None, to_draw, None if unknown else to_ingest, note)


# --- the figures ----------------------------------------------------------------------------


def generator_settings(config: FactoryConfig) -> GeneratorSettings:
    """The step counts the measured per-step figures are multiplied by."""
    settings = GeneratorSettings(sid_jobs_per_reference=config.sid.jobs_per_reference)
    specs = config.generate.generators
    profusion = next((s for s in specs.values() if s.kind == "profusion"), None)
    if profusion is not None:
        settings.profusion_steps = profusion.steps
        settings.finetune_steps = int(profusion.options.get("finetune_steps", 50))
    cafe = specs.get(config.sid.generator)
    if cafe is not None:
        settings.cafe_steps = cafe.steps
    ip_adapter = next((s for s in specs.values() if s.kind == "ip_adapter"), None)
    if ip_adapter is not None:
        settings.ip_adapter_steps = ip_adapter.steps
    settings.jobs_per_reference = config.plan.jobs_per_reference or settings.jobs_per_reference
    return settings


def latest_manifest(storage: Storage, dataset: str, kinds: tuple[str, ...]) -> dict | None:
    wanted = [m for m in list_versions(storage, dataset) if m.get("kind") in kinds]
    return wanted[-1] if wanted else None


def build_inputs(config: FactoryConfig, storage: Storage, device_kind: str | None,
                 figures: str | None = None) -> tuple[Inputs, list[str]]:
    """Paper figures, then the device kind's measured ones, then the latest versions' measured ones."""
    inputs, notes = Inputs(), []
    if config.plan.jobs_per_reference:
        inputs.set("jobs_per_reference", config.plan.jobs_per_reference, "config (plan.jobs_per_reference)")
    devices = read_figures(figures)
    if not device_kind or device_kind == PAPER_GPU:
        if devices:
            notes.append(f"the paper's {PAPER_GPU} figures; measured per-step figures exist for "
                         f"{', '.join(map(repr, sorted(devices)))} (--device-kind KIND)")
    elif device_kind not in devices:
        raise ValueError(f"no measured figures for device kind {device_kind!r} "
                         f"(measured: {sorted(devices) or 'none'}; run bench/real_size.py on one)")
    else:
        apply_device_figures(inputs, device_kind, devices[device_kind], generator_settings(config))
    bootstrap = latest_manifest(storage, config.dataset, ("bootstrap",))
    if bootstrap:
        from_manifest(bootstrap, inputs, seconds="gpu")
        notes.append(f"bootstrap figures from version {bootstrap['version']} ({bootstrap.get('created', '?')})")
    sid = latest_manifest(storage, config.dataset, ("sid",))
    if sid:
        sid_from_manifest(sid, inputs)
        notes.append(f"SID figures from version {sid['version']} ({sid.get('created', '?')})")
    if not bootstrap and not sid:
        notes.append(f"no published version of {config.dataset!r}: pass rates are the paper's")
    return inputs, notes


# --- the stages ------------------------------------------------------------------------------


def units(items: float | None, unit_size: int) -> int | None:
    return None if items is None else math.ceil(items / unit_size)


def reference_rows(config: FactoryConfig, refs: ReferenceCount, inputs: Inputs) -> list[StageEstimate]:
    cfg = config.references
    per_reference = cfg.sd_steps * inputs.sd_step_s * (cfg.sd_size / 512) ** 2
    return [StageEstimate("references", refs.to_draw, "references to draw", per_reference,
                          f"{cfg.sd_steps} steps x {inputs.sd_step_s:g} s ({inputs.source['sd_step_s']})",
                          kind=source_kind(inputs.source["sd_step_s"]),
                          note=f"{amount(refs.to_ingest, '?')} to ingest (CPU)")]


def generate_seconds(config: FactoryConfig, inputs: Inputs, generator: str) -> tuple[float, str]:
    spec = config.generate.generators.get(generator)
    kind = spec.kind if spec else "profusion"
    if kind == "cafe":
        return inputs.sid_sample_s, inputs.source["sid_sample_s"]
    if kind == "ip_adapter":
        return ip_adapter_seconds(inputs, spec.steps, spec.image_size)
    if inputs.generate_candidates_per_s:
        return inputs.generate_seconds(), inputs.source["generate_candidates_per_s"]
    finetune, sample = inputs.source["generate_finetune_s"], inputs.source["generate_sample_s"]
    return inputs.generate_seconds(), (f"{mixed_kind(finetune, sample)}: {inputs.generate_finetune_s:.3g} s fine-tune "
                                       f"({finetune}) / {inputs.jobs_per_reference:g} jobs + "
                                       f"{inputs.generate_sample_s:.3g} s sampling ({sample})")


def candidate_rows(candidates: float | None, unit_size: int, generate: tuple[float, str], pass_rate: float,
                   pass_source: str, inputs: Inputs) -> list[StageEstimate]:
    """generate -> filter -> dialogue -> publish for `candidates` jobs."""
    accepted = None if candidates is None else candidates * pass_rate
    count = units(candidates, unit_size)
    return [
        StageEstimate("generate", candidates, "candidates", generate[0], generate[1], count),
        StageEstimate("filter", candidates, "candidates", 1 / inputs.filter_candidates_per_s,
                      inputs.source["filter_candidates_per_s"], count),
        StageEstimate("dialogue", accepted, f"accepted (pass rate {pass_rate:.3f}: {pass_source})",
                      inputs.dialogue_seconds(), inputs.source["dialogue_tokens_per_s"], count),
        StageEstimate("publish", accepted, "samples", 0.0, "config: CPU only"),
    ]


def estimate_all(config: FactoryConfig, storage: Storage, inputs: Inputs) -> list[StageEstimate]:
    """references (when the set is missing) -> plan -> generate -> filter -> dialogue -> publish."""
    refs = count_references(config, storage)
    plan = config.plan
    if plan.total_jobs is not None:
        candidates = plan.total_jobs
    else:
        candidates = None if refs.total is None else refs.total * plan.jobs_per_reference
    rows = reference_rows(config, refs, inputs) if refs.stored is None else []
    rows.append(StageEstimate("plan", candidates, "candidates", 0.0, f"config; references: {refs.note}",
                              units(candidates, plan.unit_size), note=f"{amount(refs.total)} references"))
    rows += candidate_rows(candidates, plan.unit_size, generate_seconds(config, inputs, plan.generator),
                           inputs.pass_rate, inputs.source["pass_rate"], inputs)
    return rows


def estimate_sid(config: FactoryConfig, storage: Storage, inputs: Inputs) -> list[StageEstimate]:
    """Per night: `sid.rounds` rounds, each w -> G -> filter -> dialogue -> publish, then G's fine-tuning."""
    sid = config.sid
    refs = count_references(config, storage).total
    if refs is not None and sid.max_references is not None:
        refs = min(refs, sid.max_references)
    per_round = None if refs is None else refs * sid.jobs_per_reference * (
        len(sid.alphas) if sid.alpha_mode == "sweep" else 1)
    candidates = None if per_round is None else per_round * sid.rounds
    pass_rate = inputs.sid_pass()
    rows = [StageEstimate("plan", candidates, f"candidates ({sid.rounds} round(s))", 0.0,
                          f"config: {amount(refs)} references x {sid.jobs_per_reference} jobs",
                          units(per_round, sid.unit_size))]
    if sid.w_source == "generate":
        cfg, step = config.references, inputs.source["sd_step_s"]
        per_image = cfg.sd_steps * inputs.sd_step_s * (cfg.sd_size / 512) ** 2
        rows.append(StageEstimate("w (SD)", candidates, "w images to draw", per_image,
                                  f"{cfg.sd_steps} steps x {inputs.sd_step_s:g} s ({step})", kind=source_kind(step)))
    rows += candidate_rows(candidates, sid.unit_size, generate_seconds(config, inputs, sid.generator), pass_rate,
                           inputs.source["sid_pass_rate"], inputs)
    for model, switched_on in (("generator", sid.finetune), ("assistant", sid.finetune_assistant)):
        if switched_on:
            rows.append(finetune_row(config, storage, inputs, per_round, pass_rate, model))
    return rows


FINETUNED = {"generator": "G", "assistant": "assistant"}


def finetune_row(config: FactoryConfig, storage: Storage, inputs: Inputs, per_round: float | None,
                 pass_rate: float, model: str = "generator") -> StageEstimate:
    """`model` (G or the assistant heads) trained on each round's union: parent samples plus the
    round's, `train.epochs` times."""
    parent = latest_manifest(storage, config.dataset, ("bootstrap", "union"))
    base = int(parent.get("samples") or 0) if parent else 0
    if per_round is None:
        samples = None
    else:
        new = per_round * pass_rate
        samples = sum(base + new * k for k in range(1, config.sid.rounds + 1)) * config.train.epochs
    if samples is not None and config.train.max_steps:
        batch = getattr(config.train, f"{model}_batch_size")
        samples = min(samples, config.train.max_steps * batch * config.sid.rounds)
    where = f"{parent['version']}: {base:,} samples" if parent else "no parent version: round samples only"
    figure = f"train_{model}_sample_s"
    return StageEstimate(f"train {FINETUNED[model]}", samples, f"samples x {config.train.epochs} epoch(s)",
                         getattr(inputs, figure), inputs.source[figure], note=f"unions from {where}")


def estimate(config: FactoryConfig, storage: Storage, stage: str, device_kind: str | None = None,
             figures: str | None = None) -> Estimate:
    inputs, notes = build_inputs(config, storage, device_kind, figures)
    if stage == "all":
        rows = estimate_all(config, storage, inputs)
    elif stage == "sid":
        rows = estimate_sid(config, storage, inputs)
    else:
        raise ValueError(f"--dry-run prices --stage all or --stage sid, not {stage!r}")
    return Estimate(stage, rows, inputs, notes)


def unit_stage_hours(config: FactoryConfig, storage: Storage, candidates: int, generator: str,
                     device_kind: str | None = None, figures: str | None = None) -> dict[str, float]:
    """The dry run's GPU-hours of generate, filter and dialogue for a plan of `candidates` jobs drawn
    by `generator` (SID's pass rate for G, the bootstrap's otherwise): what a live run is held against."""
    inputs, _ = build_inputs(config, storage, device_kind, figures)
    spec = config.generate.generators.get(generator)
    sid = spec is not None and spec.kind == "cafe"
    pass_rate, source = (inputs.sid_pass(), "sid_pass_rate") if sid else (inputs.pass_rate, "pass_rate")
    rows = candidate_rows(candidates, config.plan.unit_size, generate_seconds(config, inputs, generator), pass_rate,
                          inputs.source[source], inputs)
    return {row.stage: row.hours for row in rows if row.stage != "publish"}


# --- printing -----------------------------------------------------------------------------------


def amount(value: float | None, unknown: str = "unknown") -> str:
    return unknown if value is None else f"{value:,.0f}"


def format_estimate(result: Estimate, config_name: str) -> list[str]:
    inputs = result.inputs
    unit = inputs.unit.replace(" per 1M", "")
    lines = [f"dry run: --stage {result.stage}, config {config_name}: nothing is run or written",
             f"figures: {inputs.gpu} ({unit}); sources are marked measured / paper / derived / assumed / config",
             *[f"  {note}" for note in result.notes],
             f"  {'stage':<15} {'plan':>14} {'units':>9}  {'s/item':>9} {unit:>14}  item; source"]
    for row in result.rows:
        seconds = f"{row.seconds_per_item:9.3g}" if row.seconds_per_item else f"{'-':>9}"
        hours = f"{row.hours:14,.1f}" if row.seconds_per_item else f"{'CPU':>14}"
        note = f" ({row.note})" if row.note else ""
        if inputs.gpu != PAPER_GPU and row.seconds_per_item and "measured" not in row.kind:
            note += f" (an {PAPER_GPU} figure: not measured on {inputs.gpu})"
        lines.append(f"  {row.stage:<15} {amount(row.items):>14} {amount(row.units, '-'):>9}  {seconds} {hours}  "
                     f"{row.item}{note}; [{row.kind}] {row.source}")
    lines.append(f"  {'total':<15} {'':>14} {'':>9}  {'':>9} {result.total_hours:14,.1f}  {unit}")
    if any(row.items is None for row in result.rows):
        lines.append("  (unknown counts are left out of the total: set plan.total_jobs, or ingest the references)")
    return lines


def dry_run(config: FactoryConfig, stage: str, config_name: str, device_kind: str | None = None,
            figures: str | None = None) -> list[str]:
    """The printed estimate; opens storage without checking it (a local check would create the root)."""
    storage = open_storage(config.storage)
    if not config.storage.root.startswith("s3://") and not os.path.isdir(storage.root):
        storage = EmptyStorage()
    try:
        result = estimate(config, storage, stage, device_kind, figures)
    except StorageError as err:
        result = estimate(config, EmptyStorage(), stage, device_kind, figures)
        result.notes.insert(0, f"storage not readable ({err}): estimated from the config alone")
    return format_estimate(result, config_name)


class EmptyStorage(Storage):
    """A storage root that does not exist yet: nothing stored, nothing listed."""

    root = "(none)"

    def exists(self, key: str) -> bool:
        return False

    def list(self, prefix: str) -> list[str]:
        return []
