"""`python -m factory.versions {list,show,verify,union,rethreshold,report,review}`: manage dataset versions."""

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
from factory.review.studio import ReviewError
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


def cmd_review(storage, config, args) -> int:
    from factory.review.export import export_review
    from factory.review.publish import ignored_text, import_review

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
    """`DATASET/VERSION` or a bare `VERSION` of the config's dataset."""
    if "/" in name:
        dataset, name = name.split("/", 1)
    return dataset, name


COMMANDS = {"list": cmd_list, "show": cmd_show, "verify": cmd_verify, "union": cmd_union,
            "rethreshold": cmd_rethreshold, "report": cmd_report, "review": cmd_review}


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
    add_review_parser(sub)
    return parser.parse_args(argv)


def add_review_parser(sub) -> None:
    review = sub.add_parser("review", help="human review in Label Studio (token in LABEL_STUDIO_API_KEY)")
    actions = review.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="a Label Studio project with one task per sample")
    export.add_argument("version", help="VERSION or DATASET/VERSION")
    export.add_argument("--url", help="Label Studio server (default: $LABEL_STUDIO_URL)")
    export.add_argument("--rejected", type=int, default=0, metavar="N",
                        help="also send N filter-rejected candidates near the thresholds (for the recall estimate)")
    export.add_argument("--margin", type=float, default=0.05, help="how near a threshold a rejection must be")
    export.add_argument("--seed", type=int, default=0, help="seed of the rejected sample")
    imported = actions.add_parser("import", help="publish a `reviewed` version of the samples people kept")
    imported.add_argument("version", help="VERSION or DATASET/VERSION (the version that was exported)")
    imported.add_argument("--url", help="Label Studio server (default: the one exported to)")
    imported.add_argument("--project", type=int, help="Label Studio project id (default: the newest export)")
    imported.add_argument("--name", help="name of the reviewed version (default: VERSION-reviewed-<votes digest>)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        storage = open_storage(config.storage)
        return COMMANDS[args.command](storage, config, args)
    except (ConfigError, VersionError, StorageError, ValueError, ReviewError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
