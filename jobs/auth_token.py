"""Put the cluster's Ray auth token where Ray reads it, from AWS SSM Parameter Store.

Every node of a token-auth cluster (and every machine that submits jobs) needs the same
token. cluster.yaml keeps it in one SecureString parameter and each node fetches it with
its instance role before `ray start`; nothing holds it inline. The token is written with
mode 0600 and never printed.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_token_path() -> Path:
    """Where Ray looks when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return Path.home() / ".ray" / "auth_token"


def fetch_token(parameter: str, region: str | None = None, endpoint_url: str | None = None) -> str:
    """The decrypted value of SSM parameter `parameter` (credentials: the usual AWS chain)."""
    import boto3

    ssm = boto3.client("ssm", region_name=region, endpoint_url=endpoint_url)
    token = ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    if not token:
        raise ValueError(f"SSM parameter {parameter} is empty")
    return token


def write_token(token: str, path: str | Path | None = None) -> Path:
    """Write `token` to `path` (default ~/.ray/auth_token), owner-only, replacing any earlier one."""
    path = Path(path).expanduser() if path else default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    os.replace(partial, path)
    return path
