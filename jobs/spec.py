"""Scheduled cluster jobs as data: the `jobs/specs.yaml` schema and its loader.

A spec says what to run (entrypoint), with what (runtime_env, entrypoint resources) and
when (a five-field cron expression, UTC). Loading is strict: an unknown key, a bad cron
field or an env var that looks like a secret is an error naming the job and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.framework.config import SECRET_VALUE, credentials_in_url, read_yaml_file

DEFAULT_SPECS = Path(__file__).with_name("specs.yaml")

# Files a job never needs on the cluster; Ray also honours .gitignore and .rayignore.
DEFAULT_EXCLUDES = [".git", ".venv", "factory-data", "bench/out", "*.egg-info", "**/__pycache__", ".pytest_cache"]

SECRET_NAME = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|ACCESS_KEY|PRIVATE_KEY|API_?KEY)(_|$)|(^|_)(KEY|PAT)$", re.I
)
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
ENV_ASSIGNMENT = re.compile(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=")

CRON_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
CRON_ITEM = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?$")


def url_with_credentials(value: str) -> bool:
    return credentials_in_url(value) is not None


def secret_in_text(text: str) -> bool:
    """Whether a command line or free text holds a token, a URL with credentials or a secret env var set inline."""
    return bool(SECRET_VALUE.search(text) or any(url_with_credentials(url) for url in URL_IN_TEXT.findall(text))
                or any(SECRET_NAME.search(name) for name in ENV_ASSIGNMENT.findall(text)))


def no_secret_text(text: str) -> str:
    if secret_in_text(text):
        raise ValueError("holds what looks like a secret, which the cluster stores and `jobs list` prints: "
                         "credentials come from the instance role or a secret store on the cluster, never from a job")
    return text


def no_secret_entries(entries: dict[str, str]) -> dict[str, str]:
    """`entries` (env vars, metadata), refused where a name or a value looks like a secret."""
    for name, value in entries.items():
        if SECRET_NAME.search(name) or SECRET_VALUE.search(value) or url_with_credentials(value):
            raise ValueError(f"{name!r} looks like a secret: credentials come from the instance role "
                             "or a secret store on the cluster, never from a job spec")
    return entries


# what the cluster stores with a job and `jobs list` prints
PlainText = Annotated[str, AfterValidator(no_secret_text)]
PlainEntries = Annotated[dict[str, str], AfterValidator(no_secret_entries)]


class SpecError(ValueError):
    """A job spec problem, phrased for the person who wrote the spec."""


def plain_address(address: str) -> str:
    """The job server's address, refused (without repeating it) when it carries credentials."""
    held = credentials_in_url(address)
    if held:
        raise SpecError(f"the Ray job server address (--address, $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS) has "
                        f"{held}, which errors and crontabs would print: the job server takes the token "
                        "from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
    return address


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RuntimeEnvSpec(Strict):
    """The Ray runtime_env of the job; `working_dir` is relative to the current directory."""

    working_dir: PlainText = "."
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env_vars: PlainEntries = Field(default_factory=dict)
    pip: list[str] | None = None


class ResourcesSpec(Strict):
    """What the entrypoint (the driver) reserves; the stages ask for GPUs themselves."""

    entrypoint_num_cpus: float = Field(1.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)
    entrypoint_memory: int = Field(0, ge=0, description="bytes")
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)


class JobSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    description: str = ""
    schedule: str | None = Field(None, description="five-field cron expression, UTC; null: on demand")
    entrypoint: PlainText = Field(min_length=1)
    runtime_env: RuntimeEnvSpec = Field(default_factory=RuntimeEnvSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    timeout_s: int | None = Field(None, ge=1, description="stop the job when it runs longer")
    metadata: PlainEntries = Field(default_factory=dict)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str | None) -> str | None:
        if schedule is not None:
            check_cron(schedule)
        return schedule


class JobsFile(Strict):
    jobs: list[JobSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> JobsFile:
        names = [job.name for job in self.jobs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"job names must be unique; repeated: {', '.join(repeated)}")
        return self


def check_cron(expression: str) -> None:
    """Raise ValueError unless `expression` is a standard five-field cron expression."""
    fields = expression.split()
    if len(fields) != len(CRON_FIELDS):
        raise ValueError(f"cron expression {expression!r} needs 5 fields (minute hour day month weekday)")
    for text, (label, low, high) in zip(fields, CRON_FIELDS):
        for item in text.split(","):
            match = CRON_ITEM.match(item)
            numbers = [int(n) for n in re.findall(r"\d+", match.group(1))] if match else []
            step = int(match.group(3)[1:]) if match and match.group(3) else 1
            if not match or step < 1 or any(not low <= n <= high for n in numbers) or numbers != sorted(numbers):
                raise ValueError(f"cron {label} field {text!r} is not valid (allowed values {low}-{high})")


def load_specs(path: str | Path | None = None) -> dict[str, JobSpec]:
    """The job specs in `path` (default: jobs/specs.yaml), by name."""
    source = Path(path) if path else DEFAULT_SPECS
    raw = read_yaml_file(source, "job spec file", SpecError)
    if isinstance(raw, dict):  # top-level `x-...` keys hold YAML anchors (as in docker compose)
        raw = {key: value for key, value in raw.items() if not str(key).startswith("x-")}
    try:
        parsed = JobsFile.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"invalid job spec file {source}:\n{describe(err, raw)}") from None
    return {job.name: job for job in parsed.jobs}


def describe(err: ValidationError, raw: Any) -> str:
    lines = []
    for problem in err.errors():
        loc = list(problem["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        if loc[:1] == ["jobs"] and len(loc) > 1 and isinstance(loc[1], int):
            job = raw["jobs"][loc[1]]
            name = job.get("name", f"#{loc[1]}") if isinstance(job, dict) else f"#{loc[1]}"
            where = f"job {name}: " + (".".join(str(part) for part in loc[2:]) or "(the job)")
        message = {"extra_forbidden": "unknown key", "missing": "required field is missing"}.get(
            problem["type"], problem["msg"].removeprefix("Value error, ")
        )
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def get_spec(specs: dict[str, JobSpec], name: str) -> JobSpec:
    try:
        return specs[name]
    except KeyError:
        raise SpecError(f"no job named {name!r}; known: {', '.join(sorted(specs))}") from None
