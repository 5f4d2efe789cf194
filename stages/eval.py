"""eval: DreamBench-style metrics of a generator checkpoint (paper section 4.2).

For every (reference, prompt) pair, G draws `images_per_pair` images from E(reference) and a
CLIP condition for the prompt: H(s) of the assistant answering the prompt about the
reference (the paper's model), or the prompt's CLIP text embedding (no assistant needed).
The filter's scorers then measure DINO (image vs reference, DINO ViT-S/16), CLIP-I (image
vs reference, CLIP ViT-B/32) and CLIP-T (image vs prompt).

The pairs are `eval.pairs` / `eval.pairs_file` and, with `eval.reference_set`, every reference
of that stored set with DreamBench's object or live-subject prompts (`factory.dataset.eval_sets`). The
checkpoint is `eval.checkpoint`, default the newest G under `checkpoints/generator/` (on the
embedded demo a tiny G is trained on the newest version first when there is none). The JSON
report is stored per checkpoint and eval set: `evals/generator/<checkpoint>/<eval set>.json`
(`factory.framework.layout.eval_result`), with the version G was trained on, so the version report shows it.

The (reference, prompt) rows run on a Ray Data actor pool (`eval.concurrency` actors of
`EvalWorker`, each holding G and the scorers); the driver only gathers the per-image scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from factory.dataset.checkpoints import newest_checkpoint
from factory.dataset.eval_sets import eval_set_name, reference_set_pairs
from factory.dataset.manifest import latest_version
from factory.framework import layout
from factory.framework.config import (
    IMAGES_PER_PROMPT,
    PROMPTS_PER_PAIR,
    ConfigError,
    EvalConfig,
    EvalPair,
    FactoryConfig,
    GeneratorSpec,
    StorageConfig,
    load_yaml,
    validate_config,
)
from factory.framework.executor import MapStep, Resume, run_resumable
from factory.framework.images import decode_image
from factory.framework.layout import safe_id
from factory.framework.models_cache import loader_paths, local_model, model_ref
from factory.framework.stage import RunContext, changed_keys, fingerprint
from factory.framework.storage import AlreadyExists, Storage, open_storage
from filters.clip import ClipScorer
from filters.dino import DinoScorer
from models.assistant import CafeAssistant
from models.base import half_dtype
from models.cafe import CafeGenerator
from models.training.runner import train_generator_on

log = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t")
EVAL_CHUNK_ROWS = 8  # (pair, prompt) rows scored between two saves


def run(ctx: RunContext) -> dict[str, Any]:
    config = ctx.config
    inputs = eval_inputs(ctx.storage, config.eval)
    generator = locate_generator(ctx)
    trained_on = generator.trained_on(ctx.storage)  # now: hours on, training may have deleted the step
    assistant = None
    if config.eval.semantic == "assistant":
        assistant = Located.resolve(ctx.storage, config.eval.assistant_checkpoint, "assistant")
    settings = scoring_settings(ctx, generator, assistant)
    key = layout.eval_result("generator", generator.result_id(), eval_set_name(config.eval))
    refuse_other_report(ctx.storage, key, settings)  # before hours of scoring
    report = evaluate(config, generator, inputs, scoring_resume(ctx, generator, settings), assistant)
    report.update(checkpoint=generator.name, assistant_checkpoint=assistant.name if assistant else None,
                  eval_set=eval_set_name(config.eval), trained_on=trained_on,
                  config_sha256=config.sha256(), settings=settings)
    body = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode()
    try:
        ctx.storage.write_bytes(key, body, create_only=True)
    except AlreadyExists:  # a report written meanwhile (another eval of this checkpoint and set finished first)
        refuse_other_report(ctx.storage, key, settings)
        ctx.storage.write_bytes(key, body)  # made with the same settings: the newer one replaces it
    log.info("eval of %s on %s: %s", generator.name, report["eval_set"], report["metrics"])
    return {"report": ctx.storage.url(key), "metrics": report["metrics"], "images": report["images"]}


def scoring_settings(ctx: RunContext, generator: Located, assistant: Located | None) -> dict[str, Any]:
    """What an eval's scores depend on: the eval settings, G and the assistant."""
    return {**fingerprint(ctx.config, ("eval",)), "generator": generator.name,
            "assistant": assistant.name if assistant else None}


