"""Generator work per candidate, in UNet evaluations, at a config's settings.

    python bench/generator_work.py [--config configs/production.yaml] [--jobs N] [--no-results]

A UNet evaluation is one image's row through the denoising UNet (a classifier-free guidance
batch of [uncond, cond] is two). How many a candidate costs depends on the settings (steps,
guidance passes, fusion refinements, fine-tuning steps and batch, jobs per reference), not on
the machine or the weights, so this runs every generator the config names over the demo's
tiny random-weight models (the same classes and code as production) with that config's
sampling settings, draws `plan.jobs_per_reference` candidates for one reference with each, and
prints what the candidates' own `info` reports: the counts `generate` sums into each unit and
the manifests sum per accepted sample. ProFusion's fine-tuning counts forward rows (each also
pays its backward, about two forwards more); it is paid once per reference and shared by that
reference's jobs. G draws with a retrieved `w` and an alpha, as SID does. IP-Adapter is tuning-free:
classifier-free guidance only (its image tokens ride along in the same UNet rows).

Per accepted sample divides by a pass rate: the paper's bootstrap rate (207K of 3M ProFusion
candidates kept, section 4.1) for every generator, so the columns compare the generators, not
their filters; `--pass-rate` sets another.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PAPER_PASS_RATE = 207_000 / 3_000_000
TINY_IMAGE_SIZE = 64


def tiny_specs(config, folder: Path) -> dict:
    """The config's generators with their models swapped for tiny ones; settings kept."""
    from factory.tiny.cafe import build_tiny_cafe_generator
    from factory.tiny.ip_adapter import build_tiny_ip_adapter
    from factory.tiny.sd import build_tiny_promptnet, build_tiny_sd

    sd = build_tiny_sd(folder / "sd")
    checkpoints = {"profusion": lambda: build_tiny_promptnet(folder / "promptnet", sd),
                   "cafe": lambda: build_tiny_cafe_generator(folder / "cafe"),
                   "ip_adapter": lambda: build_tiny_ip_adapter(folder / "ip-adapter", sd)}
    specs = {}
    for name, spec in config.generate.generators.items():
        if spec.kind not in checkpoints:
            print(f"[{name}] kind {spec.kind!r}: no tiny model to count with, skipped")
            continue
        checkpoint = checkpoints[spec.kind]()
        model = checkpoint if spec.kind == "cafe" else sd
        options = {key: value for key, value in spec.options.items() if key != "image_encoder"}
        specs[name] = spec.model_copy(update={"model": model, "checkpoint": None if spec.kind == "cafe" else checkpoint,
                                              "image_size": TINY_IMAGE_SIZE, "options": options})
    return specs


def jobs_for(kind: str, count: int, w_image) -> list:
    from models.base import GenJob

    sid = {"alpha": 0.5, "w_image": w_image} if kind == "cafe" else {}
    return [GenJob("a photo of {subject} on the beach", "dog", "a photo of a dog on the beach", seed, **sid)
            for seed in range(count)]


def photo(seed: int):
    import io

    from PIL import Image

    from bench.synthetic import photo_like_jpeg

    return Image.open(io.BytesIO(photo_like_jpeg(seed, 96))).convert("RGB")


def count(name: str, spec, batch_size: int, jobs: int) -> dict[str, float]:
    from models.registry import build_generator
    from stages.generate import with_batch_size

    generator = build_generator(name, with_batch_size(spec, batch_size))
    infos = [result.info for result in generator.generate(photo(1), jobs_for(spec.kind, jobs, photo(2)))]
    sampling = sum(info["unet_evals"] for info in infos) / len(infos)
    finetune = sum(info["finetune_unet_evals"] for info in infos) / len(infos)
    return {"sampling": sampling, "finetune": finetune, "per_reference_finetune": finetune * len(infos)}


def describe(spec) -> str:
    options = spec.options
    if spec.kind == "profusion":
        return (f"{spec.steps} steps, fusion {options.get('fusion', True)}, "
                f"refine_steps {options.get('refine_steps', 1)}, "
                f"finetune {options.get('finetune_steps', 50)} steps x batch {options.get('finetune_batch_size', 2)}")
    if spec.kind == "ip_adapter":
        return f"{spec.steps} steps, scale {options.get('scale', 0.5)}, no fine-tuning"
    return f"{spec.steps} steps"


def main(argv: list[str] | None = None) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from factory.framework.config import load_config

    for library in (diffusers_logging, transformers_logging):  # load reports of the tiny models: noise here
        library.set_verbosity_error()
        library.disable_progress_bar()

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "production.yaml"))
    parser.add_argument("--jobs", type=int, help="candidates per reference (default: plan.jobs_per_reference)")
    parser.add_argument("--pass-rate", type=float, default=PAPER_PASS_RATE)
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config)
    jobs = args.jobs or config.plan.jobs_per_reference or 4
    lines = [f"generator_work: {Path(args.config).name}, {jobs} jobs per reference, pass rate {args.pass_rate:.4f}",
             f"  {'generator':<12} {'kind':<10} {'sampling':>9} {'fine-tune':>10} {'per cand.':>10} "
             f"{'per accepted':>13}  settings"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name, spec in tiny_specs(config, Path(scratch)).items():
            work = count(name, spec, config.generate.batch_size, jobs)
            total = work["sampling"] + work["finetune"]
            lines.append(f"  {name:<12} {spec.kind:<10} {work['sampling']:>9.1f} {work['finetune']:>10.2f} "
                         f"{total:>10.1f} {total / args.pass_rate:>13.0f}  {describe(spec)}")
            print(lines[-1], flush=True)
    if not args.no_results:
        section = [f"## generator_work: UNet evaluations per candidate, {date.today().isoformat()}", "", "```",
                   *lines, "```", ""]
        with Path(args.results).open("a") as handle:
            handle.write("\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
