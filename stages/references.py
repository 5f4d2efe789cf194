"""references stage: ingest reference images into `references/<set>/part-<00000>.parquet`.

Sources (config `references.sources`):
- folder: a local directory, walked recursively (hidden files skipped, symlinked folders
  not followed); files without an image extension are counted as "not_an_image_file".
- s3: every object under `s3://bucket/prefix`, read with the run's storage settings
  (endpoint, retries); a key the storage layer would normalise (`..`, `//`) is "unsafe_name".
- webdataset: local tar shards (a glob and/or `{000..009}` braces), read with tarfile and
  never extracted; a member named to escape (absolute, `..`, NUL, drive letter) is
  "unsafe_member_name", a link or device "unsupported_member". A sample's image is its first
  jpg/jpeg/png/webp member, its subject the `.json` "subject"/"class", `.cls` or `.txt`.
- generated: Stable Diffusion (`references.sd_model`) draws `per_prompt` images for each class
  in `prompts` with `references.sd_prompt`, each with its own seed (a hash of the source seed,
  the class and the image's index, so adding classes changes no other seed); subject = the
  class. It runs on the driver, or on `concurrency` Ray actors with `num_gpus` each when
  either is set above its default.

Subject: the source's `subject`, else the first subfolder (folder, s3; `golden_retriever/1.jpg`
gives "golden retriever") or the sample's metadata (webdataset), else "person" for the
human domain, else the reference is rejected as "missing_subject".

Every image is decoded by `factory.images.decode_image` (size checked before decoding, EXIF
rotation applied, every mode to RGB), refused when too flat ("degenerate_image"), fit within
`store_size` and re-encoded as JPEG. One bad input is one counted rejection, never a stop.
Ids hash the source kind, the source path as configured and the outside name relative to it
(`factory.keys.safe_id`), so moving a source changes its ids; names are data only (`origin`).
Parts hold `part_size` references sorted by id, so the same inputs give byte-identical parts;
`references/<set>/rejections.parquet` lists every rejection (reference_id, source, origin, reason).
Errors that make the whole stage pointless (missing folder, bucket, shards or model) are
raised before any image is read.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from factory.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.keys import safe_id
from factory.storage import S3Storage, Storage, StorageError, clean_key
from factory.instructions import render

if TYPE_CHECKING:
    from factory.config import FactoryConfig, ReferencesConfig, ReferenceSource
    from factory.context import RunContext

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TAR_SUBJECT_SUFFIXES = ("json", "cls", "txt")
MAX_SUBJECT_CHARS = 64
MAX_METADATA_BYTES = 64 * 1024
HUMAN_DEFAULT_SUBJECT = "person"
PART_NAME = re.compile(r"^part-(\d{5})\.parquet$")

REFERENCE_SCHEMA = pa.schema(
    [
        ("reference_id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("subject", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
    ]
)
REJECTION_SCHEMA = pa.schema(
    [("reference_id", pa.string()), ("source", pa.string()), ("origin", pa.string()), ("reason", pa.string())]
)


class ReferencesError(RuntimeError):
    """The stage cannot start (a missing folder, bucket, shard or model)."""


class Rejected(Exception):
    """One input that cannot become a reference; `reason` is a countable tag."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Candidate:
    """One would-be reference, before its bytes are read or drawn."""

    reference_id: str
    source: str  # the source kind
    origin: str  # the outside name, printable; data only
    domain: str
    subject: str | None = None
    read: Callable[[], bytes] | None = None  # None for generated candidates
    prompt: str | None = None
    seed: int | None = None
    reject: str | None = None  # known bad before reading (unsafe name, too large, ...)


# --- the stage -------------------------------------------------------------------------