def refuse_other_report(storage: Storage, key: str, settings: dict[str, Any]) -> None:
    """An eval never replaces the report of the same checkpoint and eval set made with other settings."""
    if not storage.exists(key):
        return
    try:
        made_with = json.loads(storage.read_bytes(key)).get("settings")
    except (ValueError, AttributeError):
        return  # not a report: replaced
    changed = changed_keys(made_with, settings) if isinstance(made_with, dict) else []
    if changed:
        raise ConfigError(f"{storage.url(key)} holds this checkpoint's eval on this set made with other settings ("
                          + "; ".join(changed) + "): set eval.name to keep both, or delete that report")


def scoring_resume(ctx: RunContext, generator: Located, settings: dict[str, Any]) -> Resume:
    """Where the scoring keeps its finished chunks: a folder per checkpoint, eval set and settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    folder = layout.eval_scored("generator", generator.result_id(), eval_set_name(ctx.config.eval), digest)
    return Resume(ctx.storage, folder, settings, inputs=("reference", "prompt", "seeds"), chunk_rows=EVAL_CHUNK_ROWS)


def locate_generator(ctx: RunContext) -> Located:
    """`eval.checkpoint`, else the newest trained G; the embedded demo trains a tiny one when there is none."""
    config = ctx.config
    if config.eval.checkpoint is None and newest_checkpoint(ctx.storage, "generator") is None and is_demo(config):
        version = latest_version(ctx.storage, config.dataset, kinds=("bootstrap", "union"))  # as SID picks it
        if version is None:
            raise ValueError("demo: no published version to train a generator on (run --stage all first)")
        log.info("demo: no trained generator yet, training a tiny G on %s", version)
        train_generator_on(ctx, version)
    return Located.resolve(ctx.storage, config.eval.checkpoint, "generator")


def is_demo(config: FactoryConfig) -> bool:
    return config.dataset == "demo"  # the embedded demo's dataset


# --- where the checkpoints are -------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """Where a model lives: a local folder, an `s3://` model folder (fetched through the node's model
    cache), a checkpoint step in storage (`<key>/model/...`), or a bare model folder in storage.
    Resolved on the driver, copied to local disk by each worker."""

    name: str  # the local folder or the storage key
    in_storage: bool
    step: bool = False  # a checkpoint step folder (the model under `model/`)

    @classmethod
    def resolve(cls, storage: Storage, given: str | None, model: str) -> "Located":
        if given and (Path(given).is_dir() or given.startswith("s3://")):
            return cls(given, False)
        key = given or newest_checkpoint(storage, model)
        if key is None:
            setting = "eval.checkpoint" if model == "generator" else "eval.assistant_checkpoint"
            raise ValueError(f"no trained {model} under {storage.url(layout.checkpoints(model))}: set {setting}, "
                             f"or train one first (--stage train --set train.model={model})")
        key = key.rstrip("/")
        if storage.list(f"{key}/model"):
            return cls(key, True, step=True)
        if not storage.list(key):
            raise ValueError(f"{model} checkpoint {given!r} is neither a local folder nor in {storage.url(key)}")
        return cls(key, True)

    def materialize(self, storage: Storage, settings: StorageConfig | None = None) -> str:
        """A local folder holding the model: the folder itself on local storage; from S3, the node's
        cached copy, which every actor on the node shares and no killed actor leaves behind."""
        if not self.in_storage:
            return local_model(self.name, settings, "eval.checkpoint")
        folder = layout.checkpoint_model(self.name) if self.step else self.name
        return local_model(storage.url(folder), settings, "eval.checkpoint")

    def result_id(self) -> str:
        """The checkpoint's folder under `evals/<model>/`: `<run-id>/step-<n>` for a trained step,
        `external/<id of the folder as the config names it>` for any other."""
        parts = self.name.split("/")
        if self.step and len(parts) == 4 and parts[0] == "checkpoints":
            return f"{parts[2]}/{parts[3]}"
        return f"external/{safe_id(model_ref(self.name) or self.name)}"

    def trained_on(self, storage: Storage) -> dict[str, Any] | None:
        """The dataset version a trained step was trained on (from its meta.json), else None."""
        if not self.step or not storage.exists(layout.checkpoint_meta(self.name)):
            return None
        meta = json.loads(storage.read_bytes(layout.checkpoint_meta(self.name)))
        return {"dataset": meta.get("dataset"), "version": meta.get("version"), "step": meta.get("step")}


def eval_pairs(config: EvalConfig) -> list[EvalPair]:
    pairs = list(config.pairs)
    if config.pairs_file:
        listed = load_yaml(Path(config.pairs_file).read_text()) or []
        pairs.extend(EvalPair.model_validate(item) for item in listed)
    return pairs


def eval_inputs(storage: Storage, config: EvalConfig) -> list[tuple[EvalPair, bytes]]:
    """Every (pair, reference image bytes): the configured pairs, then the reference set's."""
    inputs = [(pair, load_reference(storage, pair.reference)) for pair in eval_pairs(config)]
    if config.reference_set:
        inputs.extend(reference_set_pairs(storage, config))
    if not inputs:
        raise ValueError("eval needs (reference, prompt) pairs: set eval.reference_set, eval.pairs or eval.pairs_file")
    return inputs


