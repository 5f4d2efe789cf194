"""`python -m factory.versions {list,show,verify,union,rethreshold,report,review,status}`: manage dataset versions.

Exit codes: 0 done; 1 the work failed or found a problem (`verify` found a damaged shard, `list`
met an unreadable manifest: it prints the other versions and a `BAD <version>: <reason>` line);
2 bad input or a refusal (a name that breaks the name rule, a bad `--threshold`, an unknown or
malformed version, a version that exists already), always a one-line `error:` and no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import ray

from factory.dataset.manifest import (
    VersionError,
    VersionSpec,
    load_manifest,
    scan_versions,
    union_versions,
    verify_version,
)
from factory.framework.config import ConfigError, load_config
from factory.framework.executor import raised_error
from factory.framework.layout import check_name, dataset_dir, run_dir
from factory.framework.storage import StorageError, open_storage
from factory.framework.units import plan_exists
from factory.report import write_report
from factory.rethreshold import parse_thresholds, rethreshold_version
from factory.review.export import export_review
from factory.review.publish import ignored_text, import_review
from factory.review.studio import ReviewError
from factory.run import init_ray
from factory.status import run_status, status_lines


def cmd_list(storage, config, args) -> int:
    manifests, bad = scan_versions(storage, config.dataset)
    for manifest in manifests:
        parents = ",".join(map(str, manifest["parents"])) or "-"
        print(f"{manifest['version']:<24} {manifest['kind']:<11} {manifest['samples']:>9} samples  "
              f"parents {parents}  {manifest['created']}")
    for version, reason in sorted(bad.items()):
        print(f"BAD {version}: {reason}")
    if not manifests and not bad:  # a mistyped root or dataset would otherwise print nothing at all
        print(f"no versions of dataset {config.dataset!r} in {storage.url(dataset_dir(config.dataset))}",
              file=sys.stderr)
    return 1 if bad else 0


def cmd_show(storage, config, args) -> int:
    manifest = load_manifest(storage, config.dataset, args.version)
    if not args.full:
        manifest = {key: value for key, value in manifest.items() if key != "config"}
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def cmd_verify(storage, config, args) -> int:
    problems = verify_version(storage, config.dataset, args.version)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"version {config.dataset}/{args.version}: {len(problems)} problem(s)")
        return 1
    manifest = load_manifest(storage, config.dataset, args.version)
    print(f"version {config.dataset}/{args.version}: OK ({manifest['samples']} samples, "
          f"{len(manifest['shards'])} shards)")
    return 0


def cmd_union(storage, config, args) -> int:
    spec = VersionSpec(dataset=config.dataset, version=args.name, kind="union", parents=args.parents,
                       config=config.snapshot(), config_sha256=config.sha256())
    manifest = union_versions(storage, spec)
    print(f"version {config.dataset}/{args.name}: union of {', '.join(args.parents)}, {manifest['samples']} samples")
    return 0


def cmd_rethreshold(storage, config, args) -> int:
    thresholds = parse_thresholds(args.threshold)
    load_manifest(storage, config.dataset, args.version)  # a missing or malformed parent: before Ray starts
    started_ray = config.publish.executor == "ray" and not ray.is_initialized()
    if started_ray:
        init_ray(config)  # the child's shards are written by a Ray job
    try:
        manifest = rethreshold_version(storage, config, args.version, args.name, thresholds)
    finally:
        if started_ray:
            ray.shutdown()
    print(f"version {config.dataset}/{args.name}: {manifest['samples']} of the parent's samples pass "
          f"{manifest['thresholds']}")
    return 0


def cmd_status(storage, config, args) -> int:
    if not plan_exists(storage, args.run) and not storage.list(run_dir(args.run)):
        raise ValueError(f"run {args.run!r} has nothing under {storage.url(run_dir(args.run))}: "
                         "no such run in this storage root")
    status = run_status(storage, config, args.run)
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else "\n".join(status_lines(status)))
    return 0


def cmd_report(storage, config, args) -> int:
    started = time.perf_counter()
    path = write_report(storage, config.dataset, args.version, args.out)
    print(f"version {config.dataset}/{args.version}: report {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_review(storage, config, args) -> int:
    dataset, version = split_version(config.dataset, args.version)
    if args.action == "export":
        record = export_review(storage, dataset, version, args.url, args.rejected, args.margin, args.seed)
        print(f"version {dataset}/{version}: {record['tasks']} tasks ({record['frame']['sampled']} rejected "
              f"candidates of {record['frame']['size']} near the thresholds) in Label Studio project "
              f"{record['project_id']} at {record['url']}")
        return 0
    manifest, new = import_review(storage, dataset, version, args.url, args.project, args.name)
    review = manifest["review"]
    state = "published" if new else "already published (same votes): nothing new"
    print(f"version {dataset}/{manifest['version']}: {state}; {manifest['samples']} of "
          f"{manifest['funnel']['parent_samples']} samples kept by {review['reviewers']} reviewer(s); "
          f"precision {review['precision']['value']}, recall estimate {review['recall_estimate']['value']}, "
          f"agreement {review['agreement']['pairwise']}")
    print(f"ignored annotations: {ignored_text(review)}; reasons cut to {review.get('reason_limit')} characters: "
          f"{review.get('reasons_capped', 0)}")
    return 0


def split_version(dataset: str, name: str) -> tuple[str, str]:
    """`DATASET/VERSION` or a bare `VERSION` of the config's dataset; both parts follow the name rule."""
    if "/" in name:
        dataset, name = name.split("/", 1)
    return check_name(dataset, "review DATASET"), check_name(name, "review VERSION")


