"""Stable sample keys: the same job always gets the same key, and keys have no dots
(WebDataset splits member names at the first dot)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

KEY_FIELDS = (
    "reference_id", "instruction_id", "instruction", "seed", "generator", "checkpoint", "round", "alpha", "w_id",
)


def sample_key(**fields: Any) -> str:
    """Hash what defines a sample into a 24-character hex key.

    Unknown fields are refused, so two call sites cannot silently key on different things.
    """
    unknown = set(fields) - set(KEY_FIELDS)
    if unknown:
        raise ValueError(f"not a key field: {sorted(unknown)}; key fields are {KEY_FIELDS}")
    canonical = json.dumps({name: fields.get(name) for name in KEY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def safe_id(text: str, prefix: str = "") -> str:
    """A filesystem- and key-safe id for an outside name (a file path, a tar member).

    Outside names never become paths: the id is a readable slug plus a hash of the full
    name, so `../x`, `a/b`, NUL and non-ASCII all map to distinct, harmless ids.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    slug = "".join(ch if (ch.isascii() and ch.isalnum()) else "_" for ch in text)[-40:].strip("_")
    return f"{prefix}{slug}_{digest}" if slug else f"{prefix}{digest}"


def portable_ref(ref: str | None) -> str | None:
    """A model reference as it goes into keys: a local path under the current folder is
    written relative to it, so a job shipped to another working folder keeps its keys."""
    if not ref or "://" in ref or not os.path.isabs(ref):
        return ref
    relative = os.path.relpath(ref, os.getcwd())
    return ref if relative.startswith("..") else relative
