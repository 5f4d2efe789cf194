"""Names and keys: what a name may be, the ids and keys made from names and content, and every storage key.

Every key the factory reads or writes is named here, and only here; the storage keys mirror the
layout block of docs/architecture.md. They are relative to the storage root (a local folder or
`s3://bucket/prefix`); `factory.framework.storage` turns them into paths or URLs. What goes into a
key never depends on where the job runs: user-given names follow one rule (`check_name`), outside
names become safe ids (`safe_id`), a sample's key is a hash of what defines it (`sample_key`), and a
model path under the working folder is written relative to it (`portable_ref`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from factory.framework.storage import clean_key

# --- names: the one rule for every name a user gives that becomes part of a storage key -----------
# Dataset, run id, version (published, union, rethreshold and reviewed children), reference set, pool
# and eval set names all follow it, in the config (`factory.framework.config.Name`), in the command
# lines and again below, where every key is built from them; and a key stays in its folder.

NAME_MAX = 100
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = (f"letters, digits, '_', '-' and '.', starting with a letter or digit, no '..', "
             f"at most {NAME_MAX} characters")


class BadName(ValueError):
    """A user-given name (dataset, run id, version, ...) that breaks the name rule, or a key
    built from names that would leave its folder."""


def check_name(name: object, what: str = "name") -> str:
    """`name` when it follows the one name rule (`NAME_RULE`), else `BadName` naming `what`.

    Every name a user gives that becomes part of a storage key (dataset, run id, version,
    reference set, pool, eval set) is checked with this rule, in the config and in the CLIs."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40]) + "..."
        raise BadName(f"{what} {shown} is not a valid name: use {NAME_RULE}")
    return name


def inside(folder: str, key: str) -> str:
    """`key`, after asserting that it normalises to a key under `folder` (no `..` way out)."""
    if not clean_key(key).startswith(f"{clean_key(folder)}/"):
        raise BadName(f"storage key {key!r} leaves its folder {folder!r}")
    return key


# --- ids and sample keys: from content and config, never from where the job runs ------------------


def safe_id(text: str, prefix: str = "") -> str:
    """A filesystem- and key-safe id for an outside name (a file path, a tar member).

    Outside names never become paths: the id is a readable slug plus a hash of the full
    name, so `../x`, `a/b`, NUL and non-ASCII all map to distinct, harmless ids.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    slug = "".join(ch if (ch.isascii() and ch.isalnum()) else "_" for ch in text)[-40:].strip("_")
    return f"{prefix}{slug}_{digest}" if slug else f"{prefix}{digest}"


KEY_FIELDS = (
    "reference_id", "instruction_id", "instruction", "seed", "generator", "checkpoint", "round", "alpha", "w_id",
)


def sample_key(**fields: Any) -> str:
    """Hash what defines a sample into a 24-character hex key: the same job always gets the same
    key, and keys have no dots (WebDataset splits member names at the first dot).

    Unknown fields are refused, so two call sites cannot silently key on different things.
    """
    unknown = set(fields) - set(KEY_FIELDS)
    if unknown:
        raise ValueError(f"not a key field: {sorted(unknown)}; key fields are {KEY_FIELDS}")
    canonical = json.dumps({name: fields.get(name) for name in KEY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def portable_ref(ref: str | None) -> str | None:
    """A model reference as it goes into keys: a local path under the current folder is
    written relative to it, so a job shipped to another working folder keeps its keys."""
    if not ref or "://" in ref or not os.path.isabs(ref):
        return ref
    relative = os.path.relpath(ref, os.getcwd())
    return ref if relative.startswith("..") else relative


# --- reference sets --------------------------------------------------------------------


def reference_set(set_name: str) -> str:
    return f"references/{check_name(set_name, 'reference set')}"


def reference_part(set_name: str, index: int) -> str:
    return f"{reference_set(set_name)}/part-{index:05d}.parquet"


def reference_rejections(set_name: str) -> str:
    return f"{reference_set(set_name)}/rejections.parquet"


def reference_drawn(set_name: str) -> str:
    """The SD drawing job's finished chunks of generated references, so a killed ingest redraws only the rest."""
    return f"{reference_set(set_name)}/drawn"


def reference_complete(set_name: str) -> str:
    """Written last by a finished ingest: plan uses only complete sets."""
    return f"{reference_set(set_name)}/_complete.json"


# --- runs --------------------------------------------------------------------------------


def run_dir(run_id: str) -> str:
    return f"runs/{check_name(run_id, 'run id')}"


def plan(run_id: str) -> str:
    """The plan's index (one row per unit: its partition and rows); written last."""
    return f"{run_dir(run_id)}/plan.parquet"


