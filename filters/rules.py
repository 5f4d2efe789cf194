"""Threshold rules of the automatic filter: pure functions of stored scores.

A rule passes when its score is `>=` its threshold (NaN never passes). Because the rules
read only the scores, a published version can be re-thresholded without running a model:
a stricter threshold selects a subset of the rows that passed before.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

# Rule name (= score column) -> reject reason, in the order the paper applies them.
RULES: dict[str, str] = {
    "clip_t": "clip_t_below_threshold",
    "dino": "dino_below_threshold",
}


def flag_column(rule: str) -> str:
    return f"pass_{rule}"


Scores = pd.DataFrame | Mapping[str, np.ndarray]


def rule_flags(scores: Scores, thresholds: Mapping[str, float]) -> dict[str, np.ndarray]:
    """One boolean array per rule, keyed by its flag column (`pass_clip_t`, `pass_dino`)."""
    missing = [rule for rule in RULES if rule not in thresholds]
    if missing:
        raise ValueError(f"no threshold for rule(s) {missing}")
    flags = {}
    for rule in RULES:
        values = np.asarray(scores[rule], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            flags[flag_column(rule)] = values >= float(thresholds[rule])
    return flags


def first_failure(flags: Mapping[str, np.ndarray]) -> np.ndarray:
    """The reason of the first failed rule per row (object array; None where all pass)."""
    size = len(next(iter(flags.values())))
    reasons = np.full(size, None, dtype=object)
    for rule in reversed(list(RULES)):
        reasons[~flags[flag_column(rule)]] = RULES[rule]
    return reasons


def apply_thresholds(scores: Scores, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Flags per rule plus `threshold_reason` (None where every rule passes)."""
    flags = rule_flags(scores, thresholds)
    index = scores.index if isinstance(scores, pd.DataFrame) else None
    result = pd.DataFrame(flags, index=index)
    result["threshold_reason"] = pd.Series(first_failure(flags), index=result.index, dtype=object)
    return result
