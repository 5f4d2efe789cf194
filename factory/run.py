"""`python -m factory.run --stage NAME [--config FILE] [--set key=value ...]`.

With no --config the embedded demo runs on this machine. The process joins the Ray
cluster named by $RAY_ADDRESS (as under `ray job submit`) or starts a local one; its
exit code is the job's status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import ray
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
from transformers.utils import logging as transformers_logging

import stages.dialogue
import stages.eval
import stages.filter
import stages.generate
import stages.plan
import stages.promptnet
import stages.publish
import stages.references
import stages.sid
import stages.train
from factory.dataset.instructions import load_bank
from factory.dataset.manifest import VersionError, latest_version, load_manifest
from factory.dataset.reference_sets import set_complete
from factory.demo import prepare_demo
from factory.estimate import dry_run as estimate_lines
from factory.framework.config import (
    QUIET_ENV,
    ConfigError,
    FactoryConfig,
    load_config,
    missing_promptnet_hint,
    untrained_promptnet,
)
from factory.framework.executor import Step, raised_error, run_steps, show_progress_bars
from factory.framework.models_cache import ModelUnavailable, describe_s3, is_s3
from factory.framework.stage import RunContext
from factory.progress import LOG_EVERY_SECONDS, progress_display
from filters.rules import RULES
from models.registry import options_problems

log = logging.getLogger("factory.run")

EntryPoint = Callable[[RunContext], dict[str, Any]]
# The stages this command line assembles, by `--stage` name ("all" is `run_all`, below).
STAGE_RUNS: dict[str, EntryPoint] = {
    "references": stages.references.run, "plan": stages.plan.run, "generate": stages.generate.run,
    "filter": stages.filter.run, "dialogue": stages.dialogue.run, "publish": stages.publish.run,
    "train": stages.train.run, "sid": stages.sid.run, "eval": stages.eval.run, "promptnet": stages.promptnet.run,
}
# generate -> filter -> dialogue, streamed unit by unit: `--stage all` runs them once, SID once per round
UNIT_STEPS = (Step("generate", stages.generate.Generate), Step("filter", stages.filter.Filter),
              Step("dialogue", stages.dialogue.Dialogue))
STAGES = (*STAGE_RUNS, "all")
NEEDS_RAY = {"generate", "filter", "dialogue", "publish", "all", "train", "sid", "eval", "promptnet"}
EXIT_FAILED, EXIT_CONFIG = 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def stage_entry(name: str) -> EntryPoint:
    return run_all if name == "all" else STAGE_RUNS[name]


def references_exist(ctx: RunContext) -> bool:
    return set_complete(ctx.storage, ctx.config.references.set)


def looks_local(value: str | None) -> bool:
    return bool(value) and value.startswith(("/", "./", "../", "~"))


def loaded_generators(config: FactoryConfig, stage: str) -> list[str]:
    """The configured generators the stage draws with (the others are alternatives it never loads)."""
    name = {"generate": config.plan.generator, "all": config.plan.generator,
            "promptnet": config.promptnet.generator, "sid": config.sid.generator}.get(stage)
    return [name] if name in config.generate.generators else []


def model_settings(config: FactoryConfig, stage: str) -> dict[str, str | None]:
    """Every model setting the stage will load, by config key."""
    keys = {"filter.clip_pretrained": config.filter.clip_pretrained,
            "filter.clip_model_config": config.filter.clip_model_config,
            "filter.dino_model": config.filter.dino_model}
    if config.dialogue.engine != "openai":
        keys["dialogue.model"] = config.dialogue.model
    if any(source.kind == "generated" for source in config.references.sources):
        keys["references.sd_model"] = config.references.sd_model
    for name in loaded_generators(config, stage):
        spec = config.generate.generators[name]
        keys[f"generate.generators.{name}.model"] = spec.model
        if stage != "promptnet":  # which writes it
            keys[f"generate.generators.{name}.checkpoint"] = spec.checkpoint
    if stage in ("train", "sid"):
        train = config.train
        keys.update({"train.base_model": train.base_model, "train.clip_model": train.clip_model,
                     "train.dino_model": train.dino_model, "train.init_from": train.init_from})
        if train.model == "assistant" or (stage == "sid" and config.sid.finetune_assistant):
            keys["train.llm_model"] = train.llm_model
        if stage == "sid" and config.sid.finetune_assistant:
            keys["sid.assistant_checkpoint"] = config.sid.assistant_checkpoint
    if stage == "eval":
        keys.update({f"eval.{name}": getattr(config.eval, name) for name in
                     ("clip_pretrained", "clip_model_config", "dino_model")})
    if stage == "promptnet":
        keys.update({"promptnet.init_from": config.promptnet.init_from,
                     "promptnet.image_encoder": config.promptnet.image_encoder})
    return keys


def check_inputs(config: FactoryConfig, stage: str) -> None:
    """Generator options, model paths (local, or S3 prefixes: listed, refused when empty) and the instruction bank,
    checked before any work; errors name the key."""
    refused = options_problems(config.generate.generators)  # before the models: a typo is said whatever is missing
    if refused:
        raise ConfigError("invalid generator options:\n" + "\n".join(refused))
    missing = []
    for key, value in model_settings(config, stage).items():
        if looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            missing.append(f"  {key}: {value} does not exist")
        elif is_s3(value):
            try:
                describe_s3(value, config.storage, key)
            except ModelUnavailable as err:
                missing.append(f"  {err}")
    if missing:
        raise ConfigError("models not found:\n" + "\n".join(missing) + missing_promptnet_hint(config, missing))
    if stage in ("generate", "all") and untrained_promptnet(config):
        raise ConfigError(untrained_promptnet(config))
    if stage in ("plan", "all"):
        load_bank(config.plan.instructions)


def check_named_versions(ctx: RunContext, stage: str) -> None:
    """The versions the config names for this stage (`train.version`, `sid.parent`) exist and their
    manifests read, before any work: `VersionError` naming the version otherwise."""
    config = ctx.config
    named = {"train": config.train.version, "sid": config.sid.parent}.get(stage)
    if named:
        load_manifest(ctx.storage, config.dataset, named)


def run_all(ctx: RunContext) -> dict[str, Any]:
    """references (when missing) -> plan -> generate/filter/dialogue streamed -> publish."""
    summary: dict[str, Any] = {}
    if not references_exist(ctx):
        summary["references"] = timed("references", stage_entry("references"), ctx)
    summary["plan"] = timed("plan", stage_entry("plan"), ctx)
    summary["pipeline"] = timed("generate->filter->dialogue", lambda c: run_steps(c, list(UNIT_STEPS)), ctx)
    summary["publish"] = timed("publish", stage_entry("publish"), ctx)
    return summary


def bootstrap_demo(ctx: RunContext) -> None:
    """SID and eval on the embedded demo start from the demo's bootstrap version: make it when missing."""
    config = ctx.config
    if config.sid.parent or latest_version(ctx.storage, config.dataset, kinds=("bootstrap", "union")):
        return
    log.info("demo: no bootstrap version yet, running --stage all first")
    timed("all", run_all, ctx)


