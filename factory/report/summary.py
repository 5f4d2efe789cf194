"""Fixed-size summaries of a run's candidates and a version's index, built one unit file (or index batch) at a time.

The report never holds every candidate or every index row: each unit file is summarised on its own
(score histograms on fixed bins, per-alpha tallies, the NEAR_SIZE nearest threshold misses) and the
summaries are merged, so `merge(summary(a), summary(b)) == summary(a + b)` and memory is one unit file.
The index is read in batches of rows into running counts (scores, rounds, alphas, each shard's first key
in the gallery's order).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from filters.rules import RULES

SCORES = {rule.name: rule.label for rule in RULES.values()}
SCORE_RANGE = (-1.0, 1.0)  # cosine similarities; a value outside is counted in the edge bin
SCORE_BINS = 2000  # 0.001 wide; the plot merges them into about 30 bars over the occupied range
GROUPS = ("accepted", "rejected")
FILTER_REASONS = tuple(rule.reason for rule in RULES.values())
NEAR_SIZE = 8


def finite(values) -> np.ndarray:
    array = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return array[np.isfinite(array)]


def score_counts(values) -> np.ndarray:
    """Counts of the finite values on the fixed bins (SCORE_BINS over SCORE_RANGE)."""
    kept = np.clip(finite(values), *SCORE_RANGE)
    return np.histogram(kept, bins=SCORE_BINS, range=SCORE_RANGE)[0].astype(np.int64)


def empty_counts() -> np.ndarray:
    return np.zeros(SCORE_BINS, dtype=np.int64)


def threshold_miss(candidates: pd.DataFrame, thresholds: dict[str, float]) -> pd.Series:
    """How far each candidate fell short of its worst-failed threshold (NaN when no score)."""
    misses = [thresholds[name] - pd.to_numeric(candidates[name], errors="coerce")
              for name in SCORES if name in thresholds and name in candidates]
    if not misses:
        return pd.Series(np.nan, index=candidates.index)
    return pd.concat(misses, axis=1).max(axis=1, skipna=False)


@dataclass
class AlphaTally:
    """One SID alpha's candidates, accepted ones, and the sums and counts of its finite scores."""

    candidates: int = 0
    accepted: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, other: AlphaTally) -> None:
        self.candidates += other.candidates
        self.accepted += other.accepted
        for name, total in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None


@dataclass
class CandidateSummary:
    """What the report needs from a run's candidate rows; its size does not depend on the row count."""

    rows: int = 0
    files: int = 0
    histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # score -> group -> counts
    alphas: dict[float, AlphaTally] = field(default_factory=dict)
    nearest: list[tuple[float, str, str]] = field(default_factory=list)  # (miss, key, unit file), nearest first

    @classmethod
    def of_rows(cls, rows: pd.DataFrame, thresholds: dict[str, float], unit_file: str | None = None,
                files: int = 1) -> CandidateSummary:
        """The summary of some candidate rows (one unit file's, or several with a `unit_file` column)."""
        if unit_file is not None:
            rows = rows.assign(unit_file=unit_file)
        alive = rows["reject_reason"].isna() if "reject_reason" in rows else pd.Series(True, index=rows.index)
        summary = cls(rows=len(rows), files=files)
        for name in SCORES:
            if name in rows:
                summary.histograms[name] = {"accepted": score_counts(rows.loc[alive, name]),
                                            "rejected": score_counts(rows.loc[~alive, name])}
        if "alpha" in rows:
            with_alpha = rows["alpha"].notna()
            for alpha, group in rows[with_alpha].groupby("alpha"):
                tally = AlphaTally(len(group), int(alive[group.index].sum()))
                for name in SCORES:
                    if name in group:
                        kept = finite(group[name])
                        tally.sums[name], tally.counts[name] = float(kept.sum()), int(kept.size)
                summary.alphas[float(alpha)] = tally
        if "reject_reason" in rows:
            rejected = rows[rows["reject_reason"].isin(FILTER_REASONS)]
            miss = threshold_miss(rejected, thresholds)
            kept = miss.notna()
            summary.nearest = heapq.nsmallest(NEAR_SIZE, zip(miss[kept].astype(float), rejected.loc[kept, "key"],
                                                             rejected.loc[kept, "unit_file"]))
        return summary

    def add(self, other: CandidateSummary) -> None:
        """Fold another summary into this one (what reading one more unit file does)."""
        self.rows += other.rows
        self.files += other.files
        for name, groups in other.histograms.items():
            mine = self.histograms.setdefault(name, {group: empty_counts() for group in GROUPS})
            for group, counts in groups.items():
                mine[group] = mine[group] + counts
        for alpha, tally in other.alphas.items():
            self.alphas.setdefault(alpha, AlphaTally()).add(tally)
        self.nearest = heapq.nsmallest(NEAR_SIZE, self.nearest + other.nearest)

    def score_groups(self, name: str) -> list[tuple[str, np.ndarray]]:
        groups = self.histograms.get(name)
        return [] if groups is None else [(group, groups[group]) for group in GROUPS]


def merge(summaries) -> CandidateSummary:
    """One summary of many (in any grouping of the same rows, the same summary)."""
    total = CandidateSummary()
    for summary in summaries:
        total.add(summary)
    return total


def rank(version: str, key: str) -> str:
    """A key's place in the gallery's deterministic order."""
    return hashlib.sha256(f"{version}:{key}".encode()).hexdigest()


INDEX_COLUMNS = ("key", "shard", "round", "alpha", *SCORES)


def value_label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class IndexSummary:
    """Running counts over a version's index: rows, published scores, rounds, alphas, each shard's first rank."""

    version: str
    rows: int = 0
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    rounds: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)
    shard_first: dict[str, str] = field(default_factory=dict)  # shard -> smallest rank of its keys

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        names = set(batch.schema.names)
        self.rows += batch.num_rows
        for name in SCORES:
            if name in names:
                counts = score_counts(batch.column(name).to_numpy(zero_copy_only=False))
                self.histograms[name] = self.histograms.get(name, empty_counts()) + counts
        for name, counter in (("round", self.rounds), ("alpha", self.alphas)):
            if name in names:
                counter.update(value for value in batch.column(name).to_pylist()
                               if value is not None and value == value)
        if {"key", "shard"} <= names:
            for key, shard in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist()):
                ranked = rank(self.version, key)
                if shard not in self.shard_first or ranked < self.shard_first[shard]:
                    self.shard_first[shard] = ranked

    def counts(self, name: str) -> list[tuple[str, int]]:
        """(label, samples) per value of `round` or `alpha`, in value order; [] without the column."""
        counter = {"round": self.rounds, "alpha": self.alphas}[name]
        return [(value_label(value), n) for value, n in sorted(counter.items())]

    def gallery_shards(self, count: int) -> list[str]:
        """The `count` shards whose first key comes first in the gallery's order."""
        return sorted(self.shard_first, key=lambda shard: (self.shard_first[shard], shard))[:count]