def run(ctx: "RunContext") -> dict:
    """Ingest every configured source into the reference set; return the counts."""
    cfg = ctx.config.references
    ctx.storage.delete(complete_key(cfg.set))  # the set is incomplete until this run finishes
    with ExitStack() as stack:
        candidates = list_candidates(ctx, stack)
        drawing = any(c.source == "generated" and not c.reject for c in candidates)
        drawer = Drawer(ctx.config) if drawing else None
        rejections: list[dict] = []
        parts = write_parts(ctx.storage, cfg.set, ingest(candidates, cfg, drawer, rejections), cfg.part_size)
    write_rejections(ctx.storage, cfg.set, rejections)
    summary = {
        "set": cfg.set,
        "references": parts.count,
        "parts": parts.files,
        "rejected": dict(sorted(Counter(r["reason"] for r in rejections).items())),
    }
    ctx.storage.write_bytes(complete_key(cfg.set), json.dumps(summary, sort_keys=True).encode())
    log.info("references %s: %d stored in %d parts, rejected %s",
             cfg.set, parts.count, parts.files, summary["rejected"])
    return summary


def complete_key(set_name: str) -> str:
    """Written last by a finished ingest: a set is usable iff this exists."""
    return f"{set_prefix(set_name)}/_complete.json"


def set_complete(storage: Storage, set_name: str) -> bool:
    return storage.exists(complete_key(set_name))


def list_candidates(ctx: "RunContext", stack: ExitStack) -> list[Candidate]:
    """Every candidate of every source, sorted by id; listing errors are raised here, before any work."""
    cfg = ctx.config.references
    found: list[Candidate] = []
    for source in cfg.sources:
        if source.kind == "folder":
            found.extend(folder_candidates(source, cfg))
        elif source.kind == "s3":
            found.extend(s3_candidates(source, S3Storage(source.path, ctx.config.storage), cfg))
        elif source.kind == "webdataset":
            found.extend(webdataset_candidates(source, cfg, stack))
        else:
            found.extend(generated_candidates(source, cfg))
    return sorted(found, key=lambda c: (c.reference_id, c.origin))


def ingest(candidates: list[Candidate], cfg: "ReferencesConfig", drawer: "Drawer | None",
           rejections: list[dict]) -> Iterator[dict]:
    """Yield accepted rows in id order, a part's worth at a time; append every rejection to `rejections`."""
    seen: set[str] = set()
    pending: list[Candidate] = []
    for candidate in candidates:
        if candidate.reference_id in seen:
            rejections.append(rejection(candidate, "duplicate_reference"))
        elif candidate.reject:
            rejections.append(rejection(candidate, candidate.reject))
        else:
            pending.append(candidate)
        seen.add(candidate.reference_id)
    with ThreadPoolExecutor(max_workers=cfg.io_threads) as pool:
        for start in range(0, len(pending), cfg.part_size):
            chunk = pending[start : start + cfg.part_size]
            drawn = drawer.draw([c for c in chunk if c.source == "generated"]) if drawer else {}
            for candidate, result in zip(chunk, pool.map(lambda c: load_one(c, drawn, cfg), chunk)):
                if isinstance(result, Rejected):
                    rejections.append(rejection(candidate, result.reason))
                else:
                    yield result


def load_one(candidate: Candidate, drawn: dict[str, "bytes | Rejected"], cfg: "ReferencesConfig") -> "dict | Rejected":
    """Read (or take the drawn bytes of) one candidate and turn it into a stored row."""
    try:
        if candidate.read is None:
            data = drawn.get(candidate.reference_id, Rejected("generation_failed"))
            if isinstance(data, Rejected):
                return data
        else:
            data = candidate.read()
        if len(data) > cfg.max_file_mb * 2**20:
            raise Rejected("file_too_large")
        return reference_row(candidate, data, cfg)
    except Rejected as err:
        return err
    except ImageRejected as err:
        return Rejected(err.reason)
    except (StorageError, OSError, tarfile.TarError) as err:
        log.warning("cannot read reference %s: %s", candidate.reference_id, type(err).__name__)
        return Rejected("read_error")
    except Exception:  # one bad file never stops the stage
        log.exception("unexpected error on reference %s", candidate.reference_id)
        return Rejected("unexpected_error")


def reference_row(candidate: Candidate, data: bytes, cfg: "ReferencesConfig") -> dict:
    image = decode_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
    if is_degenerate(image, cfg.min_pixel_std):
        raise Rejected("degenerate_image")
    stored = fit_within(image, cfg.store_size)
    return {
        "reference_id": candidate.reference_id,
        "image": encode_jpeg(stored, quality=cfg.jpeg_quality),
        "width": stored.width,
        "height": stored.height,
        "subject": candidate.subject,
        "domain": candidate.domain,
        "source": candidate.source,
        "origin": candidate.origin,
        "prompt": candidate.prompt,
        "seed": candidate.seed,
    }


