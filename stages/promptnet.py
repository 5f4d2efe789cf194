"""promptnet: pre-train ProFusion's PromptNet encoder on a reference set, on Ray Train.

ProFusion's encoder was pre-trained before any candidate was drawn (its train.py: SD2-base,
lr 2e-5, batch 8, 80k steps on FFHQ); the bootstrap then fine-tunes a copy of it per reference.
This stage trains it on `promptnet.reference_set` (default `references.set`) for the Stable
Diffusion model of the `promptnet.generator` entry and writes the checkpoint to
`promptnet.output` (default `<storage root>/checkpoints/promptnet/<run-id>`), which the
generator's `checkpoint` setting then names. The training is `models.training.promptnet`.
"""

from __future__ import annotations

import logging
from typing import Any

from factory.framework import layout
from factory.framework.config import ConfigError
from factory.framework.stage import RunContext
from models.training.promptnet import make_promptnet_job, refuse_trained_output, train_promptnet_on_ray

log = logging.getLogger(__name__)


def run(ctx: RunContext) -> dict[str, Any]:
    job = make_promptnet_job(ctx.config, ctx.storage)
    if job.reference_summary is None:
        raise ConfigError(f"reference set {job.reference_set!r} is not complete (never built, or being rebuilt: "
                          f"{ctx.storage.url(layout.reference_complete(job.reference_set))} is missing); "
                          "build it with --stage references first")
    refuse_trained_output(job)
    log.info("training PromptNet for %s on reference set %s: %d steps, %d workers", job.model, job.reference_set,
             job.config.steps, job.config.num_workers)
    record = train_promptnet_on_ray(job)
    generator = ctx.config.promptnet.generator
    print(f"PromptNet written to {job.output}; draw with it: "
          f"--set generate.generators.{generator}.checkpoint={job.output}", flush=True)
    return {"checkpoint": job.output, "steps": record["steps"], "references": record["references"],
            "loss": record["loss"]}
