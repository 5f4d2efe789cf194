"""The report's plots (matplotlib's object API on Agg, no global backend): funnel, scores, cost, lineage."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from factory.report.data import VersionData
from factory.report.summary import SCORE_BINS, SCORE_RANGE, SCORES, IndexSummary, empty_counts
from filters.rules import RULES

FUNNEL_STEPS = (
    ("planned", "planned"),
    ("generated", "generated"),
    *((rule.funnel, f"passed {rule.scorer}") for rule in RULES.values()),
    ("dialogue_accepted", "dialogue accepted"),
    ("written", "written"),
)
DISPLAY_BARS = 30  # bars per score histogram, over the range the scores occupy


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API draws with Agg and sets no global backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def funnel_steps(funnel: dict[str, Any]) -> list[tuple[str, int]]:
    steps = []
    if "parent_samples" in funnel:
        steps.append(("parent samples", int(funnel["parent_samples"])))
    for parent, count in (funnel.get("from_parents") or {}).items():
        steps.append((f"from {parent}", int(count)))
    steps += [(label, int(funnel[name])) for name, label in FUNNEL_STEPS if name in funnel]
    return steps


def funnel_plot(funnel: dict[str, Any]) -> bytes | None:
    steps = funnel_steps(funnel)
    reasons = funnel.get("rejections") or {}
    if not steps:
        return None
    figure = new_figure(11, 3.6)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1])
    labels, counts = [s[0] for s in steps], [s[1] for s in steps]
    bars = left.barh(labels[::-1], counts[::-1], color="#4c72b0")
    left.bar_label(bars, padding=3)
    left.set_title("funnel")
    left.set_xlabel("candidates")
    left.margins(x=0.15)
    if reasons:
        ordered = sorted(reasons.items(), key=lambda item: item[1])
        bars = right.barh([name for name, _ in ordered], [count for _, count in ordered], color="#c44e52")
        right.bar_label(bars, padding=3)
        right.margins(x=0.15)
    else:
        right.text(0.5, 0.5, "no rejections recorded", ha="center", va="center", transform=right.transAxes)
    right.set_title("rejections by stage:reason")
    return png_bytes(figure)


def score_groups(data: VersionData, name: str) -> list[tuple[str, np.ndarray, str]]:
    """(label, counts on the fixed bins, colour) per group: accepted vs rejected when the run's rows are at hand."""
    if data.candidates is not None and name in data.candidates.histograms:
        colours = {"accepted": "#55a868", "rejected": "#c44e52"}
        return [(group, counts, colours[group]) for group, counts in data.candidates.score_groups(name)]
    return [("published", data.index.histograms.get(name, empty_counts()), "#55a868")]


def display_edges(counts: np.ndarray, bars: int = DISPLAY_BARS) -> np.ndarray | None:
    """About `bars` equal bins over the occupied fixed bins (whole fixed bins each); None when all are empty."""
    occupied = np.flatnonzero(counts)
    if not occupied.size:
        return None
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    width = -(-(last - first) // bars)  # fixed bins per bar
    fixed = np.linspace(*SCORE_RANGE, SCORE_BINS + 1)
    return fixed[np.minimum(np.arange(first, last + width, width), SCORE_BINS)]


def score_plot(data: VersionData) -> bytes | None:
    thresholds = data.manifest.get("thresholds") or {}
    figure = new_figure(11, 3.4)
    drew = False
    centres = np.linspace(*SCORE_RANGE, SCORE_BINS + 1)[:-1] + (SCORE_RANGE[1] - SCORE_RANGE[0]) / SCORE_BINS / 2
    for axis, (name, title) in zip(figure.subplots(1, len(SCORES)), SCORES.items()):
        groups = score_groups(data, name)
        edges = display_edges(sum(counts for _, counts, _ in groups))
        if edges is not None:
            for label, counts, colour in groups:
                axis.hist(centres, bins=edges, weights=counts, alpha=0.6, color=colour,
                          label=f"{label} ({int(counts.sum())})")
            drew = True
        if name in thresholds:
            axis.axvline(float(thresholds[name]), color="black", linestyle="--",
                         label=f"threshold {float(thresholds[name]):g}")
        axis.set_title(title)
        axis.set_xlabel(name)
        axis.legend(fontsize="small")
    return png_bytes(figure) if drew else None


def cost_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    samples = max(int(manifest.get("samples") or 0), 1)
    rows = []
    for stage, spent in (manifest.get("cost") or {}).items():
        actor, gpu = float(spent.get("actor_seconds", 0.0)), float(spent.get("gpu_seconds", 0.0))
        rows.append({"stage": stage, "actor_seconds": actor, "gpu_seconds": gpu,
                     "actor_per_sample": actor / samples, "gpu_per_sample": gpu / samples,
                     "generator_gpu_seconds": spent.get("generator_gpu_seconds")})
    return rows


def cost_plot(rows: list[dict[str, Any]]) -> bytes | None:
    if not rows:
        return None
    figure = new_figure(8, 3.2)
    axis = figure.subplots()
    positions = np.arange(len(rows))
    for offset, (column, label, colour) in zip((-0.2, 0.2), (("actor_per_sample", "actor s / sample", "#8172b2"),
                                                               ("gpu_per_sample", "GPU s / sample", "#dd8452"))):
        bars = axis.bar(positions + offset, [row[column] for row in rows], width=0.4, label=label, color=colour)
        axis.bar_label(bars, fmt="%.3g", padding=2, fontsize="small")
    axis.set_xticks(positions, [row["stage"] for row in rows])
    axis.set_ylabel("seconds per accepted sample")
    axis.set_title("cost per accepted sample by stage")
    axis.margins(y=0.2)
    axis.legend()
    return png_bytes(figure)


def lineage_plot(index: IndexSummary) -> bytes | None:
    alphas, rounds = index.counts("alpha"), index.counts("round")
    panels = [(title, counts) for title, counts in (("alpha (SID)", alphas), ("round", rounds)) if counts]
    if not alphas and len(rounds) <= 1:
        return None
    figure = new_figure(4 * len(panels) + 1, 3)
    for axis, (title, counts) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        bars = axis.bar([label for label, _ in counts], [n for _, n in counts], color="#64b5cd")
        axis.bar_label(bars, padding=2, fontsize="small")
        axis.set_title(f"samples by {title}")
        axis.margins(y=0.2)
    return png_bytes(figure)


def render_plots(data: VersionData) -> dict[str, bytes]:
    plots = {
        "funnel": funnel_plot(data.manifest.get("funnel") or {}),
        "scores": score_plot(data),
        "cost": cost_plot(cost_rows(data.manifest)),
        "lineage": lineage_plot(data.index),
    }
    return {name: png for name, png in plots.items() if png is not None}
