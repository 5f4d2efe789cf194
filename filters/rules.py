"""Threshold rules of the automatic filter: pure functions of stored scores.

A rule passes when its score is `>=` its threshold (NaN never passes). Because the rules
read only the scores, a published version can be re-thresholded without running a model:
a stricter threshold selects a subset of the rows that passed before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Rule:
    """One threshold rule: everything config, filter, funnel, manifest, rethreshold and report say of it."""

    name: str  # the score column, the threshold's key and the KEY.json score's key
    reason: str  # the filter's rejection reason (`filter:<reason>` in the funnel)
    funnel: str  # the funnel count of candidates that passed this rule and every rule before it
    label: str  # how the report names the score
    scorer: str  # how the report names the model in the funnel ("passed CLIP")
    paper_threshold: float  # the CAFE paper's threshold (section 3.2): the config's default

    @property
    def flag(self) -> str:
        return f"pass_{self.name}"

    def passes(self, scores, threshold: float) -> np.ndarray:
        """`score >= threshold`; NaN (not scored) never passes."""
        with np.errstate(invalid="ignore"):
            return np.asarray(scores, dtype=np.float64) >= float(threshold)


# In the order the paper applies them.
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("clip_t", "clip_t_below_threshold", "passed_clip", "CLIP-T (x~ vs instruction)", "CLIP", 0.3),
    Rule("dino", "dino_below_threshold", "passed_dino", "DINO (x~ vs x)", "DINO", 0.6),
)}
SCORE_COLUMNS = tuple(RULES)
PAPER_THRESHOLDS = {rule.name: rule.paper_threshold for rule in RULES.values()}


Scores = pd.DataFrame | Mapping[str, np.ndarray]


def rule_flags(scores: Scores, thresholds: Mapping[str, float]) -> dict[str, np.ndarray]:
    """One boolean array per rule, keyed by its flag column (`pass_clip_t`, `pass_dino`)."""
    missing = [rule for rule in RULES if rule not in thresholds]
    if missing:
        raise ValueError(f"no threshold for rule(s) {missing}")
    return {rule.flag: rule.passes(scores[rule.name], thresholds[rule.name]) for rule in RULES.values()}


def first_failure(flags: Mapping[str, np.ndarray]) -> np.ndarray:
    """The reason of the first failed rule per row (object array; None where all pass)."""
    size = len(next(iter(flags.values())))
    reasons = np.full(size, None, dtype=object)
    for rule in reversed(list(RULES.values())):
        reasons[~flags[rule.flag]] = rule.reason
    return reasons


def funnel_counts(scored: np.ndarray, flags: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Each rule's funnel count: scored rows that pass it and every rule before it."""
    passing = np.asarray(scored, dtype=bool)
    counts = {}
    for rule in RULES.values():
        passing = passing & flags[rule.flag]
        counts[rule.funnel] = int(passing.sum())
    return counts


def apply_thresholds(scores: Scores, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Flags per rule plus `threshold_reason` (None where every rule passes)."""
    flags = rule_flags(scores, thresholds)
    index = scores.index if isinstance(scores, pd.DataFrame) else None
    result = pd.DataFrame(flags, index=index)
    result["threshold_reason"] = pd.Series(first_failure(flags), index=result.index, dtype=object)
    return result