def is_degenerate(image, min_std: float) -> bool:
    """True for a flat image: every channel's spread below `min_std` (on a 0..255 scale)."""
    pixels = np.asarray(image)
    step_y, step_x = max(1, pixels.shape[0] // 256), max(1, pixels.shape[1] // 256)
    sample = pixels[::step_y, ::step_x].reshape(-1, pixels.shape[-1] if pixels.ndim == 3 else 1)
    return float(sample.astype(np.float64).std(axis=0).max()) < min_std


def rejection(candidate: Candidate, reason: str) -> dict:
    return {"reference_id": candidate.reference_id, "source": candidate.source,
            "origin": candidate.origin, "reason": reason}


# --- writing and reading parts -----------------------------------------------------------


@dataclass
class PartsWritten:
    count: int
    files: int


def set_prefix(set_name: str) -> str:
    return f"references/{clean_key(set_name)}"


def part_key(set_name: str, index: int) -> str:
    return f"{set_prefix(set_name)}/part-{index:05d}.parquet"


def write_parts(storage: Storage, set_name: str, rows: Iterable[dict], part_size: int) -> PartsWritten:
    """Write rows (already in id order) into parts of `part_size`, then drop parts left from a larger earlier run."""
    count = files = 0
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) == part_size:
            write_table(storage, part_key(set_name, files), buffer, REFERENCE_SCHEMA)
            count, files, buffer = count + len(buffer), files + 1, []
    if buffer:
        write_table(storage, part_key(set_name, files), buffer, REFERENCE_SCHEMA)
        count, files = count + len(buffer), files + 1
    for key in list_parts(storage, set_name)[files:]:
        storage.delete(key)
    return PartsWritten(count, files)


def write_rejections(storage: Storage, set_name: str, rejections: list[dict]) -> None:
    ordered = sorted(rejections, key=lambda r: (r["reference_id"], r["reason"], r["origin"]))
    write_table(storage, f"{set_prefix(set_name)}/rejections.parquet", ordered, REJECTION_SCHEMA)


def write_table(storage: Storage, key: str, rows: list[dict], schema: pa.Schema) -> None:
    storage.write_parquet(key, pa.Table.from_pylist(rows, schema=schema))


def list_parts(storage: Storage, set_name: str) -> list[str]:
    """The set's part files in order."""
    prefix = set_prefix(set_name)
    return [key for key in storage.list(prefix) if PART_NAME.match(key[len(prefix) + 1 :])]


def read_part(storage: Storage, set_name: str, index: int, columns: list[str] | None = None) -> pd.DataFrame:
    """One part file as a DataFrame (`columns` to skip the image bytes, say)."""
    return _read(storage, part_key(set_name, index), columns)


