"""The one name rule for every name a user gives that becomes part of a storage key.

Dataset, run id, version (published, union, rethreshold and reviewed children), reference set,
pool and eval set names all follow it, in the config (`factory.framework.config.Name`), in the command
lines and again in `factory.framework.layout`, which builds every key from them.
"""

from __future__ import annotations

import re

NAME_MAX = 100
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = (f"letters, digits, '_', '-' and '.', starting with a letter or digit, no '..', "
             f"at most {NAME_MAX} characters")


class BadName(ValueError):
    """A user-given name (dataset, run id, version, ...) that breaks the name rule, or a key
    built from names that would leave its folder."""


def check_name(name: object, what: str = "name") -> str:
    """`name` when it follows the one name rule (`NAME_RULE`), else `BadName` naming `what`.

    Every name a user gives that becomes part of a storage key (dataset, run id, version,
    reference set, pool, eval set) is checked with this rule, in the config and in the CLIs."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40]) + "..."
        raise BadName(f"{what} {shown} is not a valid name: use {NAME_RULE}")
    return name