def load_reference(storage: Storage, reference: str) -> bytes:
    return Path(reference).read_bytes() if Path(reference).is_file() else storage.read_bytes(reference)


# --- the evaluation ------------------------------------------------------------------


def eval_rows(config: FactoryConfig, inputs: list[tuple[EvalPair, bytes]]) -> pd.DataFrame:
    """One row per (pair, prompt): the reference's bytes (read on the driver, so workers need no
    local files), the rendered prompt and its image seeds."""
    settings = config.eval
    rows = []
    for pair_index, (pair, reference) in enumerate(inputs):
        decode_image(reference)  # an unreadable reference fails here, before any model loads
        for prompt_index, template in enumerate(pair.prompts):
            first = settings.seed + IMAGES_PER_PROMPT * (pair_index * PROMPTS_PER_PAIR + prompt_index)
            rows.append({"order": len(rows), "reference": pair.reference, "subject": pair.subject,
                         "prompt": template.replace("{subject}", pair.subject), "reference_image": reference,
                         "seeds": list(range(first, first + settings.images_per_pair))})
    return pd.DataFrame(rows)


class EvalWorker:
    """map_batches callable holding G, the prompt-to-condition source and the scorers: takes
    `eval_rows`, returns per-row metrics (`dino`, `clip_i`, `clip_t`: one value per image)."""

    def __init__(self, config_snapshot: dict[str, Any], generator: Located, assistant: Located | None = None):
        config = validate_config(config_snapshot)
        settings = config.eval
        device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        storage = open_storage(config.storage)
        spec = GeneratorSpec(
            kind="cafe",
            model=generator.materialize(storage, config.storage),
            image_size=settings.image_size,
            steps=settings.steps,
            guidance_scale=settings.clip_guidance_scale,
            options={"dino_guidance_scale": settings.dino_guidance_scale},
        )
        self.generator = CafeGenerator("eval", spec, device, storage=config.storage)
        assistant_folder = assistant.materialize(storage, config.storage) if assistant else None
        self.semantics = semantic_source(settings, self.generator, assistant_folder, device, config.storage)
        local = loader_paths(config.storage)
        self.clip = ClipScorer(
            settings.clip_model or config.filter.clip_model,
            local(settings.clip_pretrained or config.filter.clip_pretrained, "eval.clip_pretrained"),
            device,
            model_config=local(settings.clip_model_config or config.filter.clip_model_config, "eval.clip_model_config"),
            quick_gelu=config.filter.clip_quick_gelu,
        )
        self.dino = DinoScorer(local(settings.dino_model or config.filter.dino_model, "eval.dino_model"), device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        metrics: dict[str, list[list[float]]] = {m: [] for m in METRICS}
        features: dict[bytes, tuple[Any, Any]] = {}
        for row in batch.itertuples():
            if row.reference_image not in features:
                reference = decode_image(row.reference_image)
                features[row.reference_image] = (reference, self.generator.encoders.dino_features([reference]))
            reference, dino_x = features[row.reference_image]
            seeds = [int(seed) for seed in row.seeds]
            condition = self.semantics(dino_x, row.prompt)
            images = self.generator.draw(dino_x, condition.expand(len(seeds), -1), seeds)
            references = [reference] * len(images)
            metrics["dino"].append(self.dino.image_image(images, references).tolist())
            metrics["clip_i"].append(self.clip.image_image(images, references).tolist())
            metrics["clip_t"].append(self.clip.image_text(images, [row.prompt] * len(images)).tolist())
        out = batch[["order", "reference", "subject", "prompt"]].reset_index(drop=True)
        for metric, values in metrics.items():
            out[metric] = values
        out["generator"] = json.dumps(self.generator.describe(), sort_keys=True, default=str)
        return out


def evaluate(
    config: FactoryConfig,
    generator: Located,
    inputs: list[tuple[EvalPair, bytes]],
    resume: Resume,
    assistant: Located | None = None,
) -> dict[str, Any]:
    """Draw and score on an actor pool of `EvalWorker`s, keeping finished chunks of scored rows
    (`resume`: a killed eval scores only the rest); returns the report (metrics are means over all images)."""
    started = time.perf_counter()
    rows = eval_rows(config, inputs)
    worker = MapStep(EvalWorker, (config.snapshot(), generator, assistant), 1,
                     actors=min(config.eval.concurrency, len(rows)), options=config.eval.ray_options())
    scored = pd.concat(run_resumable(rows, [worker], resume), ignore_index=True)
    if len(scored) != len(rows):
        raise RuntimeError(f"eval scored {len(scored)} of {len(rows)} (pair, prompt) rows")
    return report_from_scored(scored, config.eval, time.perf_counter() - started)


def report_from_scored(scored: pd.DataFrame, settings: EvalConfig, seconds: float) -> dict[str, Any]:
    """The report from `EvalWorker` output rows, in (pair, prompt) order."""
    scored = scored.sort_values("order")
    rows = [{"reference": r.reference, "subject": r.subject, "prompt": r.prompt,
             **{m: np.asarray(getattr(r, m), dtype=float) for m in METRICS}} for r in scored.itertuples()]
    return build_report(rows, settings, json.loads(scored["generator"].iloc[0]), seconds)


def semantic_source(settings: EvalConfig, generator, assistant_folder: str | None, device: str,
                    storage: StorageConfig | None = None):
    """A function (E(x), prompt) -> the CLIP condition (1, d) for G."""
    if settings.semantic == "assistant":
        if assistant_folder is None:
            raise ValueError("eval.semantic 'assistant' needs an assistant checkpoint")
        llm_dtype = half_dtype(torch.device(device), torch.bfloat16)  # as it was trained
        assistant = CafeAssistant.from_pretrained(assistant_folder, dtype=llm_dtype, storage=storage).to(device).eval()

        def from_assistant(dino_x, prompt):
            _, embedding = assistant.respond(dino_x, prompt, max_new_tokens=settings.max_new_tokens)
            return embedding.float()[None]

        return from_assistant



    clip_path = local_model(generator.paths["clip_model"], storage, "clip_model")
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    text_model = CLIPTextModelWithProjection.from_pretrained(clip_path).to(device).eval()

    @torch.no_grad()
    def from_text(dino_x, prompt):
        tokens = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return text_model(**tokens).text_embeds.float()

    return from_text


def build_report(rows: list[dict[str, Any]], settings: EvalConfig, generator: dict[str, Any], seconds: float) -> dict:
    def means(selected: list[dict[str, Any]]) -> dict[str, float | None]:
        """Each metric's mean over the finite scores (None where no score is finite)."""
        values = {m: np.concatenate([r[m] for r in selected]) for m in METRICS}
        return {m: round(float(v[np.isfinite(v)].mean()), 6) if np.isfinite(v).any() else None
                for m, v in values.items()}

    def finite(value: float) -> float | None:
        return round(float(value), 6) if np.isfinite(value) else None

    subjects = sorted({(r["reference"], r["subject"]) for r in rows})
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "semantic": settings.semantic,
        "generator": generator,
        "pairs": len(rows),
        "images_per_pair": settings.images_per_pair,
        "images": sum(len(r["dino"]) for r in rows),
        "metrics": means(rows),
        "non_finite": {m: int(sum((~np.isfinite(r[m])).sum() for r in rows)) for m in METRICS},  # left out of the means
        "per_subject": [
            {"reference": ref, "subject": subj,
             **means([r for r in rows if (r["reference"], r["subject"]) == (ref, subj)])}
            for ref, subj in subjects
        ],
        "per_prompt": [
            {"reference": r["reference"], "prompt": r["prompt"], **{m: [finite(v) for v in r[m]] for m in METRICS}}
            for r in rows
        ],
        "seconds": round(seconds, 3),
    }
