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
