"""sid: self-improvement via distillation (paper section 3.3), one or more rounds.

A round: pick references and instructions (rare categories of the parent weighted up),
find a `w` per job (a seeded pick among the pool images nearest the instruction by CLIP
text-image similarity, never the job's own reference or its images, or drawn by Stable
Diffusion from the instruction), choose alpha, draw
`x~ = G(E(x), alpha*F(w) + (1-alpha)*F(x))` with the trained generator, then the same
filter and dialogue stages; publish the round version `D3_k` (kind sid, parent = the
version G was trained on), the union of parent and round, and fine-tune G (`sid.finetune`) and
the assistant heads (`sid.finetune_assistant`) on the union.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from factory.dataset.checkpoints import latest_assistant_checkpoint, latest_generator_checkpoint, run_newest
from factory.dataset.manifest import (
    VersionSpec,
    latest_version,
    load_manifest,
    read_index,
    release_stale_lock,
    shard_checksums,
    union_versions,
    version_exists,
    version_keys,
)
from factory.dataset.planning import (
    PLAN_SCHEMA,
    Partition,
    choose_instructions,
    cut_units,
    instruction_table,
    job_columns,
    partition_catalog,
    partition_rows,
    partitions_of,
    plan_fingerprint,
    reference_parts,
    write_partitions,
)
from factory.dataset.pool import ImagePool, build_pool_from_shards
from factory.dataset.publisher import publish_run
from factory.dataset.reference_sets import set_digest
from factory.framework import layout
from factory.framework.config import ConfigError, FactoryConfig, StorageConfig, validate_config
from factory.framework.executor import MapStep, Resume, run_map, run_resumable, run_steps
from factory.framework.images import store_images
from factory.framework.layout import BadName, check_name, portable_ref, sample_key
from factory.framework.models_cache import loader_paths
from factory.framework.stage import RunContext, settings_named
from factory.framework.storage import Storage, open_storage, opened
from factory.framework.units import finished_units, plan_exists, plan_index, read_plan, read_unit
from filters.clip import clip_scorer_from_config
from models.sd_drawer import StableDiffusionDrawer
from models.training.runner import model_run_id, train_assistant_on, train_generator_on

log = logging.getLogger(__name__)


def plan_schema() -> pa.Schema:
    """The plan's columns and `w_pool`, the pool a `pool:` w_id is in. No image bytes: generate
    joins `w` by `w_id` (`factory.framework.units.ImageJoin`)."""
    return PLAN_SCHEMA.append(pa.field("w_pool", pa.string()))


# --- what the round starts from ------------------------------------------------------


def ensure_parent(ctx: RunContext) -> str:
    """The parent version (the embedded demo's CLI publishes the bootstrap version first)."""
    config = ctx.config
    parent = config.sid.parent or latest_version(ctx.storage, config.dataset, kinds=("bootstrap", "union"))
    if parent:
        return parent
    raise RuntimeError(f"no bootstrap or union version of dataset {config.dataset!r} to start SID from; "
                       "run --stage all first or set sid.parent")


def first_parent(ctx: RunContext) -> str:
    """Round 1's parent: the one its plan was drawn from, once it is (a newer version published while
    the night was down does not change it); else `ensure_parent`'s."""
    round_run = round_context_name(ctx, 1)
    planned = plan_index(ctx.storage, round_run).meta.get("parent") if plan_exists(ctx.storage, round_run) else None
    if planned and ctx.config.sid.parent and ctx.config.sid.parent != planned:
        raise ConfigError(f"SID round 1 ({round_run}) was planned from parent {planned!r}, and sid.parent is now "
                          f"{ctx.config.sid.parent!r}: set it back, or start another run (--set run_id=NEW)")
    return planned or ensure_parent(ctx)


@dataclass(frozen=True)
class RoundModels:
    """The checkpoints a round starts from: G (draws the round) and the assistant heads (None when
    `sid.finetune_assistant` is off); both are named in the round's manifest."""

    generator: str
    assistant: str | None = None

    def lineage(self) -> dict[str, str | None]:
        return {"generator_checkpoint": self.generator, "assistant_checkpoint": self.assistant}


def ensure_checkpoint(ctx: RunContext, parent: str) -> str:
    """G's checkpoint folder: `sid.checkpoint`, else the newest trained G, else (the first night
    after the bootstrap) G trained on the parent now, with the `train` settings."""
    checkpoint = ctx.config.sid.checkpoint or latest_generator_checkpoint(ctx)
    if checkpoint:
        return checkpoint
    log.info("no trained generator yet: training G on %s first", parent)
    return train_generator_on(ctx, parent)


def ensure_assistant(ctx: RunContext, parent: str) -> str:
    """The assistant's checkpoint folder: `sid.assistant_checkpoint`, else the newest trained one,
    else the assistant trained on the parent now (paper 4.1: first on the bootstrap samples)."""
    checkpoint = ctx.config.sid.assistant_checkpoint or latest_assistant_checkpoint(ctx)
    if checkpoint:
        return checkpoint
    log.info("no trained assistant yet: training it on %s first", parent)
    return train_assistant_on(ctx, parent)


# --- planning a round ----------------------------------------------------------------


def parent_rows(ctx: RunContext, parent: str) -> pd.DataFrame:
    return read_index(ctx.storage, ctx.config.dataset, parent, columns=["key", "category"]).to_pandas()


def instruction_weights(instructions: pd.DataFrame, parent_index: pd.DataFrame, power: float) -> np.ndarray:
    """(1 + how often the instruction's category is in the parent)^-power: rare styles come up more."""
    counts = parent_index["category"].value_counts() if "category" in parent_index else pd.Series(dtype=int)
    seen = instructions["category"].map(counts).fillna(0).to_numpy(dtype=float)
    return (1.0 + seen) ** -power


def round_partitions(ctx: RunContext, round_: int,
                     parts: list[tuple[str, int]]) -> tuple[list[Partition], np.ndarray | None]:
    """The round's partitions, and the references it draws for (global catalog positions, sorted;
    None for all): `sid.max_references` of them chosen with a generator seeded by (sid.seed, round)."""
    sid = ctx.config.sid
    sizes = np.array([rows for _, rows in parts], dtype=np.int64)
    chosen = None
    per_part = sizes
    if sid.max_references is not None and sizes.sum() > sid.max_references:
        rng = np.random.default_rng([sid.seed, round_])
        chosen = np.sort(rng.choice(int(sizes.sum()), size=sid.max_references, replace=False))
        per_part = np.diff(np.searchsorted(chosen, np.concatenate([[0], np.cumsum(sizes)])))
    per_reference = sid.jobs_per_reference * (len(sid.alphas) if sid.alpha_mode == "sweep" else 1)
    return partitions_of(parts, (per_part * per_reference).tolist(), sid.unit_size), chosen


def draw_round_jobs(config: FactoryConfig, storage: Storage, partition: Partition, round_: int,
                    instructions: pd.DataFrame, weights: np.ndarray, chosen: np.ndarray | None,
                    first_reference: int) -> pd.DataFrame:
    """One partition of a round, vectorised: each (chosen) reference's `jobs_per_reference` jobs,
    an instruction of its domain weighted by rarity (references whose domain has none are left out),
    a seed, and one alpha drawn (or every alpha, `alpha_mode: sweep`, with one seed)."""
    sid = config.sid
    rng = np.random.default_rng([sid.seed, round_, partition.index])
    catalog = partition_catalog(storage, partition)
    if chosen is not None:
        mine = chosen[(chosen >= first_reference) & (chosen < first_reference + len(catalog))] - first_reference
        catalog = catalog.iloc[mine].reset_index(drop=True)
    picks = np.repeat(np.arange(len(catalog)), sid.jobs_per_reference)
    picked = choose_instructions(rng, catalog["domain"].to_numpy()[picks], instructions, weights)
    picks, picked = picks[picked >= 0], picked[picked >= 0]
    seeds = rng.integers(0, 2**31 - 1, size=len(picks))
    if sid.alpha_mode == "sweep":
        alphas = np.tile(np.asarray(sid.alphas, dtype=float), len(picks))
        picks, picked, seeds = (np.repeat(column, len(sid.alphas)) for column in (picks, picked, seeds))
    else:
        alphas = rng.choice(np.asarray(sid.alphas, dtype=float), size=len(picks))
    return pd.DataFrame({**job_columns(catalog, picks, instructions, picked, config.references.set),
                         "seed": seeds.tolist(), "generator": sid.generator, "round": round_,
                         "alpha": alphas.tolist()})


@dataclass(frozen=True)
class Retrieval:
    """A round's retrieval, found before its partitions are drawn: each distinct instruction
    text's nearest pool images (ids, best first), deep enough (`w_top_k` plus the most exclusions
    a reference has) to serve every job. A few thousand texts: it pickles into the tasks that
    draw the partitions, which choose each job's `w` from it."""

    pool: str
    nearest: dict[str, list[str]]
    dataset: str
    parent: str
    top_k: int
    seed: int

    def attach(self, storage: Storage, jobs: pd.DataFrame) -> pd.DataFrame:
        """`pool:<id>` per job: a pick seeded by the job among the `top_k` nearest images to its
        instruction, never its own reference nor an image drawn from it (pool ids that are the
        parent's sample keys are traced to their reference). Jobs left with no eligible image
        are dropped, with a warning."""
        references = set(jobs["reference_id"].dropna()) if "reference_id" in jobs else set()
        sources = drawn_from(storage, self.dataset, self.parent, references)
        seeds = [[self.seed, int(seed)] for seed in jobs["seed"]]
        chosen = choose_w([self.nearest[text] for text in jobs["instruction"]], excluded_w(jobs, sources),
                          self.top_k, seeds)
        missing = [n for n, image_id in enumerate(chosen) if image_id is None]
        if missing:
            log.warning("%d of %d SID jobs have no pool image but their own reference's: dropped",
                        len(missing), len(jobs))
        jobs["w_id"] = [None if image_id is None else f"pool:{image_id}" for image_id in chosen]
        jobs["w_pool"] = self.pool
        return jobs.drop(index=jobs.index[missing]).reset_index(drop=True)


TEXTS_PER_SEARCH = 256  # instruction texts a retrieval actor encodes and searches per call


class PoolSearch:
    """An actor of a round's retrieval (on the filter's actor pool): the filter's CLIP and the
    pool, loaded once; a batch of texts -> each one's `depth` nearest pool ids, best first."""

    def __init__(self, config_snapshot: dict[str, Any], pool: str, depth: int):
        config = validate_config(config_snapshot)
        self.scorer = clip_scorer_for(config)
        self.pool = ImagePool.load(open_storage(config.storage), pool)
        self.depth = depth

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        found, _ = self.pool.search_ids(embed_texts(self.scorer, batch["text"].tolist()), k=self.depth)
        return batch.assign(nearest=pd.Series([[str(image_id) for image_id in ids] for ids in found],
                                              index=batch.index, dtype=object))


def find_retrieval(ctx: RunContext, parent: str, texts: list[str]) -> Retrieval:
    """The retrieval of `texts`: the round's pool (built from the parent when missing) searched once
    per distinct text by `PoolSearch` actors (on Ray with `plan.executor: ray`, else here)."""
    sid = ctx.config.sid
    pool = ensure_pool(ctx, parent)
    depth = sid.w_top_k + 1 + most_drawn(ctx.storage, ctx.config.dataset, parent)
    search = MapStep.on_pool(PoolSearch, (ctx.config.snapshot(), pool, depth), ctx.config.filter,
                             batch_size=TEXTS_PER_SEARCH)
    rows = pd.DataFrame({"text": sorted(set(texts))})
    nearest: dict[str, list[str]] = {}
    for found in run_map(rows, [search], on_ray=ctx.config.plan.executor == "ray"):
        nearest.update((text, list(ids)) for text, ids in zip(found["text"], found["nearest"], strict=True))
    log.info("SID w: %d distinct instructions searched in pool %s, %d deep", len(rows), pool, depth)
    return Retrieval(pool, nearest, ctx.config.dataset, parent, sid.w_top_k, sid.seed)


def with_drawn_w_ids(jobs: pd.DataFrame) -> pd.DataFrame:
    jobs["w_id"] = [drawn_w_id(instruction, seed) for instruction, seed in zip(jobs["instruction"], jobs["seed"])]
    jobs["w_pool"] = None
    return jobs


def embed_texts(scorer, texts: list[str], batch: int = 256) -> np.ndarray:
    """CLIP text embeddings of `texts`, `batch` at a time."""
    return np.concatenate([scorer.embed_texts(texts[i : i + batch]).cpu().numpy()
                           for i in range(0, len(texts), batch)])


def choose_w(nearest: list[list[str]], excluded: list[set[str]], top_k: int, seeds: list) -> list[str | None]:
    """Per job: one of the first `top_k` of its `nearest` ids (best first) that are not in its
    `excluded` set, picked with a generator seeded by its seed; None when none is eligible."""
    chosen: list[str | None] = []
    for candidates, banned, seed in zip(nearest, excluded, seeds, strict=True):
        eligible = [image_id for image_id in candidates if image_id not in banned][:top_k]
        pick = int(np.random.default_rng(seed).integers(len(eligible))) if eligible else None
        chosen.append(None if pick is None else eligible[pick])
    return chosen


def excluded_w(jobs: pd.DataFrame, sources: dict[str, str]) -> list[set[str]]:
    """Per job, the pool ids it must not use: its reference's id and the ids `sources` traces
    to that reference (image id -> reference id)."""
    by_reference: dict[str, set[str]] = {}
    for image_id, reference_id in sources.items():
        by_reference.setdefault(reference_id, set()).add(image_id)
    references = jobs["reference_id"] if "reference_id" in jobs else pd.Series([None] * len(jobs))
    return [{reference_id, *by_reference.get(reference_id, ())} if reference_id else set()
            for reference_id in references]


def drawn_from(storage: Storage, dataset: str, parent: str, references: set[str]) -> dict[str, str]:
    """{sample key: reference id} of the parent's samples drawn from `references` (the ids a pool
    built from the parent gives them), read from the parent's index by those references only."""
    if not version_exists(storage, dataset, parent) or not references:
        return {}
    index = read_index(storage, dataset, parent, columns=["key", "reference_id"],
                       filters=[("reference_id", "in", sorted(references))])
    return dict(zip(index.column("key").to_pylist(), index.column("reference_id").to_pylist()))


def most_drawn(storage: Storage, dataset: str, parent: str) -> int:
    """The most samples the parent has of one reference (0 when it has none): the most pool ids a
    job can be barred from."""
    if not version_exists(storage, dataset, parent):
        return 0
    references = read_index(storage, dataset, parent, columns=["reference_id"]).column("reference_id")
    counts = pc.value_counts(references.drop_null()).field("counts")
    return int(pc.max(counts).as_py() or 0)


def w_variety(plan: pd.DataFrame) -> dict[str, int]:
    """How many distinct `w` each instruction got in a round's plan: {instruction_id: count}."""
    counts = plan.dropna(subset=["w_id"]).groupby("instruction_id")["w_id"].nunique()
    return {str(instruction): int(count) for instruction, count in counts.sort_index().items()}


def drawn_w_id(instruction: str, seed: int) -> str:
    """`sd:<seed>-<instruction hash>`: what an SD-drawn w is drawn from (a seed alone repeats across
    instructions in large rounds, and the id names one stored image)."""
    return f"sd:{int(seed)}-{hashlib.sha256(instruction.encode()).hexdigest()[:12]}"


def store_drawn_w(ctx: RunContext, drawn: Iterable[tuple[str, bytes | None]]) -> None:
    """The drawn `(w_id, image)` pairs, once each, as a pool-like set of parts and ids under the
    run (ids written last); a failed drawing (None) is not stored."""
    run_id = ctx.config.run_id
    stored = store_images(ctx.storage, partial(layout.run_w_part, run_id), layout.run_w_ids(run_id),
                          ((w_id[len("sd:"):], image) for w_id, image in drawn if image is not None))
    log.info("stored %d SD-drawn w images under %s", stored, ctx.storage.url(layout.run_w_dir(run_id)))


def clip_scorer(config: FactoryConfig):
    return clip_scorer_from_config(config, local=loader_paths(config.storage))


def pool_name(ctx: RunContext, parent: str) -> str:
    return ctx.config.sid.pool or f"{ctx.config.dataset}-{parent}"


def ensure_pool(ctx: RunContext, parent: str) -> str:
    """The round's pool: the configured one, or one built by a Ray Data job from the parent's target
    images (CLIP on an actor pool sized like the filter's) unless built already."""
    name = pool_name(ctx, parent)
    if ctx.storage.exists(layout.pool_index(name)):
        return name
    if ctx.config.sid.pool:
        raise FileNotFoundError(f"no image pool at {ctx.storage.url(layout.pool_dir(name))} (no index file)")
    manifest = load_manifest(ctx.storage, ctx.config.dataset, parent)
    shards = shard_checksums(manifest)
    log.info("building image pool %s from the target images of %s (%d shards)", name, parent, len(shards))
    clip_settings = settings_named(ctx.config, "filter.clip_")
    build_pool_from_shards(ctx.storage, ctx.config.storage, name, shards,
                           partial(clip_scorer_from_snapshot, ctx.config.snapshot()), ctx.config.filter, clip_settings,
                           keep=version_keys(ctx.storage, manifest))  # never a sample people dropped
    return name


def draw_w_images(ctx: RunContext, jobs: pd.DataFrame, batch_size: int = 4) -> Iterator[tuple[str, bytes | None]]:
    """SD drawings of the jobs' instructions by the references' drawer (`models.sd_drawer`), on an
    actor pool sized like the reference ingest's: `(w_id, image)` in the jobs' order, a chunk of
    drawings at a time (a round's drawings are never held at once), None where a drawing failed
    (its jobs are then rejected by generate, counted, for want of a stored `w`). Finished chunks of
    drawings are kept under the run, so a killed round redraws only the rest."""
    refs = ctx.config.references
    w_ids = jobs["w_id"].tolist()
    frame = pd.DataFrame({"order": np.arange(len(jobs)), "prompt": jobs["instruction"].to_numpy(),
                          "seed": jobs["seed"].to_numpy(dtype=np.int64)})
    drawer = MapStep.on_pool(StableDiffusionDrawer, (refs, ctx.config.storage), refs, batch_size=batch_size)
    settings = settings_named(ctx.config, "references.sd_")
    resume = Resume(ctx.storage, layout.run_w_drawn(ctx.config.run_id), settings, inputs=("prompt", "seed"))
    failures: Counter[str] = Counter()
    for chunk in run_resumable(frame, [drawer], resume):  # in order
        failures.update(error for error in chunk["error"] if error is not None)
        yield from zip((w_ids[order] for order in chunk["order"]), chunk["image"])
    for error, count in failures.items():
        log.warning("SID w: %d drawings not stored (%s)", count, error)


@dataclass(frozen=True)
class RoundDraw:
    """Draws one partition of a round (pickles, so a Ray task can draw it): its jobs, each one's
    `w` (from `retrieval`, or the id of an SD drawing) and key, cut into units."""

    config: FactoryConfig
    round_: int
    instructions: pd.DataFrame
    weights: np.ndarray
    chosen: np.ndarray | None  # the round's references, by catalog position (None: all)
    starts: dict[str, int]  # each reference part's first catalog position
    checkpoint: str
    retrieval: Retrieval | None = None

    def jobs(self, storage: Storage, partition: Partition) -> pd.DataFrame:
        return draw_round_jobs(self.config, storage, partition, self.round_, self.instructions, self.weights,
                               self.chosen, self.starts[partition.parts[0]])

    def __call__(self, storage: Storage, partition: Partition) -> pd.DataFrame:
        jobs = self.jobs(storage, partition)
        jobs = self.retrieval.attach(storage, jobs) if self.retrieval else with_drawn_w_ids(jobs)
        jobs.insert(0, "key", round_keys(jobs, portable_ref(self.checkpoint), self.round_))
        return cut_units(jobs, self.config.sid.unit_size, partition.first_unit)


def plan_round(ctx: RunContext, parent: str, round_: int, checkpoint: str) -> dict[str, int]:
    """Draw and write the round's plan partition by partition (like the bootstrap's plan, by Ray
    tasks with `plan.executor: ray`), each with its `w` and keys. A retrieved `w` needs the
    round's distinct instructions first: a first pass over the partitions collects them, and
    `find_retrieval` searches each once. An SD-drawn `w` is drawn once per distinct id after the
    partitions."""
    sid = ctx.config.sid
    parts = reference_parts(ctx)
    partitions, chosen = round_partitions(ctx, round_, parts)
    if not partitions:
        raise RuntimeError("SID round planned no jobs: the reference set is empty")
    instructions = instruction_table(ctx.config.plan.instructions)
    weights = instruction_weights(instructions, parent_rows(ctx, parent), sid.rarity_power)
    starts = dict(zip((key for key, _ in parts), np.cumsum([0] + [rows for _, rows in parts]).tolist()))
    draw = RoundDraw(ctx.config, round_, instructions, weights, chosen, starts, checkpoint)
    on_ray = ctx.config.storage if ctx.config.plan.executor == "ray" else None
    if sid.w_source == "retrieve":
        texts = round_instructions(draw, partitions, on_ray or ctx.storage)
        draw = replace(draw, retrieval=find_retrieval(ctx, parent, texts))
    settings = {"sid": sid.model_dump(), "round": round_, "parent": parent, "checkpoint": portable_ref(checkpoint),
                "references.set": ctx.config.references.set}
    drawn_from = {"parent": parent, "reference_digest": set_digest(ctx.storage, ctx.config.references.set)}
    written = write_partitions(ctx.storage, ctx.config.run_id, partitions, draw, plan_schema(), sid.unit_size,
                               plan_fingerprint(settings, instructions, parts), on_ray, drawn_from)
    draw_round_w(ctx)
    return written


def draw_round_w(ctx: RunContext) -> None:
    """The round's SD-drawn `w`, once per distinct id, unless they are stored already: a round
    killed while drawing them (its plan written) draws the rest when it is run again."""
    if ctx.config.sid.w_source != "generate" or ctx.storage.exists(layout.run_w_ids(ctx.config.run_id)):
        return
    store_drawn_w(ctx, draw_w_images(ctx, planned_drawn_w(ctx)))


def round_instructions(draw: RoundDraw, partitions: list[Partition], where: Storage | StorageConfig) -> list[str]:
    """The distinct instruction texts of the round's jobs, each partition's drawn where its plan is
    (a Ray task each when `where` is a storage config)."""
    step = MapStep(partition_instructions, (draw, where))
    texts: set[str] = set()
    for found in run_map(partition_rows(partitions), [step], on_ray=not isinstance(where, Storage)):
        texts.update(found["text"])
    return sorted(texts)


def partition_instructions(batch: pd.DataFrame, draw: RoundDraw, where: Storage | StorageConfig) -> pd.DataFrame:
    storage = opened(where)
    texts: set[str] = set()
    for fields in batch["partition"]:
        texts.update(draw.jobs(storage, Partition.from_row(fields))["instruction"])
    return pd.DataFrame({"text": sorted(texts)}, dtype=object)


def round_keys(jobs: pd.DataFrame, checkpoint: str | None, round_: int) -> list[str]:
    return [sample_key(reference_id=reference_id, instruction_id=instruction_id, instruction=text, seed=seed,
                       generator=generator, checkpoint=checkpoint, round=round_, alpha=alpha, w_id=w_id)
            for reference_id, instruction_id, text, seed, generator, alpha, w_id in zip(
                jobs["reference_id"], jobs["instruction_id"], jobs["instruction"], jobs["seed"].tolist(),
                jobs["generator"], jobs["alpha"].tolist(), jobs["w_id"])]


def planned_drawn_w(ctx: RunContext) -> pd.DataFrame:
    """The round's distinct SD-drawn `w` (w_id, instruction, seed), read back partition by partition
    (one row per distinct drawing: the only part of an SD-drawn round held whole)."""
    frames = [part.to_pandas().drop_duplicates("w_id") for part in
              read_plan(ctx.storage, ctx.config.run_id, columns=["w_id", "instruction", "seed"])]
    return pd.concat(frames, ignore_index=True).drop_duplicates("w_id").reset_index(drop=True)


def planned_w_variety(ctx: RunContext) -> dict[str, int]:
    """`w_variety` of the round's stored plan, read partition by partition."""
    pairs: set[tuple[str, str]] = set()
    for part in read_plan(ctx.storage, ctx.config.run_id, columns=["instruction_id", "w_id"]):
        frame = part.to_pandas().dropna(subset=["w_id"]).drop_duplicates()
        pairs.update(zip(frame["instruction_id"], frame["w_id"]))
    return w_variety(pd.DataFrame(sorted(pairs), columns=["instruction_id", "w_id"]))


# --- running rounds ------------------------------------------------------------------


def round_context(ctx: RunContext, round_: int, checkpoint: str) -> RunContext:
    """The config a round runs under: its own run id and version, G's checkpoint as the generator
    (`plan.generator` names it: the round's plan is drawn by SID, and generate loads that one)."""
    snapshot = ctx.config.snapshot()
    name = round_context_name(ctx, round_)
    snapshot["run_id"] = name
    snapshot["publish"]["version"] = name
    snapshot["plan"]["generator"] = ctx.config.sid.generator
    generator = snapshot["generate"]["generators"].setdefault(ctx.config.sid.generator, {"kind": "cafe"})
    # CAFE loads `checkpoint or model`: a configured checkpoint is replaced, its `model` (the base) kept
    generator["checkpoint" if generator.get("checkpoint") else "model"] = checkpoint
    return RunContext(FactoryConfig.model_validate(snapshot), storage=ctx.storage, unit_steps=ctx.unit_steps,
                      progress=ctx.progress)


def run_round(ctx: RunContext, parent: str, round_: int, models: RoundModels) -> dict[str, Any]:
    checkpoint = models.generator
    rctx = round_context(ctx, round_, checkpoint)
    if not plan_exists(rctx.storage, rctx.config.run_id):
        plan_round(rctx, parent, round_, checkpoint)
    draw_round_w(rctx)  # a round killed after its plan, while SD drew its `w`, draws them now
    run_steps(rctx, list(rctx.unit_steps))
    alphas = round_alphas(rctx)
    round_manifest = publish_run(rctx, kind="sid", parents=[parent], extra={
        "round": round_, **models.lineage(),
        "alphas": {f"{alpha:g}": int(count) for alpha, count in alphas.items()},
        "w_source": ctx.config.sid.w_source, "w_top_k": ctx.config.sid.w_top_k,
        "w_per_instruction": planned_w_variety(rctx)})
    union_name = f"{ctx.config.run_id}-union{round_}"
    release_stale_lock(ctx.storage, ctx.config.dataset, union_name)
    if not version_exists(ctx.storage, ctx.config.dataset, union_name):
        union_versions(ctx.storage, VersionSpec(
            dataset=ctx.config.dataset, version=union_name, kind="union",
            parents=[parent, round_manifest["version"]], config=rctx.config.snapshot(),
            config_sha256=rctx.config.sha256(), extra={"round": round_}))
    return {"round": round_, "version": round_manifest["version"], "samples": round_manifest["samples"],
            "funnel": round_manifest["funnel"], "union": union_name,
            "manifest": ctx.storage.url(layout.manifest(ctx.config.dataset, round_manifest["version"]))}


def round_alphas(rctx: RunContext) -> pd.Series:
    """How many candidates each alpha was drawn for, read one unit's column at a time."""
    counts = pd.Series(dtype="int64")
    for unit in sorted(finished_units(rctx.storage, rctx.config.run_id, "dialogue")):
        rows = read_unit(rctx.storage, rctx.config.run_id, "dialogue", unit, columns=["alpha"])
        counts = counts.add(rows["alpha"].value_counts(), fill_value=0)
    return counts.astype("int64").sort_index()


def run(ctx: RunContext) -> dict[str, Any]:
    """This night's rounds: they follow the published ones (round k+1 after `<run-id>-union<k>`),
    so a nightly job needs no hand-set run id, and a failed night, submitted again, resumes its
    round (its unit files are kept; its settings are the same). One that failed after publishing its
    union, in its fine-tunes, ends them and counts that round as its own: it starts no new one."""
    if not ctx.unit_steps:
        raise ValueError("SID runs generate -> filter -> dialogue each round: give them as RunContext.unit_steps "
                         "(factory.run.UNIT_STEPS)")
    done = completed_rounds(ctx)
    # a night stopped after publishing its last union, before that union's fine-tunes ended: submitted
    # again, it ends them (`round_models`) and counts that round as one of its own
    resumed = done > 0 and not round_finetuned(ctx, done)
    first, last = done + 1, done + ctx.config.sid.rounds - resumed
    parent = union_name(ctx, done) if done else first_parent(ctx)
    check_derived_names(ctx, parent, range(first, last + 1))
    models = round_models(ctx, parent, done)
    if first > last:
        return resumed_night(ctx, done, models)
    rounds = []
    for round_ in range(first, last + 1):
        result = run_round(ctx, parent, round_, models)
        rounds.append(result)
        print(f"[sid] round {round_}: {result['samples']} samples in {result['version']}, union {result['union']}",
              flush=True)
        parent = result["union"]
        models = finetuned_models(ctx, parent, models)
    last = rounds[-1]
    return {"rounds": rounds, "checkpoint": models.generator, "assistant_checkpoint": models.assistant,
            "publish": {"version": last["version"], "samples": last["samples"], "funnel": last["funnel"],
                        "manifest": last["manifest"]}}


def round_finetuned(ctx: RunContext, round_: int) -> bool:
    """Whether the fine-tunes switched on (`sid.finetune`, `sid.finetune_assistant`) ended their training
    on round `round_`'s union."""
    union = union_name(ctx, round_)
    models = ["generator"] * ctx.config.sid.finetune + ["assistant"] * ctx.config.sid.finetune_assistant
    latest = [layout.checkpoint_latest(model, model_run_id(ctx, model, union)) for model in models]
    return all(ctx.storage.exists(key) and run_newest(ctx.storage, key) is not None for key in latest)


def resumed_night(ctx: RunContext, round_: int, models: RoundModels) -> dict[str, Any]:
    """What a night that ended round `round_`'s fine-tunes, and ran no round of its own, reports."""
    version = round_context_name(ctx, round_)
    manifest = load_manifest(ctx.storage, ctx.config.dataset, version)
    print(f"[sid] round {round_} (published by the night this one resumes): its fine-tunes ended, no new round",
          flush=True)
    return {"rounds": [], "resumed_round": round_, "checkpoint": models.generator,
            "assistant_checkpoint": models.assistant,
            "publish": {"version": version, "samples": manifest["samples"], "funnel": manifest["funnel"],
                        "manifest": ctx.storage.url(layout.manifest(ctx.config.dataset, version))}}


def check_derived_names(ctx: RunContext, parent: str, rounds: range) -> None:
    """Refuse, before any work, a run id or dataset so long that a name the rounds derive from it
    (the round's run id and version, its union, the image pool of each parent) breaks the name rule."""
    derived = []
    for round_ in rounds:
        derived += [(round_context_name(ctx, round_), "round"), (union_name(ctx, round_), "union"),
                    (pool_name(ctx, parent), "pool")]
        parent = union_name(ctx, round_)
    for name, what in derived:
        try:
            check_name(name, f"SID's {what} name")
        except BadName as err:
            raise ConfigError(f"{err}; it is derived from run_id {ctx.config.run_id!r} and dataset "
                              f"{ctx.config.dataset!r}: shorten them (or set sid.pool)") from None


def round_context_name(ctx: RunContext, round_: int) -> str:
    return f"{ctx.config.run_id}-sid{round_}"


def union_name(ctx: RunContext, round_: int) -> str:
    return f"{ctx.config.run_id}-union{round_}"


def completed_rounds(ctx: RunContext) -> int:
    """The last round whose union is published (0 when none)."""
    done = 0
    while version_exists(ctx.storage, ctx.config.dataset, union_name(ctx, done + 1)):
        done += 1
    return done


def finetuned_models(ctx: RunContext, union: str, models: RoundModels) -> RoundModels:
    """The models after a round: each one switched on (`sid.finetune` for G,
    `sid.finetune_assistant` for the assistant) fine-tuned on `union` from the one the round
    started with (runs `<run-id>-g-<union>` / `<run-id>-a-<union>`: a run that had finished
    returns at once, one that stopped resumes from its last step); the others as they were."""
    sid = ctx.config.sid
    generator = train_generator_on(ctx, union, init_from=models.generator) if sid.finetune else models.generator
    assistant = models.assistant
    if sid.finetune_assistant:  # switched on after a round without it: the newest, or one trained on the union
        assistant = train_assistant_on(ctx, union, init_from=assistant) if assistant else ensure_assistant(ctx, union)
    return RoundModels(generator, assistant)


def round_models(ctx: RunContext, parent: str, done: int) -> RoundModels:
    """The models the next round starts from. Round 1: G from `ensure_checkpoint`, the assistant
    from `ensure_assistant` (when switched on). After round k: the models round k started with
    (its manifest), fine-tuned on union k (finished here if the night that should have done it
    stopped first), except G when `sid.finetune` is off (then `ensure_checkpoint` as in round 1)."""
    sid = ctx.config.sid
    if done == 0:
        assistant = ensure_assistant(ctx, parent) if sid.finetune_assistant else None
        return RoundModels(ensure_checkpoint(ctx, parent), assistant)
    previous = load_manifest(ctx.storage, ctx.config.dataset, f"{ctx.config.run_id}-sid{done}")
    started = RoundModels(previous["generator_checkpoint"], previous.get("assistant_checkpoint"))
    models = finetuned_models(ctx, parent, started)
    return models if sid.finetune else RoundModels(ensure_checkpoint(ctx, parent), models.assistant)


def clip_scorer_from_snapshot(snapshot: dict, device: str | None = None):
    """The filter's CLIP scorer from a config snapshot (what a Ray actor is given)."""
    return clip_scorer_for(validate_config(snapshot), device)


def clip_scorer_for(config: FactoryConfig, device: str | None = None):
    """The filter's CLIP scorer; `device` defaults to cuda when present."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return clip_scorer_from_config(config, device, loader_paths(config.storage))
