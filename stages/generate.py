"""generate: draw `x~` for every planned job with the job's named generator.

Jobs are grouped by reference, so a generator's per-reference work (ProFusion's
test-time fine-tuning, SID's feature extraction) is paid once per reference per unit.
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from typing import Any

import pandas as pd

from factory.config import FactoryConfig
from factory.context import RunContext
from factory.images import ImageRejected, decode_image, encode_jpeg
from models.base import GenJob, pick_device

log = logging.getLogger(__name__)


class Generate:
    """Stage callable: rows in, the same rows out with `input_image`, `target_image`, ..."""

    def __init__(self, config: FactoryConfig):
        self.config = config
        self.ctx = RunContext(config)
        self.device = pick_device(config.generate.num_gpus)
        self._generators: dict[str, Any] = {}
        self._reference_part = lru_cache(maxsize=4)(self._load_part)

    def generator(self, name: str):
        if name not in self._generators:
            from models.registry import build_generator

            spec = self.config.generate.generators.get(name)
            if spec is None:
                raise KeyError(f"generator {name!r} is not configured under generate.generators")
            self._generators[name] = build_generator(name, spec, self.device)
        return self._generators[name]

    def _load_part(self, part_key: str) -> dict[str, bytes]:
        table = self.ctx.storage.read_parquet(part_key).select(["reference_id", "image"])
        return dict(zip(table.column("reference_id").to_pylist(), table.column("image").to_pylist()))

    def reference_bytes(self, row: pd.Series) -> bytes | None:
        return self._reference_part(row["reference_part"]).get(row["reference_id"])

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        for column in ("input_image", "target_image", "generator_info"):
            rows[column] = pd.Series([None] * len(rows), dtype=object)
        rows["gpu_seconds"] = 0.0
        alive = rows[rows["reject_reason"].isna()]
        for (generator_name, _), group in alive.groupby(["generator", "reference_id"], sort=False):
            self._generate_group(rows, group, generator_name)
        return rows

    def _generate_group(self, rows: pd.DataFrame, group: pd.DataFrame, generator_name: str) -> None:
        first = group.iloc[0]
        try:
            reference_bytes = self.reference_bytes(first)
            reference = decode_image(reference_bytes, self.config.references.max_pixels)
            jobs = [self._job(row) for _, row in group.iterrows()]
        except (ImageRejected, ValueError) as err:
            reason = getattr(err, "reason", "bad_job")
            self._reject(rows, group.index, f"reference_{reason}" if isinstance(err, ImageRejected) else reason)
            return
        generator = self.generator(generator_name)
        started = time.perf_counter()
        try:
            results = generator.generate(reference, jobs)
        except Exception as err:  # one failing reference must not stop the unit
            log.warning("generator %s failed on reference %s: %s", generator_name, first["reference_id"], err)
            self._reject(rows, group.index, f"generator_error:{type(err).__name__}")
            return
        share = (time.perf_counter() - started) / len(jobs)
        gpu_share = share * self.config.generate.num_gpus if self.device == "cuda" else 0.0
        described = generator.describe()
        for index, result in zip(group.index, results):
            rows.at[index, "input_image"] = reference_bytes
            rows.at[index, "target_image"] = encode_jpeg(result.image, self.config.generate.jpeg_quality)
            rows.at[index, "generator_info"] = json.dumps({**described, **result.info}, sort_keys=True, default=str)
            rows.at[index, "gpu_seconds"] = gpu_share

    @staticmethod
    def _job(row: pd.Series) -> GenJob:
        w_image = None
        if "w_image" in row and isinstance(row["w_image"], (bytes, bytearray)) and row["w_image"]:
            w_image = decode_image(row["w_image"])
        alpha = row.get("alpha")
        return GenJob(
            template=row["template"],
            subject=row["subject"],
            instruction=row["instruction"],
            seed=int(row["seed"]),
            alpha=None if alpha is None or pd.isna(alpha) else float(alpha),
            w_image=w_image,
        )

    @staticmethod
    def _reject(rows: pd.DataFrame, index, reason: str) -> None:
        rows.loc[index, "reject_stage"] = "generate"
        rows.loc[index, "reject_reason"] = reason


def run(ctx: RunContext) -> dict[str, Any]:
    from factory.pipeline import STEPS, run_steps

    return run_steps(ctx, [STEPS["generate"]])