def load_references(storage: Storage, set_name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole reference set, in id order."""
    frames = [_read(storage, key, columns) for key in list_parts(storage, set_name)]
    if not frames:
        return REFERENCE_SCHEMA.empty_table().select(columns or REFERENCE_SCHEMA.names).to_pandas()
    return pd.concat(frames, ignore_index=True)


def load_rejections(storage: Storage, set_name: str) -> pd.DataFrame:
    return _read(storage, f"{set_prefix(set_name)}/rejections.parquet", None)


def _read(storage: Storage, key: str, columns: list[str] | None) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(storage.read_bytes(key)), columns=columns).to_pandas()


# --- names and subjects ------------------------------------------------------------------


def printable(name: str) -> str:
    """An outside name as valid UTF-8 text (undecodable bytes become U+FFFD)."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # a file name's undecodable bytes, as they were
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")  # any other lone surrogate (from JSON, say)
    return raw.decode("utf-8", "replace")


def reference_id(kind: str, where: str, name: str) -> str:
    return safe_id(f"{kind}:{where}:{name}")


def clean_subject(text: object, from_path: bool = False) -> str | None:
    """A usable subject word from outside text, or None (empty, too long, not text)."""
    if not isinstance(text, str):
        return None
    if from_path:
        text = text.replace("_", " ")
    text = " ".join("".join(ch for ch in printable(text) if ch.isprintable() and ch not in "{}").split())
    return text if 0 < len(text) <= MAX_SUBJECT_CHARS else None


def pick_subject(source: "ReferenceSource", found: str | None) -> tuple[str | None, str | None]:
    """(subject, rejection reason): the source's subject, else `found`, else the domain default."""
    subject = clean_subject(source.subject) or found
    if subject is None and source.domain == "human":
        subject = HUMAN_DEFAULT_SUBJECT
    return subject, None if subject else "missing_subject"


def subfolder_subject(relative: str) -> str | None:
    parts = relative.split("/")
    return clean_subject(parts[0], from_path=True) if len(parts) > 1 else None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --- folder -------------------------------------------------------------------------------


def folder_candidates(source: "ReferenceSource", cfg: "ReferencesConfig") -> list[Candidate]:
    root = Path(source.path).expanduser()
    if not root.is_dir():
        raise ReferencesError(f"reference folder not found: {source.path}")
    found = []
    for relative, path in walk_files(root):
        try:
            size, problem = path.stat().st_size, None
        except OSError:  # a dangling link, a file gone since the walk
            size, problem = None, "read_error"
        found.append(file_candidate("folder", source, relative, lambda p=path: p.read_bytes(), size, cfg, problem))
    return found


def walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) of every non-hidden file, in a stable order."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                path = Path(folder) / name
                yield path.relative_to(root).as_posix(), path


def file_candidate(kind: str, source: "ReferenceSource", relative: str, read: Callable[[], bytes],
                   size: int | None, cfg: "ReferencesConfig", reject: str | None = None) -> Candidate:
    subject, missing = pick_subject(source, subfolder_subject(relative))
    if reject is None and not is_image_name(relative):
        reject = "not_an_image_file"
    if reject is None and size is not None and size > cfg.max_file_mb * 2**20:
        reject = "file_too_large"
    return Candidate(reference_id(kind, source.path, relative), kind, printable(relative), source.domain,
                     subject, read, reject=reject or missing)


# --- s3 -------------------------------------------------------------------------------------


def s3_candidates(source: "ReferenceSource", storage: Storage, cfg: "ReferencesConfig") -> list[Candidate]:
    """Objects under the prefix; a key that storage would normalise (`..`, `//`, NUL) is 'unsafe_name'."""
    try:
        names = storage.list("")
    except StorageError as err:
        raise ReferencesError(f"cannot list the reference source {source.path}: {err}") from None
    found = []
    for relative in names:
        if relative.endswith("/"):  # a console-made "folder" marker
            continue
        unsafe = not is_clean_s3_name(relative)
        read = None if unsafe else (lambda k=relative: storage.read_bytes(k))
        found.append(file_candidate("s3", source, relative, read, None, cfg, reject="unsafe_name" if unsafe else None))
    if not found:
        log.warning("no objects under %s", source.path)
    return found


def is_clean_s3_name(name: str) -> bool:
    try:
        return clean_key(name) == name and "\\" not in name
    except StorageError:
        return False


# --- webdataset -------------------------------------------------------------------------------


def webdataset_candidates(source: "ReferenceSource", cfg: "ReferencesConfig", stack: ExitStack) -> list[Candidate]:
    found = []
    for relative, path in shard_paths(source.path):
        try:
            archive = stack.enter_context(tarfile.open(path, "r:*"))
            found.extend(shard_candidates(source, cfg, relative, archive, threading.Lock()))
        except (tarfile.TarError, OSError) as err:  # one bad shard is counted, the others go on
            log.warning("cannot read WebDataset shard %s: %s", relative, type(err).__name__)
            found.append(Candidate(reference_id("webdataset", source.path, relative), "webdataset",
                                   printable(relative), source.domain, reject="unreadable_shard"))
    return found


