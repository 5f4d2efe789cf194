"""references stage: ingest reference images into a reference set (`factory.dataset.reference_sets`).

The sources and how a candidate is named and given a subject are in `factory.dataset.reference_sources`;
the generated ones are drawn by `models.sd_drawer` (`Drawer`, below). The stage lists
every candidate (errors that make the whole stage pointless are raised before any image is read),
then reads or draws them a part at a time.

Every image is decoded by `factory.framework.images.decode_image` (size checked before decoding, EXIF
rotation applied, every mode to RGB), refused when too flat ("degenerate_image"), fit within
`store_size` and re-encoded as JPEG. One bad input is one counted rejection, never a stop.
Parts hold `part_size` references sorted by id, so the same inputs give byte-identical parts;
`references/<set>/rejections.parquet` lists every rejection (reference_id, source, origin, reason).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from factory.dataset.reference_sets import write_parts, write_rejections
from factory.dataset.reference_sources import (
    SHARD_ERRORS,
    Candidate,
    ReferencesError,
    folder_candidates,
    generated_candidates,
    s3_candidates,
    webdataset_candidates,
)
from factory.framework import layout
from factory.framework.executor import MapStep, Resume, run_resumable
from factory.framework.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.framework.stage import RunContext, settings_named
from factory.framework.storage import S3Storage, Storage, StorageError
from models.sd_drawer import StableDiffusionDrawer

if TYPE_CHECKING:
    from factory.framework.config import FactoryConfig, ReferencesConfig

log = logging.getLogger(__name__)


class Rejected(Exception):
    """One input that cannot become a reference; `reason` is a countable tag."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def run(ctx: RunContext) -> dict:
    """Ingest every configured source into the reference set; return the counts."""
    cfg = ctx.config.references
    ctx.storage.delete(layout.reference_complete(cfg.set))  # the set is incomplete until this run finishes
    rejections: list[dict] = []
    candidates = usable_candidates(list_candidates(ctx), rejections)
    generated = [c for c in candidates if c.source == "generated"]
    drawer = Drawer(ctx.config, ctx.storage, generated) if generated else None
    parts = write_parts(ctx.storage, cfg.set, ingest(candidates, cfg, drawer, rejections), cfg.part_size)
    write_rejections(ctx.storage, cfg.set, rejections)
    summary = {
        "set": cfg.set,
        "references": parts.count,
        "parts": parts.files,
        "digest": parts.digest,
        "rejected": dict(sorted(Counter(r["reason"] for r in rejections).items())),
    }
    ctx.storage.write_bytes(layout.reference_complete(cfg.set), json.dumps(summary, sort_keys=True).encode())
    log.info("references %s: %d stored in %d parts, rejected %s",
             cfg.set, parts.count, parts.files, summary["rejected"])
    return summary


def list_candidates(ctx: RunContext) -> list[Candidate]:
    """Every candidate of every source, sorted by id; listing errors are raised here, before any work."""
    cfg = ctx.config.references
    found: list[Candidate] = []
    for source in cfg.sources:
        if source.kind == "folder":
            found.extend(folder_candidates(source, cfg))
        elif source.kind == "s3":
            found.extend(s3_candidates(source, S3Storage(source.path, ctx.config.storage), cfg))
        elif source.kind == "webdataset":
            found.extend(webdataset_candidates(source, cfg))
        else:
            found.extend(generated_candidates(source, cfg))
    return sorted(found, key=lambda c: (c.reference_id, c.origin))


def usable_candidates(candidates: list[Candidate], rejections: list[dict]) -> list[Candidate]:
    """The candidates to read or draw, in id order; the others (repeated ids, refused when listed)
    appended to `rejections`."""
    seen: set[str] = set()
    usable: list[Candidate] = []
    for candidate in candidates:
        if candidate.reference_id in seen:
            rejections.append(rejection(candidate, "duplicate_reference"))
        elif candidate.reject:
            rejections.append(rejection(candidate, candidate.reject))
        else:
            usable.append(candidate)
        seen.add(candidate.reference_id)
    return usable


