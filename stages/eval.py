"""eval: DreamBench-style metrics of a generator checkpoint (paper section 4.2).

For every (reference, prompt) pair, G draws `images_per_pair` images from E(reference) and a
CLIP condition for the prompt: H(s) of the assistant answering the prompt about the
reference (the paper's model), or the prompt's CLIP text embedding (no assistant needed).
The filter's scorers then measure DINO (image vs reference, DINO ViT-S/16), CLIP-I (image
vs reference, CLIP ViT-B/32) and CLIP-T (image vs prompt). The JSON report is written next
to the checkpoint: `<checkpoint>.eval.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from factory.config import EvalConfig, EvalPair, FactoryConfig, GeneratorSpec
from factory.context import RunContext
from factory.images import decode_image
from factory.storage import Storage

log = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t")


def run(ctx: RunContext) -> dict[str, Any]:
    config = ctx.config
    pairs = eval_pairs(config.eval)
    if not pairs:
        raise ValueError("eval needs (reference, prompt) pairs: set eval.pairs or eval.pairs_file")
    with tempfile.TemporaryDirectory() as tmp:
        generator = Located.resolve(ctx.storage, config.eval.checkpoint, "generator", config.run_id, Path(tmp) / "g")
        assistant = None
        if config.eval.semantic == "assistant":
            assistant = Located.resolve(
                ctx.storage, config.eval.assistant_checkpoint, "assistant", config.run_id, Path(tmp) / "a"
            )
        report = evaluate(config, ctx.storage, generator.local, pairs, assistant.local if assistant else None)
        report["checkpoint"] = generator.name
        report["assistant_checkpoint"] = assistant.name if assistant else None
        report["report"] = generator.write_report(ctx.storage, report)
    log.info("eval of %s: %s", generator.name, report["metrics"])
    return {"report": report["report"], "metrics": report["metrics"], "images": report["images"]}


# --- where the checkpoints are -------------------------------------------------------


@dataclass
class Located:
    """A model folder on local disk, and where the checkpoint lives (local path or storage key)."""

    local: str
    name: str
    in_storage: bool

    @classmethod
    def resolve(cls, storage: Storage, given: str | None, model: str, run_id: str, scratch: Path) -> "Located":
        from factory.checkpoints import fetch_checkpoint, latest_checkpoint

        if given and Path(given).is_dir():
            return cls(given, given, False)
        key = given or latest_checkpoint(storage, model, run_id)
        if key is None:
            raise ValueError(f"no {model} checkpoint: set eval.checkpoint, or train run {run_id!r} first")
        key = key.rstrip("/")
        if storage.list(f"{key}/model"):
            return cls(fetch_checkpoint(storage, key, scratch), key, True)
        if not storage.list(key):
            raise ValueError(f"{model} checkpoint {given!r} is neither a local folder nor in {storage.url('')}")
        for item in storage.list(key):  # a bare model folder in storage
            target = scratch / item[len(key) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(item))
        return cls(str(scratch), key, True)

    def write_report(self, storage: Storage, report: dict[str, Any]) -> str:
        body = json.dumps(report, indent=2, sort_keys=True).encode()
        target = f"{self.name}.eval.json"
        if self.in_storage:
            storage.write_bytes(target, body)
            return storage.url(target)
        Path(target).write_bytes(body)
        return target


def eval_pairs(config: EvalConfig) -> list[EvalPair]:
    pairs = list(config.pairs)
    if config.pairs_file:
        listed = yaml.safe_load(Path(config.pairs_file).read_text()) or []
        pairs.extend(EvalPair.model_validate(item) for item in listed)
    return pairs


def load_reference(storage: Storage, reference: str):
    data = Path(reference).read_bytes() if Path(reference).is_file() else storage.read_bytes(reference)
    return decode_image(data)


# --- the evaluation ------------------------------------------------------------------


def evaluate(
    config: FactoryConfig,
    storage: Storage,
    generator_folder: str,
    pairs: list[EvalPair],
    assistant_folder: str | None = None,
) -> dict[str, Any]:
    """Draw and score; returns the report (metrics are means over all images)."""
    import torch

    from filters.clip import ClipScorer
    from filters.dino import DinoScorer
    from models.cafe import CafeGenerator

    settings = config.eval
    device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    spec = GeneratorSpec(
        kind="cafe",
        model=generator_folder,
        image_size=settings.image_size,
        steps=settings.steps,
        guidance_scale=settings.clip_guidance_scale,
        options={"dino_guidance_scale": settings.dino_guidance_scale},
    )
    generator = CafeGenerator("eval", spec, device)
    semantics = semantic_source(settings, generator, assistant_folder, device)
    clip_scorer = ClipScorer(
        settings.clip_model or config.filter.clip_model,
        settings.clip_pretrained or config.filter.clip_pretrained,
        device,
        model_config=settings.clip_model_config or config.filter.clip_model_config,
        quick_gelu=config.filter.clip_quick_gelu,
    )
    dino_scorer = DinoScorer(settings.dino_model or config.filter.dino_model, device)

    rows = []
    for pair_index, pair in enumerate(pairs):
        reference = load_reference(storage, pair.reference)
        dino_x = generator.encoders.dino_features([reference])
        for prompt_index, template in enumerate(pair.prompts):
            prompt = template.replace("{subject}", pair.subject)
            condition = semantics(dino_x, prompt)
            seeds = [settings.seed + 1000 * (pair_index * 100 + prompt_index) + n for n in range(settings.images_per_pair)]
            images = generator.draw(dino_x, condition.expand(len(seeds), -1), seeds)
            references = [reference] * len(images)
            scores = {
                "dino": dino_scorer.image_image(images, references),
                "clip_i": clip_scorer.image_image(images, references),
                "clip_t": clip_scorer.image_text(images, [prompt] * len(images)),
            }
            rows.append({"reference": pair.reference, "subject": pair.subject, "prompt": prompt, **scores})
    return build_report(rows, settings, generator.describe(), time.perf_counter() - started)


def semantic_source(settings: EvalConfig, generator, assistant_folder: str | None, device: str):
    """A function (E(x), prompt) -> the CLIP condition (1, d) for G."""
    import torch

    if settings.semantic == "assistant":
        from models.assistant import CafeAssistant

        if assistant_folder is None:
            raise ValueError("eval.semantic 'assistant' needs an assistant checkpoint")
        assistant = CafeAssistant.from_pretrained(assistant_folder).to(device).eval()

        def from_assistant(dino_x, prompt):
            _, embedding = assistant.respond(dino_x, prompt, max_new_tokens=settings.max_new_tokens)
            return embedding.float()[None]

        return from_assistant

    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    clip_path = generator.paths["clip_model"]
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    text_model = CLIPTextModelWithProjection.from_pretrained(clip_path).to(device).eval()

    @torch.no_grad()
    def from_text(dino_x, prompt):
        tokens = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return text_model(**tokens).text_embeds.float()

    return from_text


def build_report(rows: list[dict[str, Any]], settings: EvalConfig, generator: dict[str, Any], seconds: float) -> dict:
    def means(selected: list[dict[str, Any]]) -> dict[str, float]:
        return {m: round(float(np.mean(np.concatenate([r[m] for r in selected]))), 6) for m in METRICS}

    subjects = sorted({(r["reference"], r["subject"]) for r in rows})
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "semantic": settings.semantic,
        "generator": generator,
        "pairs": len(rows),
        "images_per_pair": settings.images_per_pair,
        "images": sum(len(r["dino"]) for r in rows),
        "metrics": means(rows),
        "per_subject": [
            {"reference": ref, "subject": subj, **means([r for r in rows if r["reference"] == ref])}
            for ref, subj in subjects
        ],
        "per_prompt": [
            {"reference": r["reference"], "prompt": r["prompt"], **{m: [round(float(v), 6) for v in r[m]] for m in METRICS}}
            for r in rows
        ],
        "seconds": round(seconds, 3),
    }
