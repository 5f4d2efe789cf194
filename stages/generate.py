"""generate: draw `x~` for every planned job with the job's named generator.

Jobs are grouped by reference, so a generator's per-reference work (ProFusion's
test-time fine-tuning, SID's feature extraction) is paid once per reference per unit.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pandas as pd

from factory.framework.config import FactoryConfig
from factory.framework.executor import Step, run_steps
from factory.framework.images import ImageRejected, decode_image, encode_jpeg
from factory.framework.stage import RunContext, Stage
from models.base import GenJob, lost_device, pick_device
from models.registry import build_generator

log = logging.getLogger(__name__)


class Generate(Stage):
    """Adds `target_image` (stored once, here), `generator_info`, `gpu_seconds` and the byte
    sizes of both images (publish cuts shards from sizes, without the bytes). SID rows get
    their `w_image` joined by `w_id` (null on bootstrap rows, which read nothing for it)."""

    name = "generate"
    source = "plan"
    needs_images = ("input_image", "w_image")
    draws_images = ("target_image",)
    adds = ("target_image", "input_bytes", "target_bytes", "generator_info", "gpu_seconds")
    shaped_by = ("references", "plan", "generate")

    def __init__(self, config: FactoryConfig):
        super().__init__(config)
        self.device = pick_device(config.generate.num_gpus)
        self._generators: dict[str, Any] = {}

    def setup(self) -> None:
        """The run's generator (a SID round's config names SID's: `stages.sid.round_context`)."""
        self.generator(self.config.plan.generator)

    def generator(self, name: str):
        if name not in self._generators:
            spec = self.config.generate.generators.get(name)
            if spec is None:
                raise KeyError(f"generator {name!r} is not configured under generate.generators")
            self._generators[name] = build_generator(name, with_batch_size(spec, self.config.generate.batch_size),
                                                     self.device, self.config.storage)
        return self._generators[name]

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        for column in ("target_image", "generator_info", "reject"):
            rows[column] = pd.Series([None] * len(rows), dtype=object, index=rows.index)
        rows["gpu_seconds"] = 0.0
        rows["input_bytes"] = [len(data) if isinstance(data, bytes) else 0 for data in rows["input_image"]]
        for (generator_name, _), group in rows.groupby(["generator", "reference_id"], sort=False):
            self._generate_group(rows, group, generator_name)
        rows["target_bytes"] = [len(data) if isinstance(data, bytes) else 0 for data in rows["target_image"]]
        return rows

    def _generate_group(self, rows: pd.DataFrame, group: pd.DataFrame, generator_name: str) -> None:
        first = group.iloc[0]
        try:
            reference = decode_image(first["input_image"], self.config.references.max_pixels)
        except ImageRejected as err:
            rows.loc[group.index, "reject"] = f"reference_{err.reason}"
            return
        built: dict[Any, GenJob] = {}
        for index, row in group.iterrows():  # a bad job or w rejects its own row, not the reference's
            try:
                built[index] = self._job(row)
            except ImageRejected as err:
                rows.at[index, "reject"] = f"w_{err.reason}"
            except ValueError:
                rows.at[index, "reject"] = "bad_job"
        if not built:
            return
        group, jobs = group.loc[list(built)], list(built.values())
        generator = self.generator(generator_name)
        started = time.perf_counter()
        try:
            results = generator.generate(reference, jobs)
        except Exception as err:  # one failing reference must not stop the unit
            if lost_device(err):
                raise
            log.warning("generator %s failed on reference %s: %s", generator_name, first["reference_id"], err)
            rows.loc[group.index, "reject"] = f"generator_error({type(err).__name__})"
            return
        share = (time.perf_counter() - started) / len(jobs)
        gpu_share = share * self.config.generate.num_gpus if self.device == "cuda" else 0.0
        described = generator.describe()
        for index, result in zip(group.index, results):
            rows.at[index, "generator_info"] = json.dumps({**described, **result.info}, sort_keys=True, default=str)
            if result.info.get("nsfw_flagged"):  # the pipeline's safety checker blacked the image out
                rows.at[index, "reject"] = "nsfw_flagged"
                continue
            rows.at[index, "target_image"] = encode_jpeg(result.image, self.config.generate.jpeg_quality)
            rows.at[index, "gpu_seconds"] = gpu_share
        self.count("gpu_seconds", gpu_share * len(jobs))
        for counter in ("unet_evals", "finetune_unet_evals"):
            self.count(counter, sum(float(result.info.get(counter, 0)) for result in results))

    @staticmethod
    def _job(row: pd.Series) -> GenJob:
        """The job of one row; ImageRejected for a `w_id` whose image is missing or undecodable."""
        w_image = None
        w_id, w_data = row.get("w_id"), row.get("w_image")
        if isinstance(w_data, (bytes, bytearray)) and w_data:
            w_image = decode_image(w_data)
        elif isinstance(w_id, str) and w_id:
            raise ImageRejected("missing", f"no stored image for w_id {w_id!r}")
        alpha = row.get("alpha")
        return GenJob(
            template=row["template"],
            subject=row["subject"],
            instruction=row["instruction"],
            seed=int(row["seed"]),
            alpha=None if alpha is None or pd.isna(alpha) else float(alpha),
            w_image=w_image,
        )


def with_batch_size(spec, batch_size: int):
    """The spec with `generate.batch_size` as its `options.batch_size` (jobs sampled together)
    unless the generator's own options set one."""
    if "batch_size" in spec.options:
        return spec
    return spec.model_copy(update={"options": {**spec.options, "batch_size": batch_size}})


def run(ctx: RunContext) -> dict[str, Any]:
    """Draw every unit's candidates (an actor pool over units)."""
    return run_steps(ctx, [Step("generate", Generate)])