def plan_part(run_id: str, partition: int) -> str:
    """One partition of the plan: its jobs, one row group per unit."""
    return f"{run_dir(run_id)}/plan/part-{partition:05d}.parquet"


def stage_dir(run_id: str, stage: str) -> str:
    return f"{run_dir(run_id)}/{stage}"


def unit_file(run_id: str, stage: str, unit: int) -> str:
    return f"{stage_dir(run_id, stage)}/unit-{unit:06d}.parquet"


def unit_number(key: str) -> int | None:
    """The unit of a `unit-<n>.parquet` key, or None for any other key."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("unit-") and name.endswith(".parquet"):
        return int(name[len("unit-") : -len(".parquet")])
    return None


def is_unit_file(key: str) -> bool:
    """True for a stage's `unit-<n>.parquet` (by name only; `unit_number` parses the number)."""
    return key.rsplit("/", 1)[-1].startswith("unit-") and key.endswith(".parquet")


# --- dataset versions --------------------------------------------------------------------


def dataset_dir(dataset: str) -> str:
    return f"datasets/{check_name(dataset, 'dataset')}"


def version_dir(dataset: str, version: str) -> str:
    return inside(dataset_dir(dataset), f"{dataset_dir(dataset)}/{check_name(version, 'version')}")


def manifest(dataset: str, version: str) -> str:
    """Written last: a version exists iff this does."""
    return f"{version_dir(dataset, version)}/manifest.json"


def index(dataset: str, version: str) -> str:
    return f"{version_dir(dataset, version)}/index.parquet"


def version_file(dataset: str, version: str, name: str) -> str:
    """A file beside the manifest (the dataset card's `README.md`, `croissant.json`)."""
    return f"{version_dir(dataset, version)}/{check_name(name, 'version file')}"


def publish_lock(dataset: str, version: str) -> str:
    return f"{version_dir(dataset, version)}/_publishing.json"


def publish_written(dataset: str, version: str) -> str:
    """While a version is published: one chunk per shard written (its index rows; `chunk_file`), so a
    publisher stopped half-way and run again writes only the missing shards. Deleted once committed."""
    return f"{version_dir(dataset, version)}/_written"


def shard_relative(version: str, number: int) -> str:
    """A shard's path as the manifest lists it: relative to its version's folder."""
    return f"shards/{check_name(version, 'version')}-{number:06d}.tar"


def shard(dataset: str, version: str, listed_path: str) -> str:
    """The key of a shard as a manifest lists it (version-relative, or root-relative in a union);
    either way it must stay under the dataset's folder (a union lists its parents' shards)."""
    if listed_path.startswith("datasets/"):
        return inside(dataset_dir(dataset), listed_path)
    return inside(version_dir(dataset, version), f"{version_dir(dataset, version)}/{listed_path}")


def review_record(dataset: str, version: str, project_id: int) -> str:
    """What `review export` sent to one Label Studio project: task keys, their origin, the rejected sample's frame."""
    return f"{version_dir(dataset, version)}/reviews/project-{project_id:06d}.json"


def review_records(dataset: str, version: str) -> str:
    return f"{version_dir(dataset, version)}/reviews"


def review_verdicts(dataset: str, version: str) -> str:
    """A reviewed version's per-task votes and verdicts (one row per reviewed key)."""
    return f"{version_dir(dataset, version)}/review.parquet"


