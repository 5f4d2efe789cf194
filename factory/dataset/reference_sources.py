"""Where references come from: candidates listed from folders, S3 prefixes, WebDataset shards and prompts.

Sources (config `references.sources`):
- folder: a local directory, walked recursively (hidden files skipped, symlinked folders
  not followed); files without an image extension are counted as "not_an_image_file".
- s3: every object under `s3://bucket/prefix`, read with the run's storage settings
  (endpoint, retries); a key the storage layer would normalise (`..`, `//`) is "unsafe_name".
- webdataset: local tar shards, plain or gz/bz2/xz (a glob and/or `{000..009}` braces), read with
  tarfile and never extracted; a member named to escape (absolute, `..`, NUL, drive letter) is
  "unsafe_member_name", a link or device "unsupported_member". A sample's image is its first
  jpg/jpeg/png/webp member, its subject the `.json` "subject"/"class", `.cls` or `.txt`. A shard
  damaged partway is "truncated_shard" (the samples before the damage kept), one that cannot be
  opened "unreadable_shard". A shard is opened for each sample read, so open files stay few; a
  compressed one is then decompressed from its start each time: prefer plain .tar (the images in
  it are compressed already).
- generated: one candidate per image to draw (`models.sd_drawer` draws them): `per_prompt`
  for each class in `prompts`, each with its own seed (a hash of the source seed, the class and
  the image's index, so adding classes changes no other seed); subject = the class.

Subject: the source's `subject`, else the first subfolder (folder, s3; `golden_retriever/1.jpg`
gives "golden retriever") or the sample's metadata (webdataset), else "person" for the
human domain, else the reference is rejected as "missing_subject".

Ids hash the source kind, the outside name relative to the source's root and the content (a
sha256 of the file or tar member, an S3 object's ETag) with `factory.framework.layout.safe_id`; a generated
one hashes its prompt, seed and drawing settings, with the model as `factory.framework.models_cache.model_ref`
writes it. No absolute path goes in, so the same inputs have the same ids in any working folder
or storage root (a moved source keeps its ids, a changed file gets a new one); the same file in
two sources is one reference ("duplicate_reference"). Names are data only (`origin`).
A candidate is only listed here; reading (or drawing) its bytes happens in the stage's ingest.
Errors that make the whole stage pointless (missing folder, bucket or shards) are raised here,
before any image is read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from braceexpand import braceexpand

from factory.dataset.instructions import render
from factory.framework.layout import safe_id
from factory.framework.models_cache import model_ref
from factory.framework.storage import Storage, StorageError, clean_key

if TYPE_CHECKING:
    from factory.framework.config import ReferencesConfig, ReferenceSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TAR_SUBJECT_SUFFIXES = ("json", "cls", "txt")
MAX_SUBJECT_CHARS = 64
MAX_METADATA_BYTES = 64 * 1024
HUMAN_DEFAULT_SUBJECT = "person"
# what a damaged shard raises: tarfile passes on the decompressors' EOFError (truncated), LZMAError and zlib.error
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error)


class ReferencesError(RuntimeError):
    """The stage cannot start (a missing folder, bucket, shard or model)."""


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


# --- names and subjects ------------------------------------------------------------------


def printable(name: str) -> str:
    """An outside name as valid UTF-8 text (undecodable bytes become U+FFFD)."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # a file name's undecodable bytes, as they were
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")  # any other lone surrogate (from JSON, say)
    return raw.decode("utf-8", "replace")


def reference_id(kind: str, name: str, content: str = "") -> str:
    """The id of `name` (relative to its source) with `content` (a digest of its bytes, when known)."""
    return safe_id(f"{kind}:{content}:{name}")  # the name last: the readable slug is its tail


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def clean_subject(text: object, from_path: bool = False) -> str | None:
    """A usable subject word from outside text, or None (empty, too long, not text)."""
    if not isinstance(text, str):
        return None
    if from_path:
        text = text.replace("_", " ")
    text = " ".join("".join(ch for ch in printable(text) if ch.isprintable() and ch not in "{}").split())
    return text if 0 < len(text) <= MAX_SUBJECT_CHARS else None