def shard_paths(pattern: str) -> list[tuple[str, str]]:
    """(name relative to the pattern's fixed folder, path) of every shard matching the pattern."""
    from braceexpand import braceexpand

    shards: dict[str, str] = {}
    base = fixed_folder(pattern)
    for expanded in braceexpand(pattern):
        for path in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
            if os.path.isfile(path):
                shards.setdefault(os.path.relpath(path, base).replace(os.sep, "/"), path)
    if not shards:
        raise ReferencesError(f"no WebDataset shards match {pattern}")
    return sorted(shards.items())


def fixed_folder(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part) or "{" in part:
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def shard_candidates(source: "ReferenceSource", cfg: "ReferencesConfig", shard: str,
                     archive: tarfile.TarFile, lock: threading.Lock) -> list[Candidate]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    members, complete = read_members(archive)
    found = [] if complete else [Candidate(reference_id("webdataset", source.path, shard), "webdataset",
                                           printable(shard), source.domain, reject="truncated_shard")]
    for member in members:
        origin = f"{shard}/{member.name}"
        if member.isdir():
            continue
        bad = member_problem(member)
        if bad:
            found.append(Candidate(reference_id("webdataset", source.path, origin), "webdataset",
                                   printable(origin), source.domain, reject=bad))
            continue
        key, suffix = split_member_name(member.name)
        samples.setdefault(key, {}).setdefault(suffix.lower(), member)
    for key in sorted(samples):
        found.append(sample_candidate(source, cfg, shard, key, samples[key], archive, lock))
    return found


def read_members(archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], bool]:
    """The members listed before any damage, and whether the whole archive was listed."""
    members = []
    try:
        while (member := archive.next()) is not None:
            members.append(member)
    except (tarfile.TarError, OSError):
        return members, False
    return members, True


def member_problem(member: tarfile.TarInfo) -> str | None:
    if unsafe_member_name(member.name):
        return "unsafe_member_name"
    if not member.isfile():
        return "unsupported_member"  # links, devices, fifos
    return None


def unsafe_member_name(name: str) -> bool:
    """True for a member name that would leave its folder: absolute, `..`, NUL, a drive letter."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]", name)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name (a leading `./` dropped)."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, filename = name.rpartition("/")
    stem, dot, suffix = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (suffix if dot else "")


def sample_candidate(source: "ReferenceSource", cfg: "ReferencesConfig", shard: str, key: str,
                     members: dict[str, tarfile.TarInfo], archive: tarfile.TarFile,
                     lock: threading.Lock) -> Candidate:
    origin = f"{shard}/{key}"
    ident = reference_id("webdataset", source.path, origin)
    image = next((members[s] for s in sorted(members) if s.rsplit(".", 1)[-1] in TAR_IMAGE_SUFFIXES), None)
    found = None if source.subject else member_subject(members, archive)
    subject, reject = pick_subject(source, found)
    if image is None:
        reject = "no_image_member"
    elif image.size > cfg.max_file_mb * 2**20:
        reject = "file_too_large"

    def read(member=image) -> bytes:
        with lock:  # one TarFile shares one file handle
            return archive.extractfile(member).read()

    return Candidate(ident, "webdataset", printable(origin), source.domain, subject, read, reject=reject)


def member_subject(members: dict[str, tarfile.TarInfo], archive: tarfile.TarFile) -> str | None:
    """The subject from a sample's .json ("subject" or "class"), .cls or .txt member."""
    import json

    for suffix in TAR_SUBJECT_SUFFIXES:
        member = members.get(suffix)
        if member is None or member.size > MAX_METADATA_BYTES:
            continue
        try:
            text = archive.extractfile(member).read().decode("utf-8", "replace")
        except (tarfile.TarError, OSError):
            continue
        if suffix == "json":
            try:
                meta = json.loads(text)
            except ValueError:
                continue
            text = meta.get("subject") or meta.get("class") if isinstance(meta, dict) else None
        subject = clean_subject(text)
        if subject:
            return subject
    return None


# --- generated ---------------------------------------------------------------------------------