def is_manifest(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 4 and parts[0] == "datasets" and parts[3] == "manifest.json"


# --- SID retrieval pools -----------------------------------------------------------------


def pool_dir(name: str) -> str:
    return f"pools/{check_name(name, 'pool')}"


def pool_part(name: str, index: int) -> str:
    return f"{pool_dir(name)}/part-{index:05d}.parquet"


def pool_embedded(name: str) -> str:
    """The pool build's finished chunks of embedded shards, so a killed build embeds only the rest."""
    return f"{pool_dir(name)}/embedded"


def pool_ids(name: str) -> str:
    """The pool's image ids in index order, with the part and row holding each image."""
    return f"{pool_dir(name)}/ids.parquet"


def pool_index(name: str) -> str:
    """The vector index (faiss); written last: a pool exists iff this does."""
    return f"{pool_dir(name)}/index.faiss"


# --- checkpoints -------------------------------------------------------------------------


def checkpoints(model: str) -> str:
    return f"checkpoints/{check_name(model, 'model')}"


def checkpoint_run(model: str, run_id: str) -> str:
    return f"{checkpoints(model)}/{check_name(run_id, 'run id')}"


def checkpoint_step(model: str, run_id: str, step: int) -> str:
    return f"{checkpoint_run(model, run_id)}/step-{step:08d}"


def checkpoint_latest(model: str, run_id: str) -> str:
    """Points at the newest complete step."""
    return f"{checkpoint_run(model, run_id)}/latest.json"


def checkpoint_model(folder: str) -> str:
    return f"{folder}/model"


def checkpoint_meta(folder: str) -> str:
    """Written last in a step folder: the step is complete iff this exists."""
    return f"{folder}/meta.json"


def checkpoint_file(folder: str, relative: str) -> str:
    """A file of a step folder, by its path relative to the folder."""
    return f"{folder}/{relative}"


OPTIMIZER_TENSORS = "optimizer.safetensors"  # in a step folder, beside model/ and meta.json
OPTIMIZER_GROUPS = "optimizer.json"


def checkpoint_step_number(key: str) -> int | None:
    """The step of a key inside a run's step folder (`checkpoints/<model>/<run-id>/step-<n>/...`), else None."""
    parts = key.split("/")
    named = len(parts) > 4 and parts[0] == "checkpoints" and parts[3].startswith("step-")
    return int(parts[3][5:]) if named and parts[3][5:].isdigit() else None


def is_checkpoint_latest(key: str) -> bool:
    """True for a run's `latest.json` (`checkpoints/<model>/<run-id>/latest.json`)."""
    parts = key.split("/")
    return len(parts) == 4 and parts[3] == "latest.json"


def checkpoint_data_log(model: str, run_id: str, epoch: int, rank: int, first_batch: int) -> str:
    """The sample keys one rank trained on in one epoch, from `first_batch` on (`train.log_sample_keys`)."""
    return f"{checkpoint_run(model, run_id)}/data/epoch-{epoch:04d}-rank-{rank:04d}-from-{first_batch:06d}.json"


def promptnet_checkpoint(run_id: str) -> str:
    """Where `--stage promptnet` writes by default: a PromptNet folder (config, weights,
    image_encoder/, training.json written last)."""
    return checkpoint_run("promptnet", run_id)


PROMPTNET_TRAINING = "training.json"  # in a trained PromptNet folder: what it was trained on; written last


def promptnet_progress_step(run_id: str, step: int) -> str:
    """A PromptNet training's progress save: weights, optimizer state, progress.json written last."""
    return f"{stage_dir(run_id, 'promptnet')}/step-{step:08d}"


def promptnet_progress_latest(run_id: str) -> str:
    """Points at the newest complete progress save."""
    return f"{stage_dir(run_id, 'promptnet')}/latest.json"


# --- SID's drawn w images (a round's Stable Diffusion drawings, stored once) ------------


def run_w_dir(run_id: str) -> str:
    """A run's SD-drawn `w` images, laid out like a pool's parts and ids (no index)."""
    return f"{run_dir(run_id)}/w"


def run_w_part(run_id: str, index: int) -> str:
    return f"{run_w_dir(run_id)}/part-{index:05d}.parquet"


def run_w_ids(run_id: str) -> str:
    """The drawn images' ids with the part and row holding each; written last."""
    return f"{run_w_dir(run_id)}/ids.parquet"


def run_w_drawn(run_id: str) -> str:
    """The drawing job's finished chunks (`chunk_file`), kept so a killed round redraws only the rest."""
    return f"{run_w_dir(run_id)}/drawn"


def chunk_file(folder: str, chunk: int) -> str:
    """One finished chunk of a resumable executor job (`factory.framework.executor.Resume`)."""
    return f"{folder}/chunk-{chunk:06d}.parquet"


def chunk_number(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    if name.startswith("chunk-") and name.endswith(".parquet") and name[6:-8].isdigit():
        return int(name[6:-8])
    return None


# --- evaluations -----------------------------------------------------------------------


def eval_results(model: str) -> str:
    return f"evals/{model}"


def eval_result(model: str, checkpoint_id: str, eval_set: str) -> str:
    """One eval report: a checkpoint (`<run-id>/step-<n>`, or `external/<id>`) on one eval set."""
    return f"{eval_results(model)}/{checkpoint_id}/{clean_key(eval_set)}.json"


def eval_scored(model: str, checkpoint_id: str, eval_set: str, settings_sha256: str) -> str:
    """The scoring job's finished chunks of one eval report, kept so a killed eval redraws only the
    rest; one folder per eval settings, so evaluating again with other settings starts afresh."""
    return f"{eval_results(model)}/{checkpoint_id}/{clean_key(eval_set)}.scored/{settings_sha256[:16]}"
