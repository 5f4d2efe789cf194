"""Human verdicts against the automatic filter: pure functions of the votes, no Label Studio here.

A vote is one reviewer's `keep` or `drop` on one task (one sample key). A key's verdict is the
strict majority of its votes; a tie is `tie` and a key nobody voted on is `unreviewed`.

- agreement: the share of agreeing pairs among all pairs of votes on the same key, and
  Krippendorff's alpha (nominal), which corrects that share for the agreement chance alone gives
  and allows any number of reviewers per key;
- precision: of the published samples (the filter said pass) with a verdict, the share kept,
  with a 95% Wilson interval;
- recall, estimated: the filter's rejected candidates near its thresholds (the frame) were
  sampled at random and reviewed; the share of them people keep, times the frame's size, estimates
  the good candidates the filter lost near its thresholds. Candidates further below are taken as
  drops, so this is recall among the candidates within the margin of a threshold.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

VERDICTS = ("keep", "drop")
PUBLISHED, REJECTED = "published", "rejected"  # where a reviewed key came from
# why an annotation is not counted as a vote, in the order the import prints them
IGNORED = ("unknown_key", "not_exported", "duplicate", "cancelled", "several_choices", "no_reviewer", "no_verdict")
REASON_LIMIT = 2000  # characters of a reviewer's reason that are kept
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # sample keys have no dots, slashes or spaces


@dataclass(frozen=True)
class Vote:
    key: str
    reviewer: str
    verdict: str  # "keep" | "drop"
    reason: str = ""


@dataclass
class Tally:
    """What an import counts: the votes it keeps, the annotations it ignores by reason, the reasons it cut."""

    votes: list[Vote] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    reasons_capped: int = 0

    def summary(self) -> dict[str, Any]:
        return {"ignored": {name: self.ignored[name] for name in IGNORED if self.ignored[name]},
                "reasons_capped": self.reasons_capped, "reason_limit": REASON_LIMIT}


def tally(origins: dict[str, str], ballots: Iterable[Vote | str]) -> Tally:
    """Sort every annotation (a Vote, or the reason it is no vote) into counted votes and ignored ones.

    A vote on a key that is not a sample key is `unknown_key`, on a key the export did not send
    `not_exported`; a reviewer's earlier vote on a key they voted on again is a `duplicate` (the later
    one counts); a reason longer than REASON_LIMIT is cut to it and counted.
    """
    result, latest = Tally(), {}
    for ballot in ballots:
        reason = ballot if isinstance(ballot, str) else ignored_reason(origins, ballot)
        if reason:
            result.ignored[reason] += 1
            continue
        if (ballot.key, ballot.reviewer) in latest:
            result.ignored["duplicate"] += 1
        latest[ballot.key, ballot.reviewer] = ballot
    result.reasons_capped = sum(len(vote.reason) > REASON_LIMIT for vote in latest.values())
    result.votes = [replace(vote, reason=vote.reason[:REASON_LIMIT]) for vote in latest.values()]
    return result


def ignored_reason(origins: dict[str, str], vote: Vote) -> str | None:
    if not KEY_PATTERN.fullmatch(vote.key):
        return "unknown_key"
    return None if vote.key in origins else "not_exported"


@dataclass
class KeyVerdict:
    """All votes on one key and what they add up to."""

    key: str
    origin: str
    votes: list[Vote] = field(default_factory=list)

    @property
    def keeps(self) -> int:
        return sum(vote.verdict == "keep" for vote in self.votes)

    @property
    def drops(self) -> int:
        return sum(vote.verdict == "drop" for vote in self.votes)

    @property
    def verdict(self) -> str:
        if not self.votes:
            return "unreviewed"
        if self.keeps == self.drops:
            return "tie"
        return "keep" if self.keeps > self.drops else "drop"

    @property
    def disagreement(self) -> bool:
        return self.keeps > 0 and self.drops > 0


def gather(origins: dict[str, str], votes: list[Vote]) -> list[KeyVerdict]:
    """One KeyVerdict per exported key (in key order); votes on keys not exported are ignored, and a
    reviewer who annotated a task twice counts once, with the later vote."""
    by_key = {key: KeyVerdict(key, origin) for key, origin in sorted(origins.items())}
    latest = {(vote.key, vote.reviewer): vote for vote in votes if vote.key in by_key}
    for (key, _), vote in sorted(latest.items()):
        by_key[key].votes.append(vote)
    return list(by_key.values())


def pairwise_agreement(verdicts: list[KeyVerdict]) -> float | None:
    """Agreeing pairs / all pairs of votes on the same key; None without a key of two votes."""
    agreeing = pairs = 0
    for item in verdicts:
        n, keeps, drops = len(item.votes), item.keeps, item.drops
        pairs += n * (n - 1) // 2
        agreeing += keeps * (keeps - 1) // 2 + drops * (drops - 1) // 2
    return agreeing / pairs if pairs else None


def krippendorff_alpha(verdicts: list[KeyVerdict]) -> float | None:
    """Krippendorff's alpha for nominal votes (keys with fewer than two votes carry no pairs)."""
    coincidences: Counter = Counter()
    for item in verdicts:
        n = len(item.votes)
        if n < 2:
            continue
        counts = {"keep": item.keeps, "drop": item.drops}
        for a in VERDICTS:
            for b in VERDICTS:
                pairs = counts[a] * (counts[b] - (a == b))
                coincidences[a, b] += pairs / (n - 1)
    total = sum(coincidences.values())
    if total <= 1:
        return None
    marginal = {a: sum(coincidences[a, b] for b in VERDICTS) for a in VERDICTS}
    observed = sum(coincidences[a, b] for a in VERDICTS for b in VERDICTS if a != b) / total
    expected = sum(marginal[a] * marginal[b] for a in VERDICTS for b in VERDICTS if a != b) / (total * (total - 1))
    if expected == 0:
        return 1.0 if observed == 0 else None  # every vote the same value: no variation to agree on
    return 1.0 - observed / expected


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float] | None:
    if trials == 0:
        return None
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def reviewer_counts(verdicts: list[KeyVerdict]) -> dict[str, Any]:
    per_reviewer = Counter(vote.reviewer for item in verdicts for vote in item.votes)
    per_key = Counter(len(item.votes) for item in verdicts)
    return {"reviewers": len(per_reviewer), "votes": sum(per_reviewer.values()),
            "votes_by_reviewer": dict(sorted(per_reviewer.items())),
            "keys_by_vote_count": {str(n): count for n, count in sorted(per_key.items())}}


