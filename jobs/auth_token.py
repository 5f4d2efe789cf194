"""Put the cluster's Ray auth token where Ray reads it, from AWS SSM Parameter Store.

Every node of a token-auth cluster (and every machine that submits jobs) needs the same
token. cluster.yaml keeps it in one SecureString parameter and each node fetches it with
its instance role before `ray start`; nothing holds it inline. The token is written with
mode 0600 and never printed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def default_token_path() -> Path:
    """Where Ray looks when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return Path.home() / ".ray" / "auth_token"


def fetch_token(parameter: str, region: str | None = None, endpoint_url: str | None = None) -> str:
    """The decrypted value of SSM parameter `parameter` (credentials: the usual AWS chain)."""
    import boto3  # only `jobs token` reads SSM: the other job commands start without it

    ssm = boto3.client("ssm", region_name=region, endpoint_url=endpoint_url)
    token = ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    if not token:
        raise ValueError(f"SSM parameter {parameter} is empty")
    return token


class TokenFileError(ValueError):
    """The token file cannot be written safely (a symlink in its way, a folder we cannot own)."""


def write_token(token: str, path: str | Path | None = None) -> Path:
    """Write `token` to `path` (default ~/.ray/auth_token), owner-only, replacing any earlier one.

    The folder is made (or tightened to) 0700; the token goes into a fresh `.NAME.partial`
    created with O_EXCL|O_NOFOLLOW (a leftover regular file there is removed first, never
    reused), is fchmod-ed 0600 and renamed into place. A symlink at the token, its partial
    file or its folder is refused: nothing is ever written through a link.
    """
    path = Path(path).expanduser() if path else default_token_path()
    owner_only_folder(path.parent)
    refuse_symlink(path)
    partial = path.with_name(f".{path.name}.partial")
    remove_leftover(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(token)
    os.replace(partial, path)
    return path


def owner_only_folder(folder: Path) -> None:
    """Make `folder` 0700, and tighten ~/.ray to 0700 when it exists; refuse a link."""
    refuse_symlink(folder)
    if folder.is_dir() and folder != default_token_path().parent:
        return  # a folder the operator chose: the file itself is 0600
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise TokenFileError(f"refusing to write the Ray auth token: {path} is a symlink")


def remove_leftover(partial: Path) -> None:
    """Remove a `.partial` left by an earlier write, so it is recreated and not reused."""
    refuse_symlink(partial)
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
