"""publish: accepted candidates -> a dataset version (shards in key order, index, manifest).

The funnel and the cost are counted from the rows the earlier stages kept, rejections
included, so the manifest states what happened to every planned job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from factory.config import FactoryConfig
from factory.context import RunContext
from factory.manifest import (
    VersionError,
    VersionSpec,
    load_manifest,
    publish_version,
    release_stale_lock,
    version_exists,
)
from factory.shards import Sample

log = logging.getLogger(__name__)

MODEL_STAGES = ("generate", "filter", "dialogue")


def is_alive(rows: pd.DataFrame) -> pd.Series:
    return rows["reject_reason"].isna()


def funnel(rows: pd.DataFrame, written: int) -> dict[str, Any]:
    """Counts at each gate, and every rejection by `stage:reason`."""
    generated = rows["reject_stage"].ne("generate") | rows["reject_reason"].isna()
    passed_clip = generated & rows.get("pass_clip_t", pd.Series(False, index=rows.index)).fillna(False).astype(bool)
    passed_dino = passed_clip & rows.get("pass_dino", pd.Series(False, index=rows.index)).fillna(False).astype(bool)
    rejected = rows[~is_alive(rows)]
    reasons = (rejected["reject_stage"].astype(str) + ":" + rejected["reject_reason"].astype(str)).value_counts()
    return {
        "planned": int(len(rows)),
        "generated": int(generated.sum()),
        "passed_clip": int(passed_clip.sum()),
        "passed_dino": int(passed_dino.sum()),
        "dialogue_accepted": int(is_alive(rows).sum()),
        "written": int(written),
        "rejections": {reason: int(count) for reason, count in sorted(reasons.items())},
    }


def cost(rows: pd.DataFrame, config: FactoryConfig) -> dict[str, Any]:
    """Actor-seconds and GPU-seconds per model stage, summed over the rows' shares."""
    per_stage = {}
    for stage in MODEL_STAGES:
        column = f"seconds_{stage}"
        if column not in rows:
            continue
        seconds = float(rows[column].fillna(0).sum())
        gpus = getattr(config, stage).num_gpus
        per_stage[stage] = {"actor_seconds": round(seconds, 3), "gpu_seconds": round(seconds * gpus, 3)}
    if "gpu_seconds" in rows and "generate" in per_stage:
        per_stage["generate"]["generator_gpu_seconds"] = round(float(rows["gpu_seconds"].fillna(0).sum()), 3)
    return per_stage


def sample_from_row(row: pd.Series, dataset: str, version: str) -> Sample:
    info = json.loads(row["generator_info"]) if row.get("generator_info") else {}
    alpha = row.get("alpha")
    meta = {
        "key": row["key"],
        "dataset": dataset,
        "version": version,
        "reference_id": row["reference_id"],
        "reference_set": row.get("reference_set"),
        "subject": row["subject"],
        "domain": row["domain"],
        "instruction": row["instruction"],
        "instruction_id": row["instruction_id"],
        "category": row.get("category"),
        "style": row.get("style"),
        "round": int(row["round"]),
        "generator": {
            **{k: info.get(k) for k in ("name", "kind", "checkpoint", "steps")},
            "seed": int(row["seed"]),
            "alpha": None if alpha is None or pd.isna(alpha) else float(alpha),
            "w": row.get("w_id"),
        },
        "scores": {"clip_t": float(row["clip_t"]), "dino": float(row["dino"])},
    }
    return Sample(row["key"], row["input_image"], row["target_image"], row["user"], row["assistant"], meta)


def model_fingerprint(source: str | None) -> dict[str, Any]:
    """Name a model by its source, and by a checksum of its files when it is local."""
    if not source:
        return {"source": None}
    path = Path(source)
    if not path.exists():
        return {"source": source, "revision": "hub"}
    digest = hashlib.sha256()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path.parent)}:{file.stat().st_size}".encode())
        if file.stat().st_size <= 64 * 2**20:
            digest.update(file.read_bytes())
    return {"source": source, "sha256": digest.hexdigest()}


def models_used(config: FactoryConfig) -> dict[str, Any]:
    models = {
        "clip": {**model_fingerprint(config.filter.clip_model), "pretrained": config.filter.clip_pretrained},
        "dino": model_fingerprint(config.filter.dino_model),
        "dialogue": {"engine": config.dialogue.engine, **model_fingerprint(config.dialogue.model)},
    }
    for name, spec in config.generate.generators.items():
        models[f"generator:{name}"] = {"kind": spec.kind, **model_fingerprint(spec.model),
                                       "checkpoint": model_fingerprint(spec.checkpoint)}
    return models


def dialogue_prompt(config: FactoryConfig) -> dict[str, Any]:
    try:
        from stages.dialogue import prompt_fingerprint
    except ImportError:
        return {}
    return prompt_fingerprint(config)


def version_spec(ctx: RunContext, rows: pd.DataFrame, written: int, kind: str = "bootstrap",
                 parents: list[str] | None = None, extra: dict[str, Any] | None = None) -> VersionSpec:
    config = ctx.config
    return VersionSpec(
        dataset=config.dataset,
        version=ctx.version,
        kind=kind,
        parents=parents or [],
        config=config.snapshot(),
        config_sha256=config.sha256(),
        models=models_used(config),
        thresholds=dict(config.filter.thresholds),
        funnel=funnel(rows, written),
        cost=cost(rows, config),
        extra={"run_id": config.run_id, "dialogue_prompt": dialogue_prompt(config), **(extra or {})},
    )


def publish_rows(ctx: RunContext, rows: pd.DataFrame, kind: str = "bootstrap",
                 parents: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish the alive rows as version `ctx.version`; idempotent for the same config."""
    config = ctx.config
    if version_exists(ctx.storage, config.dataset, ctx.version):
        manifest = load_manifest(ctx.storage, config.dataset, ctx.version)
        if manifest["config_sha256"] != config.sha256():
            raise VersionError(f"version {config.dataset}/{ctx.version} already exists from another config; "
                               "publishing never overwrites (set publish.version to a new name)")
        release_stale_lock(ctx.storage, config.dataset, ctx.version)
        log.info("version %s/%s is already published", config.dataset, ctx.version)
        return manifest
    accepted = rows[is_alive(rows)]
    samples = [sample_from_row(row, config.dataset, ctx.version) for _, row in accepted.iterrows()]
    written = len({sample.key for sample in samples})
    spec = version_spec(ctx, rows, written, kind, parents, extra)
    return publish_version(ctx.storage, spec, samples, config.publish.shard_max_bytes,
                           config.publish.shard_max_samples)


def run(ctx: RunContext) -> dict[str, Any]:
    from factory.pipeline import read_stage

    rows = read_stage(ctx, "dialogue")
    if rows.empty:
        raise VersionError(f"nothing to publish: no dialogue output under {ctx.storage.url(ctx.run_dir)}")
    manifest = publish_rows(ctx, rows)
    return {"version": manifest["version"], "samples": manifest["samples"], "funnel": manifest["funnel"],
            "manifest": ctx.storage.url(f"datasets/{manifest['dataset']}/{manifest['version']}/manifest.json")}
