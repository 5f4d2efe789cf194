"""GPU-hours per 1M accepted quadruplets, from per-stage throughputs, next to the paper's figures.

    python bench/cost_model.py [--measured FILE] [--device-kind KIND] [--no-results]

A thin command line over `factory.cost` (the figures, their sources and the report live there;
`python -m factory.run --stage all --dry-run` prices a config's plan with the same figures).

Inputs, per GPU (A100 in the paper):
- generate: ProFusion's ~30 s test-time fine-tuning per reference, amortised over the jobs
  drawn per reference, plus the sampling seconds per image (or candidates/s directly);
- filter: candidates/s (CLIP ViT-B/32 + DINO ViT-S/16);
- dialogue: generated tokens/s of Llama-2-70B-chat on one tensor-parallel group of GPUs,
  tokens per accepted sample, attempts per sample;
- the filter's pass rate (accepted / generated).

Without --measured or --device-kind every input is the paper's figure, or a stated assumption
where the paper gives none (each row says which). --measured takes either a JSON of the input
names (any subset; the rest stay the paper's) or a version manifest (`manifest.json`, schema
factory.manifest/1) from a factory run, whose funnel and per-stage GPU-seconds give the
per-candidate costs and the pass rate. --device-kind takes the per-step seconds that
bench/real_size.py measured for that device kind (factory/cost_figures.json) at the paper's
50 steps. Not a test.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.cost import GeneratorSettings, apply_device_figures, load_inputs, read_figures, report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", help="JSON of measured inputs, or a factory version manifest.json")
    parser.add_argument("--device-kind", help="use bench/real_size.py's figures for this device kind")
    parser.add_argument("--figures", help="figures file (default: factory/cost_figures.json)")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="markdown file to append to")
    parser.add_argument("--no-results", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        inputs = load_inputs(args.measured)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.device_kind:
        devices = read_figures(args.figures)
        if args.device_kind not in devices:
            raise SystemExit(f"no figures for device kind {args.device_kind!r}; measured: {sorted(devices)}")
        apply_device_figures(inputs, args.device_kind, devices[args.device_kind], GeneratorSettings())
    lines = report(inputs)
    print("\n".join(lines))
    if not args.no_results:
        where = f"--measured {Path(args.measured).name}" if args.measured else "the paper's figures (no GPU lent)"
        section = [f"## cost_model: {where}, computed {date.today().isoformat()} on this CPU machine", "",
                   "```", *lines, "```", ""]
        with Path(args.results).open("a") as handle:
            handle.write("\n".join(section) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