def ingest(candidates: list[Candidate], cfg: ReferencesConfig, drawer: Drawer | None,
           rejections: list[dict]) -> Iterator[dict]:
    """Yield accepted rows in id order, a part's worth at a time; append every rejection to `rejections`."""
    with ThreadPoolExecutor(max_workers=cfg.io_threads) as pool:
        for start in range(0, len(candidates), cfg.part_size):
            chunk = candidates[start : start + cfg.part_size]
            drawn = drawer.draw([c for c in chunk if c.source == "generated"]) if drawer else {}
            for candidate, result in zip(chunk, pool.map(partial(load_one, drawn=drawn, cfg=cfg), chunk)):
                if isinstance(result, Rejected):
                    rejections.append(rejection(candidate, result.reason))
                else:
                    yield result


def load_one(candidate: Candidate, drawn: dict[str, bytes | Rejected], cfg: ReferencesConfig) -> dict | Rejected:
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
    except (StorageError, *SHARD_ERRORS) as err:
        log.warning("cannot read reference %s: %s", candidate.reference_id, type(err).__name__)
        return Rejected("read_error")
    except Exception:  # one bad file never stops the stage
        log.exception("unexpected error on reference %s", candidate.reference_id)
        return Rejected("unexpected_error")


def reference_row(candidate: Candidate, data: bytes, cfg: ReferencesConfig) -> dict:
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


class Drawer:
    """Draws the generated references with `models.sd_drawer`, `batch_size` at a time, in one
    stream over the whole ingest: in this process, or, with num_gpus > 0, concurrency > 1 or
    resources, on an actor pool run by the executor. `draw` takes the next candidates of the
    stream, in the order it was given. Finished chunks of drawings are kept under the set
    (`drawn/`), so an ingest run again after a kill redraws only the rest. A failed batch is
    counted, never a stop; a model that cannot be loaded stops the stage before any image is read."""

    def __init__(self, config: FactoryConfig, storage: Storage, candidates: list[Candidate]):
        cfg = config.references
        prompts = pd.DataFrame({"reference_id": [c.reference_id for c in candidates],
                                "prompt": [c.prompt for c in candidates], "seed": [c.seed for c in candidates]})
        step = MapStep.on_pool(StableDiffusionDrawer, (cfg, config.storage), cfg, batch_size=cfg.batch_size)
        settings = settings_named(config, "references.sd_")
        resume = Resume(storage, layout.reference_drawn(cfg.set), settings, inputs=("reference_id", "prompt", "seed"),
                        chunk_rows=cfg.batch_size)
        self.drawn: deque[tuple[str, bytes | None, str | None]] = deque()
        try:
            self.stream = run_resumable(prompts, [step], resume, on_ray=cfg.drawn_on_actors())
            self.pull()  # the model loads now, before any image is read
        except Exception as err:
            raise ReferencesError(
                f"cannot load the Stable Diffusion pipeline references.sd_model={cfg.sd_model!r}: "
                f"{type(err).__name__}: {err}"
            ) from None

    def pull(self) -> bool:
        frame = next(self.stream, None)
        if frame is None:
            return False
        self.drawn.extend(zip(frame["reference_id"], frame["image"], frame["error"]))
        return True

    def draw(self, candidates: list[Candidate]) -> dict[str, bytes | Rejected]:
        while len(self.drawn) < len(candidates) and self.pull():
            pass
        drawn: dict[str, bytes | Rejected] = {}
        for candidate in candidates:
            ident, image, error = self.drawn.popleft()
            if ident != candidate.reference_id:
                raise RuntimeError(f"the drawer returned {ident!r} where {candidate.reference_id!r} was next")
            drawn[ident] = image if image is not None else Rejected(error)
        return drawn