COMMANDS = {"list": cmd_list, "show": cmd_show, "verify": cmd_verify, "union": cmd_union,
            "rethreshold": cmd_rethreshold, "report": cmd_report, "review": cmd_review, "status": cmd_status}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m factory.versions", description=__doc__)
    parser.add_argument("--config", help="YAML config (default: the embedded demo); names storage and dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list versions")
    show = sub.add_parser("show", help="print a manifest")
    show.add_argument("version")
    show.add_argument("--full", action="store_true", help="include the config snapshot")
    verify = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    verify.add_argument("version")
    union = sub.add_parser("union", help="a version made of other versions' shards (copies nothing)")
    union.add_argument("name")
    union.add_argument("parents", nargs="+")
    rethreshold = sub.add_parser("rethreshold", help="a child version with stricter thresholds, from stored scores")
    rethreshold.add_argument("version")
    rethreshold.add_argument("name")
    rethreshold.add_argument("--threshold", action="append", required=True, metavar="RULE=VALUE",
                             help="e.g. --threshold clip_t=0.32 --threshold dino=0.65")
    report = sub.add_parser("report", help="write an HTML report (funnel, scores, cost, lineage, gallery)")
    report.add_argument("version")
    report.add_argument("--out", help="output folder (default: reports/<dataset>/<version>/)")
    status = sub.add_parser("status", help="how far a run is, from storage alone: units, funnel, rate, ETA, cost, lock")
    status.add_argument("run", help="the run id")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts and dashboards")
    add_review_parser(sub)
    return parser.parse_args(argv)


def bounded(kind: type, low: float, high: float):
    """An argparse type: a finite `kind` in [low, high], else argparse's exit 2 naming the option."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not in [{low}, {high}]")
        return value
    return parse


def add_review_parser(sub) -> None:
    review = sub.add_parser("review", help="human review in Label Studio (token in LABEL_STUDIO_API_KEY)")
    actions = review.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="a Label Studio project with one task per sample")
    export.add_argument("version", help="VERSION or DATASET/VERSION")
    export.add_argument("--url", help="Label Studio server (default: $LABEL_STUDIO_URL)")
    export.add_argument("--rejected", type=bounded(int, 0, 1_000_000), default=0, metavar="N",
                        help="also send N filter-rejected candidates near the thresholds (for the recall estimate)")
    export.add_argument("--margin", type=bounded(float, 0, 2), default=0.05,
                        help="how near a threshold a rejection must be (a cosine distance, in [0, 2])")
    export.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seed of the rejected sample")
    imported = actions.add_parser("import", help="publish a `reviewed` version of the samples people kept")
    imported.add_argument("version", help="VERSION or DATASET/VERSION (the version that was exported)")
    imported.add_argument("--url", help="Label Studio server (default: the one exported to)")
    imported.add_argument("--project", type=bounded(int, 1, 2**63 - 1),
                          help="Label Studio project id (default: the newest export)")
    imported.add_argument("--name", help="name of the reviewed version (default: VERSION-reviewed-<votes digest>)")


NAMED_ARGUMENTS = {  # the arguments of each command that name a version, and how errors call them
    "show": {"version": "VERSION"}, "verify": {"version": "VERSION"}, "report": {"version": "VERSION"},
    "status": {"run": "status RUN"},
    "union": {"name": "union NAME", "parents": "union PARENT"},
    "rethreshold": {"version": "rethreshold VERSION", "name": "rethreshold NAME"},
}


def check_names(args) -> None:
    """Every version name on the command line follows the name rule, before any work."""
    for attribute, what in NAMED_ARGUMENTS.get(args.command, {}).items():
        value = getattr(args, attribute)
        for name in value if isinstance(value, list) else [value]:
            check_name(name, what)
    if args.command == "review":
        split_version("demo", args.version)  # checks both parts of DATASET/VERSION (a bare VERSION: the config's)
        if getattr(args, "name", None) is not None:
            check_name(args.name, "review import --name")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_names(args)
        config = load_config(args.config, args.overrides)
        storage = open_storage(config.storage)
        return COMMANDS[args.command](storage, config, args)
    except BrokenPipeError:  # the reader went away (`show --full | head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise again
        return 0
    except (ConfigError, VersionError, StorageError, ValueError, ReviewError) as err:
        print(f"error: {raised_error(err)[1]}", file=sys.stderr)
        return 2
    except Exception as err:  # the work failed: say what, no traceback (bad input is refused above)
        kind, message = raised_error(err)
        print(f"error: {args.command} failed: {kind}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
