"""Threshold rules: `>=`, first failure named, pure functions of stored scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from filters.rules import RULES, apply_thresholds

THRESHOLDS = {"clip_t": 0.3, "dino": 0.6}


def test_score_exactly_at_threshold_passes_and_just_under_fails():
    clip_t = np.array([0.3, np.nextafter(0.3, 0), 0.9, 0.9])
    dino = np.array([0.9, 0.9, 0.6, np.nextafter(0.6, 0)])
    result = apply_thresholds({"clip_t": clip_t, "dino": dino}, THRESHOLDS)
    assert result["pass_clip_t"].tolist() == [True, False, True, True]
    assert result["pass_dino"].tolist() == [True, True, True, False]
    assert result["threshold_reason"].tolist() == [None, "clip_t_below_threshold", None, "dino_below_threshold"]


def test_reason_is_the_first_failed_rule_and_nan_fails():
    scores = pd.DataFrame({"clip_t": [0.1, np.nan, 0.5], "dino": [0.1, 0.9, np.nan]}, index=[7, 8, 9])
    result = apply_thresholds(scores, THRESHOLDS)
    assert list(result.index) == [7, 8, 9]
    expected = ["clip_t_below_threshold", "clip_t_below_threshold", "dino_below_threshold"]
    assert result["threshold_reason"].tolist() == expected
    assert list(RULES) == ["clip_t", "dino"]


def test_stricter_thresholds_select_a_subset():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"clip_t": rng.uniform(0, 0.6, 500), "dino": rng.uniform(0.3, 1, 500)})
    loose = apply_thresholds(scores, THRESHOLDS)["threshold_reason"].isna()
    strict = apply_thresholds(scores, {"clip_t": 0.35, "dino": 0.7})["threshold_reason"].isna()
    assert 0 < strict.sum() < loose.sum()
    assert not (strict & ~loose).any()


def test_missing_threshold_is_an_error():
    with pytest.raises(ValueError, match="dino"):
        apply_thresholds({"clip_t": np.array([0.5]), "dino": np.array([0.5])}, {"clip_t": 0.3})


def test_funnel_counts_are_cumulative_in_rule_order_and_count_only_scored_rows():
    from filters.rules import funnel_counts, rule_flags

    scores = {"clip_t": np.array([0.5, 0.5, 0.1, 0.5, np.nan]), "dino": np.array([0.9, 0.1, 0.9, 0.9, 0.9])}
    scored = np.array([True, True, True, False, False])  # row 3 passes both but was not scored
    assert funnel_counts(scored, rule_flags(scores, THRESHOLDS)) == {"passed_clip": 2, "passed_dino": 1}


def test_the_registry_is_what_config_defaults_funnel_and_report_read():
    from factory.framework.config import FilterConfig
    from factory.report.plots import FUNNEL_STEPS
    from factory.report.summary import FILTER_REASONS, SCORES

    assert FilterConfig().thresholds == {"clip_t": 0.3, "dino": 0.6}  # the paper's section 3.2
    assert [name for name, _ in FUNNEL_STEPS][2:4] == [rule.funnel for rule in RULES.values()]
    assert FILTER_REASONS == ("clip_t_below_threshold", "dino_below_threshold") and list(SCORES) == list(RULES)


def test_the_report_marks_a_score_with_the_rule_itself():
    from factory.report.page import score_badges

    badges = score_badges({"clip_t": 0.3, "dino": np.nextafter(0.6, 0)}, THRESHOLDS)
    assert '<span class="pass">clip_t' in badges and '<span class="fail">dino' in badges