def verdict_counts(verdicts: list[KeyVerdict], origin: str) -> dict[str, int]:
    counts = Counter(item.verdict for item in verdicts if item.origin == origin)
    return {name: counts.get(name, 0) for name in ("keep", "drop", "tie", "unreviewed")}


def precision(verdicts: list[KeyVerdict]) -> dict[str, Any]:
    counts = verdict_counts(verdicts, PUBLISHED)
    decided = counts["keep"] + counts["drop"]
    return {"value": round(counts["keep"] / decided, 6) if decided else None, "kept": counts["keep"],
            "decided": decided, "interval_95": wilson_interval(counts["keep"], decided)}


def recall_estimate(verdicts: list[KeyVerdict], published_samples: int, frame: dict[str, Any]) -> dict[str, Any]:
    """The filter's recall among candidates within `frame['margin']` of a threshold (see the module doc)."""
    counts = verdict_counts(verdicts, REJECTED)
    decided = counts["keep"] + counts["drop"]
    share = precision(verdicts)["value"]
    result = {"value": None, "rejected_reviewed": decided, "rejected_kept": counts["keep"],
              "frame_size": int(frame.get("size", 0)), "margin": frame.get("margin")}
    if not decided or share is None:
        return result
    lost = counts["keep"] / decided * result["frame_size"]
    found = share * published_samples
    result.update(value=round(found / (found + lost), 6) if found + lost else None,
                  estimated_good_published=round(found, 3), estimated_good_rejected=round(lost, 3))
    return result


def figures(verdicts: list[KeyVerdict], published_samples: int, frame: dict[str, Any]) -> dict[str, Any]:
    """What a reviewed version's manifest says about its review."""
    alpha = krippendorff_alpha(verdicts)
    agreement = pairwise_agreement(verdicts)
    return {
        **reviewer_counts(verdicts),
        "published": verdict_counts(verdicts, PUBLISHED),
        "rejected_sample": verdict_counts(verdicts, REJECTED),
        "disagreements": sum(item.disagreement for item in verdicts),
        "agreement": {"pairwise": None if agreement is None else round(agreement, 6),
                      "krippendorff_alpha": None if alpha is None else round(alpha, 6)},
        "precision": precision(verdicts),
        "recall_estimate": recall_estimate(verdicts, published_samples, frame),
    }
