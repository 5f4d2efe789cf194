"""`python -m jobs {list,submit,cron,token}`: scheduled cluster jobs.

  python -m jobs list
  python -m jobs submit NAME [--address URL] [--no-wait] [--follow] [--config FILE] [--set key=value ...]
  python -m jobs cron [--project-dir DIR] [--python PATH] [--log-dir DIR] [--address URL] [--container NAME]
  python -m jobs token --ssm-parameter NAME [--region R] [--out PATH]

`submit` exits 0 when the job SUCCEEDED, 1 when it FAILED, 3 when it was STOPPED
(or ran past its timeout_s) and 2 when it could not be submitted. Every command exits 2 for bad
input (a spec, name or `--set` that does not validate) and 1 when its work failed, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys

from jobs import schedule
from jobs.spec import SpecError, get_spec, load_specs
from jobs.submit import EXIT_ERROR, EXIT_FAILED, SubmitError, submit_spec


def cmd_list(args: argparse.Namespace) -> int:
    for spec in load_specs(args.specs).values():
        print(f"{spec.name:<16} {spec.schedule or 'on demand':<14} {spec.entrypoint}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    spec = get_spec(load_specs(args.specs), args.name)
    result = submit_spec(
        spec, address=args.address, overrides=args.overrides, config=args.config, wait=not args.no_wait,
        stream=args.follow, poll_s=args.poll_s,
    )
    if args.no_wait:
        print(result.job_id)
    else:
        print(f"job {result.job_id} ended {result.status}", flush=True)
    return result.exit_code


def cmd_cron(args: argparse.Namespace) -> int:
    specs = load_specs(args.specs)
    lines = schedule.cron_lines(
        specs, args.project_dir, args.python, args.log_dir, args.address or None, args.container or None
    )
    print("\n".join(lines))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from jobs.auth_token import TokenFileError, fetch_token, write_token  # boto3 only when needed

    try:
        path = write_token(fetch_token(args.ssm_parameter, region=args.region), args.out)
    except TokenFileError as err:
        raise SubmitError(str(err)) from None
    print(f"Ray auth token from SSM parameter {args.ssm_parameter} written to {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m jobs", description=__doc__.split("\n\n")[0])
    top.add_argument("--specs", help="job spec file (default: jobs/specs.yaml)")
    commands = top.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="list the job specs").set_defaults(run=cmd_list)

    submit = commands.add_parser("submit", help="submit a job and wait for its end")
    submit.add_argument("name")
    submit.add_argument("--address", help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, "
                        "$RAY_ADDRESS, http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs while waiting")
    submit.add_argument("--config", help="run the job with this config file instead of the spec's "
                        "(a path inside the working dir, e.g. configs/staging.yaml)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override appended to the entrypoint as --set KEY=VALUE")
    submit.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    submit.set_defaults(run=cmd_submit)

    cron = commands.add_parser("cron", help="print crontab lines for the scheduled jobs")
    cron.add_argument("--project-dir", default=schedule.DEFAULT_PROJECT_DIR)
    cron.add_argument("--python", default=schedule.DEFAULT_PYTHON)
    cron.add_argument("--log-dir", default=schedule.DEFAULT_LOG_DIR)
    cron.add_argument("--address", default=schedule.DEFAULT_CRON_ADDRESS,
                      help="Ray dashboard URL the cron host reaches ('' to use $RAY_ADDRESS)")
    cron.add_argument("--container", default=schedule.DEFAULT_CONTAINER,
                      help="run the submit inside this docker container ('' for none)")
    cron.set_defaults(run=cmd_cron)

    token = commands.add_parser("token", help="fetch the cluster's Ray auth token from SSM")
    token.add_argument("--ssm-parameter", required=True)
    token.add_argument("--region")
    token.add_argument("--out", help="token file (default: ~/.ray/auth_token)")
    token.set_defaults(run=cmd_token)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (SpecError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # the work failed (SSM unreachable, ...): say what, no traceback
        print(f"error: {args.command} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
