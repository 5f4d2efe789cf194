"""Scheduled cluster jobs: specs as data (jobs/specs.yaml), submitted through Ray's job API."""

from jobs.spec import JobSpec, SpecError, load_specs
from jobs.submit import SubmitError, SubmitResult, submit_spec

__all__ = ["JobSpec", "SpecError", "SubmitError", "SubmitResult", "load_specs", "submit_spec"]
