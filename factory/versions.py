"""`python -m factory.versions {list,show,verify,union,rethreshold,report}`: manage dataset versions."""

from __future__ import annotations

import argparse
import json
import sys

from factory.config import ConfigError, load_config
from factory.manifest import (
    VersionError,
    VersionSpec,
    list_versions,
    load_manifest,
    union_versions,
    verify_version,
)
from factory.storage import StorageError, open_storage


def cmd_list(storage, config, args) -> int:
    for manifest in list_versions(storage, config.dataset):
        parents = ",".join(manifest["parents"]) or "-"
        print(f"{manifest['version']:<24} {manifest['kind']:<11} {manifest['samples']:>9} samples  "
              f"parents {parents}  {manifest['created']}")
    return 0


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
    import ray

    from factory.rethreshold import rethreshold_version
    from factory.run import init_ray

    started_ray = config.publish.executor == "ray" and not ray.is_initialized()
    if started_ray:
        init_ray(config)  # the child's shards are written by a Ray job
    thresholds = dict(item.split("=", 1) for item in args.threshold)
    try:
        manifest = rethreshold_version(storage, config, args.version, args.name,
                                       {name: float(value) for name, value in thresholds.items()})
    finally:
        if started_ray:
            ray.shutdown()
    print(f"version {config.dataset}/{args.name}: {manifest['samples']} of the parent's samples pass "
          f"{manifest['thresholds']}")
    return 0


def cmd_report(storage, config, args) -> int:
    import time

    from factory.report import write_report

    started = time.perf_counter()
    path = write_report(storage, config.dataset, args.version, args.out)
    print(f"version {config.dataset}/{args.version}: report {path} ({time.perf_counter() - started:.1f} s)")
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "verify": cmd_verify, "union": cmd_union,
            "rethreshold": cmd_rethreshold, "report": cmd_report}


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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        storage = open_storage(config.storage)
        return COMMANDS[args.command](storage, config, args)
    except (ConfigError, VersionError, StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
