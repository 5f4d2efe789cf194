"""The review's figures from votes alone (no Label Studio): verdicts, agreement, precision, recall."""

from __future__ import annotations

import pytest

from factory.review.studio import annotation_vote
from factory.review.verdicts import (
    PUBLISHED,
    REASON_LIMIT,
    REJECTED,
    Vote,
    figures,
    gather,
    krippendorff_alpha,
    pairwise_agreement,
    tally,
    wilson_interval,
)


def votes_of(table):
    """{key: "kd..."}: one letter per reviewer (k keep, d drop, . none)."""
    return [Vote(key, f"r{n}", {"k": "keep", "d": "drop"}[mark]) for key, marks in table.items()
            for n, mark in enumerate(marks) if mark != "."]


def test_a_key_is_kept_only_by_a_strict_majority():
    origins = {"a": PUBLISHED, "b": PUBLISHED, "c": PUBLISHED, "d": PUBLISHED, "e": PUBLISHED}
    verdicts = gather(origins, votes_of({"a": "kkd", "b": "kd", "c": "dd", "d": "..", "x": "kk"}))
    assert [item.verdict for item in verdicts] == ["keep", "tie", "drop", "unreviewed", "unreviewed"]
    assert [item.disagreement for item in verdicts] == [True, True, False, False, False]


def test_a_reviewer_who_voted_twice_counts_once_with_the_later_vote():
    votes = [Vote("a", "r1", "keep"), Vote("a", "r2", "drop"), Vote("a", "r1", "drop", "changed my mind")]
    (item,) = gather({"a": PUBLISHED}, votes)
    assert (item.keeps, item.drops, item.verdict) == (0, 2, "drop")
    assert [vote.reason for vote in item.votes] == ["changed my mind", ""]


def test_agreement_matches_hand_counts_and_krippendorff():
    verdicts = gather({k: PUBLISHED for k in "abcd"}, votes_of({"a": "kk", "b": "kd", "c": "dd", "d": "kkk"}))
    assert pairwise_agreement(verdicts) == pytest.approx((1 + 0 + 1 + 3) / (1 + 1 + 1 + 3))
    # coincidences: kk = 2 + 6/2 = 5, dd = 2, kd = dk = 1; n = 9, n_k = 6, n_d = 3
    assert krippendorff_alpha(verdicts) == pytest.approx(1 - (2 / 9) / (2 * 6 * 3 / (9 * 8)))
    assert krippendorff_alpha(gather({"a": PUBLISHED}, votes_of({"a": "kk"}))) == 1.0
    assert pairwise_agreement(gather({"a": PUBLISHED}, votes_of({"a": "k"}))) is None


def test_precision_and_the_recall_estimate_follow_the_frame():
    origins = {**{f"p{n}": PUBLISHED for n in range(4)}, **{f"r{n}": REJECTED for n in range(4)}}
    table = {"p0": "kk", "p1": "kk", "p2": "kk", "p3": "dd", "r0": "kk", "r1": "dd", "r2": "dd", "r3": "dd"}
    result = figures(gather(origins, votes_of(table)), published_samples=100, frame={"size": 40, "margin": 0.05})
    assert result["precision"]["value"] == pytest.approx(0.75)
    low, high = result["precision"]["interval_95"]
    assert low < 0.75 < high
    found, lost = 0.75 * 100, 0.25 * 40
    assert result["recall_estimate"]["value"] == pytest.approx(found / (found + lost), abs=1e-6)
    assert result["reviewers"] == 2 and result["votes"] == 16


def test_wilson_interval_stays_inside_zero_and_one():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] > 0.6


def annotation(verdicts=("keep",), reviewer=7, reason="", cancelled=False):
    """An annotation as Label Studio's API returns it (the fields the import reads)."""
    result = [{"from_name": "verdict", "to_name": "x_new", "type": "choices", "value": {"choices": list(verdicts)}}]
    if reason:
        result.append({"from_name": "reason", "to_name": "x_new", "type": "textarea", "value": {"text": [reason]}})
    return {"id": 1, "completed_by": reviewer, "was_cancelled": cancelled, "result": result}


def test_every_ignored_annotation_is_counted_by_its_reason():
    origins = {"a": PUBLISHED, "b": PUBLISHED}
    ballots = [annotation_vote(key, record) for key, record in [
        ("a", annotation()), ("b", annotation(["drop"], reviewer=8)),
        ("../a", annotation()), ("", annotation()), (None, annotation()), ("zzz", annotation()),
        ("a", annotation(["drop"])),  # reviewer 7 again: the earlier vote is the duplicate
        ("a", annotation(cancelled=True)), ("b", annotation(["keep", "drop"])),
        ("b", annotation(reviewer=None)), ("b", annotation(reviewer="")), ("b", annotation([])),
        ("b", annotation(["maybe"])),
    ]]
    counted = tally(origins, ballots)
    assert sorted((vote.key, vote.reviewer, vote.verdict) for vote in counted.votes) == [
        ("a", "user-7", "drop"), ("b", "user-8", "drop")]
    assert counted.summary()["ignored"] == {"unknown_key": 3, "not_exported": 1, "duplicate": 1, "cancelled": 1,
                                            "several_choices": 1, "no_reviewer": 2, "no_verdict": 2}


def test_results_of_another_shape_than_label_studios_are_no_verdict_not_an_error():
    def with_result(result):
        return {**annotation(), "result": result}

    malformed = [with_result(5), with_result(["keep"]), with_result([{"from_name": "verdict", "value": ["keep"]}]),
                 with_result([{"from_name": "verdict", "value": {"choices": 5}}]),
                 with_result([{"from_name": "verdict", "value": {"choices": [{"keep": 1}]}}])]
    assert [annotation_vote("a", record) for record in malformed] == ["no_verdict"] * 5
    odd_reason = with_result([*annotation()["result"], {"from_name": "reason", "value": {"text": 42}}])
    assert annotation_vote("a", odd_reason).reason == "42"


def test_a_reviewer_given_as_an_object_is_named_by_its_id():
    vote = annotation_vote("a", annotation(reviewer={"id": 12, "email": "r@example.com"}))
    assert vote.reviewer == "user-12"
    assert annotation_vote("a", annotation(reviewer={"email": "r@example.com"})) == "no_reviewer"


def test_a_lone_surrogate_in_a_reason_or_reviewer_is_replaced_and_the_votes_still_digest():
    from factory.review.publish import votes_digest

    vote = annotation_vote("a", annotation(reviewer="r\ud800", reason="blurry \udfff edge"))
    assert (vote.reviewer, vote.reason) == ("user-r?", "blurry ? edge")
    record = {"version": "v1", "project_id": 1, "url": "http://127.0.0.1:1"}
    assert len(votes_digest(record, [vote])) == 64


def test_a_reason_past_the_cap_is_cut_and_counted():
    long = "x" * (5 * 1024 * 1024)
    ballots = [annotation_vote("a", annotation(reason=long)), annotation_vote("b", annotation(reason="short"))]
    counted = tally({"a": PUBLISHED, "b": PUBLISHED}, ballots)
    assert sorted(len(vote.reason) for vote in counted.votes) == [5, REASON_LIMIT]
    assert counted.summary()["reasons_capped"] == 1