COMPOUND = ("all", "sid")  # their parts print their own summary lines


def timed(label: str, entry: Callable[[RunContext], dict[str, Any]], ctx: RunContext) -> dict[str, Any]:
    started = time.perf_counter()
    result = entry(ctx) or {}
    seconds = time.perf_counter() - started
    detail = "" if label in COMPOUND else f": {json.dumps(result, default=str)}"
    print(f"[{label}] done in {seconds:.1f}s{detail}", flush=True)
    return result


def needs_ray(stage: str, config: FactoryConfig) -> bool:
    if stage == "publish":
        return config.publish.executor != "local"
    if stage == "plan":
        return config.plan.executor == "ray"
    if stage == "references":
        return config.references.drawn_on_actors() and any(s.kind == "generated" for s in config.references.sources)
    return stage in NEEDS_RAY


def init_ray(config: FactoryConfig) -> None:
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": dict(QUIET_ENV)}, **config.ray.local_cluster())
    show_progress_bars(sys.stderr.isatty())


def print_outcome(stage: str, result: dict[str, Any]) -> None:
    publish = result.get("publish") if stage in ("all", "sid") else result if stage == "publish" else None
    if not publish or "funnel" not in publish:
        return
    funnel = publish["funnel"]
    gates = ("planned", "generated", *(rule.funnel for rule in RULES.values()), "dialogue_accepted", "written")
    print("funnel: " + " -> ".join(f"{name} {funnel[name]}" for name in gates))
    for reason, count in funnel.get("rejections", {}).items():
        print(f"  rejected {count:>6}  {reason}")
    print(f"version {publish['version']}: {publish['samples']} samples, manifest at {publish['manifest']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m factory.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", help="YAML config (default: the embedded demo)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="publish even if some planned units have no output (the manifest says so)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set storage.root=s3://bucket/prefix")
    parser.add_argument("--dry-run", action="store_true",
                        help="print plan size, units and GPU-hours per stage (--stage all or sid); write nothing")
    parser.add_argument("--device-kind", help="with --dry-run: price with bench/real_size.py's figures for this "
                        "device kind (default: the paper's A100 figures)")
    parser.add_argument("--figures", help="with --dry-run: the measured figures file "
                        "(default: factory/cost_figures.json)")
    parser.add_argument("--progress-every", type=float, default=LOG_EVERY_SECONDS, metavar="SECONDS",
                        help="when stderr is not a terminal (Ray job logs): a progress line per unit stage this "
                        f"often (default {LOG_EVERY_SECONDS:g}; 0: none); a terminal shows live bars")
    return parser.parse_args(argv)


def dry_run(args: argparse.Namespace, config: FactoryConfig) -> int:
    """The bill before the run (`factory.estimate`): no Ray, no demo models, nothing written."""
    try:
        lines = estimate_lines(config, args.stage, args.config or "(embedded demo)", args.device_kind, args.figures)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print("\n".join(lines))
    return 0


def quiet_model_loading() -> None:
    """In this process what `QUIET_ENV` does for the workers (the libraries are already imported)."""
    os.environ.update(QUIET_ENV)
    disable_hub_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_model_loading()
    args = parse_args(argv)
    try:
        overrides = [*args.overrides, *(["publish.allow_partial=true"] if args.allow_partial else [])]
        config = load_config(args.config, overrides)
        if args.dry_run:
            return dry_run(args, config)
        entry = stage_entry(args.stage)
        if args.config is None:
            prepare_demo(config)
        progress = progress_display(sys.stderr.isatty(), args.progress_every, args.device_kind, args.figures)
        ctx = RunContext(config, unit_steps=UNIT_STEPS, progress=progress)
        ctx.storage.check()
        check_named_versions(ctx, args.stage)
        if args.stage in ("plan", "generate", "filter", "dialogue", "all", "train", "sid", "eval", "promptnet"):
            check_inputs(config, args.stage)
    except (ConfigError, VersionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if needs_ray(args.stage, config):
        init_ray(config)
    try:
        if args.stage in ("sid", "eval") and args.config is None:
            bootstrap_demo(ctx)
        result = timed(args.stage, entry, ctx)
    except ConfigError as err:  # a refusal found once the stage looked at what is stored (settings, formats)
        print(f"error: stage {args.stage} refused: {raised_error(err)[1]}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"interrupted: stage {args.stage} stopped; what it finished is kept, and the same command goes on "
              "from there", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        log.exception("stage %s failed", args.stage)
        kind, message = raised_error(err)
        print(f"error: stage {args.stage} failed: {kind}: {message}", file=sys.stderr)
        return EXIT_FAILED
    print_outcome(args.stage, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