def pick_subject(source: ReferenceSource, found: str | None) -> tuple[str | None, str | None]:
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


def folder_candidates(source: ReferenceSource, cfg: ReferencesConfig) -> list[Candidate]:
    root = Path(source.path).expanduser()
    if not root.is_dir():
        raise ReferencesError(f"reference folder not found: {source.path}")
    found = []
    for relative, path in walk_files(root):
        content = ""
        try:
            size, problem = path.stat().st_size, None
            if is_image_name(relative) and size <= cfg.max_file_mb * 2**20:
                content = file_digest(path)
        except OSError:  # a dangling link, a file gone since the walk
            size, problem = None, "read_error"
        found.append(file_candidate("folder", source, relative, lambda p=path: p.read_bytes(), size, cfg, problem,
                                    content))
    return found


def walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) of every non-hidden file, in a stable order."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                path = Path(folder) / name
                yield path.relative_to(root).as_posix(), path


def file_candidate(kind: str, source: ReferenceSource, relative: str, read: Callable[[], bytes],
                   size: int | None, cfg: ReferencesConfig, reject: str | None = None, content: str = "") -> Candidate:
    subject, missing = pick_subject(source, subfolder_subject(relative))
    if reject is None and not is_image_name(relative):
        reject = "not_an_image_file"
    if reject is None and size is not None and size > cfg.max_file_mb * 2**20:
        reject = "file_too_large"
    return Candidate(reference_id(kind, relative, content), kind, printable(relative), source.domain,
                     subject, read, reject=reject or missing)


# --- s3 -------------------------------------------------------------------------------------


def s3_candidates(source: ReferenceSource, storage: Storage, cfg: ReferencesConfig) -> list[Candidate]:
    """Objects under the prefix; a key that storage would normalise (`..`, `//`, NUL) is 'unsafe_name'."""
    try:
        objects = storage.list_objects("")
    except StorageError as err:
        raise ReferencesError(f"cannot list the reference source {source.path}: {err}") from None
    found = []
    for relative, etag, size in objects:
        if relative.endswith("/"):  # a console-made "folder" marker
            continue
        unsafe = not is_clean_s3_name(relative)
        read = None if unsafe else (lambda k=relative: storage.read_bytes(k))
        found.append(file_candidate("s3", source, relative, read, size, cfg, reject="unsafe_name" if unsafe else None,
                                    content=etag))
    if not found:
        log.warning("no objects under %s", source.path)
    return found


def is_clean_s3_name(name: str) -> bool:
    try:
        return clean_key(name) == name and "\\" not in name
    except StorageError:
        return False


# --- webdataset -------------------------------------------------------------------------------


def webdataset_candidates(source: ReferenceSource, cfg: ReferencesConfig) -> list[Candidate]:
    found = []
    for relative, path in shard_paths(source.path):
        try:
            with open_shard(path) as archive:
                found.extend(shard_candidates(source, cfg, relative, path, archive))
        except SHARD_ERRORS as err:  # one bad shard is counted, the others go on
            log.warning("cannot read WebDataset shard %s: %s", relative, type(err).__name__)
            found.append(Candidate(reference_id("webdataset", relative), "webdataset",
                                   printable(relative), source.domain, reject="unreadable_shard"))
    return found


@contextmanager
def open_shard(path: str) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:*") as archive:
        yield archive


def member_reader(path: str, member: tarfile.TarInfo) -> Callable[[], bytes]:
    """Reads `member`, opening its shard for that read only: open files stay few however many shards."""

    def read() -> bytes:
        with open_shard(path) as archive:
            return archive.extractfile(member).read()

    return read


def shard_paths(pattern: str) -> list[tuple[str, str]]:
    """(name relative to the pattern's fixed folder, path) of every shard matching the pattern."""
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