def generated_candidates(source: "ReferenceSource", cfg: "ReferencesConfig") -> list[Candidate]:
    found = []
    for name in source.prompts:
        subject = clean_subject(name)
        if subject is None:
            found.append(Candidate(reference_id("generated", cfg.sd_model, printable(name)), "generated",
                                   printable(name), source.domain, reject="missing_subject"))
            continue
        prompt = render(cfg.sd_prompt, subject)
        for index in range(source.per_prompt):
            seed = derive_seed(source.seed, subject, index)
            drawn_by = f"{cfg.sd_model}|{cfg.sd_size}|{cfg.sd_steps}|{cfg.sd_guidance_scale}"
            found.append(Candidate(
                reference_id("generated", drawn_by, f"{prompt}|{seed}"), "generated", f"{subject}/{index:05d}",
                source.domain, subject, None, prompt=prompt, seed=seed,
            ))
    return found


def derive_seed(source_seed: int, subject: str, index: int) -> int:
    """A per-image seed that stays the same when other classes are added or removed."""
    digest = hashlib.sha256(f"{source_seed}|{subject}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ReferenceDrawer:
    """Draws references with a diffusers StableDiffusionPipeline; built once per actor.

    `(rows: DataFrame[prompt, seed]) -> rows + image (PNG bytes, or None) + error`.
    """

    def __init__(self, config: "FactoryConfig"):
        import torch
        from diffusers import StableDiffusionPipeline

        self.cfg = config.references
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        half = {"torch_dtype": torch.float16} if self.device == "cuda" else {}
        self.pipe = StableDiffusionPipeline.from_pretrained(self.cfg.sd_model, low_cpu_mem_usage=False, **half)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def ready(self) -> bool:
        return True

    def draw_batch(self, rows: pd.DataFrame) -> pd.DataFrame:
        return self(rows)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        import torch

        out = rows.copy()
        try:
            result = self.pipe(
                prompt=list(rows["prompt"]),
                num_inference_steps=self.cfg.sd_steps,
                height=self.cfg.sd_size,
                width=self.cfg.sd_size,
                guidance_scale=self.cfg.sd_guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
            )
            out["image"] = [png_bytes(image) for image in result.images]
            out["error"] = None
        except Exception as err:  # a failed batch is counted, the stage goes on
            log.warning("reference drawing failed for %d prompts: %s", len(rows), type(err).__name__)
            out["image"] = None
            out["error"] = type(err).__name__
        return out


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Drawer:
    """Runs ReferenceDrawer in batches of `batch_size`, here or on a pool of Ray actors."""

    def __init__(self, config: "FactoryConfig"):
        cfg = config.references
        self.batch_size = cfg.batch_size
        self.pool = None
        try:
            if cfg.num_gpus > 0 or cfg.concurrency > 1:
                self.pool = ray_pool(config)
            else:
                self.local = ReferenceDrawer(config)
        except Exception as err:
            raise ReferencesError(
                f"cannot load the Stable Diffusion pipeline references.sd_model={cfg.sd_model!r}: "
                f"{type(err).__name__}: {err}"
            ) from None

    def draw(self, candidates: list[Candidate]) -> dict[str, "bytes | Rejected"]:
        batches = [
            pd.DataFrame({"reference_id": [c.reference_id for c in batch], "prompt": [c.prompt for c in batch],
                          "seed": [c.seed for c in batch]})
            for batch in (candidates[i : i + self.batch_size] for i in range(0, len(candidates), self.batch_size))
        ]
        if self.pool is not None:
            results = self.pool.map(lambda actor, batch: actor.draw_batch.remote(batch), batches)
        else:
            results = map(self.local, batches)
        drawn: dict[str, bytes | Rejected] = {}
        for frame in results:
            for ident, image in zip(frame["reference_id"], frame["image"]):
                drawn[ident] = image if image is not None else Rejected("generation_failed")
        return drawn


def ray_pool(config: "FactoryConfig"):
    import ray
    from ray.util import ActorPool

    cfg = config.references
    if not ray.is_initialized():
        local = {"num_cpus": config.ray.num_cpus} if config.ray.address is None else {}
        ray.init(address=config.ray.address, ignore_reinit_error=True, **local)
    remote = ray.remote(num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus)(ReferenceDrawer)
    actors = [remote.remote(config) for _ in range(cfg.concurrency)]
    ray.get([actor.ready.remote() for actor in actors])  # surface a bad model path now
    return ActorPool(actors)