def shard_candidates(source: ReferenceSource, cfg: ReferencesConfig, shard: str, path: str,
                     archive: tarfile.TarFile) -> list[Candidate]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    members, complete = read_members(archive)
    found = [] if complete else [Candidate(reference_id("webdataset", shard), "webdataset",
                                           printable(shard), source.domain, reject="truncated_shard")]
    for member in members:
        origin = f"{shard}/{member.name}"
        if member.isdir():
            continue
        bad = member_problem(member)
        if bad:
            found.append(Candidate(reference_id("webdataset", origin), "webdataset",
                                   printable(origin), source.domain, reject=bad))
            continue
        key, suffix = split_member_name(member.name)
        samples.setdefault(key, {}).setdefault(suffix.lower(), member)
    for key in sorted(samples):
        found.append(sample_candidate(source, cfg, shard, path, key, samples[key], archive))
    return found


def read_members(archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], bool]:
    """The members listed before any damage, and whether the whole archive was listed."""
    members = []
    try:
        while (member := archive.next()) is not None:
            members.append(member)
    except SHARD_ERRORS:
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


def sample_candidate(source: ReferenceSource, cfg: ReferencesConfig, shard: str, path: str, key: str,
                     members: dict[str, tarfile.TarInfo], archive: tarfile.TarFile) -> Candidate:
    origin = f"{shard}/{key}"
    image = next((members[s] for s in sorted(members) if s.rsplit(".", 1)[-1] in TAR_IMAGE_SUFFIXES), None)
    content = ""
    if image is not None and image.size <= cfg.max_file_mb * 2**20:
        try:
            content = content_digest(archive.extractfile(image).read())
        except SHARD_ERRORS:
            pass  # reading it again in the ingest counts the failure
    ident = reference_id("webdataset", origin, content)
    found = None if source.subject else member_subject(members, archive)
    subject, reject = pick_subject(source, found)
    if image is None:
        reject = "no_image_member"
    elif image.size > cfg.max_file_mb * 2**20:
        reject = "file_too_large"
    read = member_reader(path, image) if image is not None else None
    return Candidate(ident, "webdataset", printable(origin), source.domain, subject, read, reject=reject)


def member_subject(members: dict[str, tarfile.TarInfo], archive: tarfile.TarFile) -> str | None:
    """The subject from a sample's .json ("subject" or "class"), .cls or .txt member."""
    for suffix in TAR_SUBJECT_SUFFIXES:
        member = members.get(suffix)
        if member is None or member.size > MAX_METADATA_BYTES:
            continue
        try:
            text = archive.extractfile(member).read().decode("utf-8", "replace")
        except SHARD_ERRORS:
            continue
        if suffix == "json":
            try:
                meta = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, or nested past json's recursion limit
                continue
            text = meta.get("subject") or meta.get("class") if isinstance(meta, dict) else None
        subject = clean_subject(text)
        if subject:
            return subject
    return None


# --- generated ---------------------------------------------------------------------------------


def generated_candidates(source: ReferenceSource, cfg: ReferencesConfig) -> list[Candidate]:
    found = []
    for name in source.prompts:
        subject = clean_subject(name)
        if subject is None:
            found.append(Candidate(reference_id("generated", printable(name), model_ref(cfg.sd_model)), "generated",
                                   printable(name), source.domain, reject="missing_subject"))
            continue
        prompt = render(cfg.sd_prompt, subject)
        for index in range(source.per_prompt):
            seed = derive_seed(source.seed, subject, index)
            drawn_by = f"{model_ref(cfg.sd_model)}|{cfg.sd_size}|{cfg.sd_steps}|{cfg.sd_guidance_scale}"
            found.append(Candidate(
                reference_id("generated", f"{prompt}|{seed}", drawn_by), "generated", f"{subject}/{index:05d}",
                source.domain, subject, None, prompt=prompt, seed=seed,
            ))
    return found


def derive_seed(source_seed: int, subject: str, index: int) -> int:
    """A per-image seed that stays the same when other classes are added or removed."""
    digest = hashlib.sha256(f"{source_seed}|{subject}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
