"""Version report: one self-contained HTML page to judge a dataset version by eye.

The page shows the funnel with its rejection reasons, the score histograms against the
thresholds, the cost per accepted sample, the lineage, and a gallery of sampled quadruplets
beside the rejected candidates nearest the thresholds. Plots (matplotlib, Agg) and images are
inlined as data URIs; the plots are also saved as PNG files next to the page. The page has no
script, loads nothing from outside, and escapes every text (user/assistant texts are LLM output).

Rejected candidates come from the run's per-unit rows (`runs/<run_id>/dialogue/unit-*.parquet`);
a version without them (a union, a re-threshold, a deleted run) shows accepted samples only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from factory.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.manifest import VersionError, load_manifest, shard_key, version_dir
from factory.shards import read_shard
from factory.storage import Storage, StorageError
from filters.rules import RULES

log = logging.getLogger(__name__)

FUNNEL_STEPS = (
    ("planned", "planned"),
    ("generated", "generated"),
    ("passed_clip", "passed CLIP"),
    ("passed_dino", "passed DINO"),
    ("dialogue_accepted", "dialogue accepted"),
    ("written", "written"),
)
SCORES = {"clip_t": "CLIP-T (x~ vs instruction)", "dino": "DINO (x~ vs x)"}
FILTER_REASONS = tuple(RULES.values())
CANDIDATE_COLUMNS = ("key", "unit", "alpha", "clip_t", "dino", "reject_stage", "reject_reason")
CARD_COLUMNS = ("key", "input_image", "target_image", "instruction", "user", "assistant", "clip_t", "dino",
                "reject_stage", "reject_reason")
GALLERY_SIZE = 8
NEAR_SIZE = 8
GALLERY_MAX_SHARDS = 2  # shards read for the gallery, however large the version
THUMB_SIDE = 256
ANCESTRY_DEPTH = 8


@dataclass
class VersionData:
    """What the report reads: the manifest, the index, and (when kept) the run's candidates."""

    manifest: dict[str, Any]
    index: pd.DataFrame
    candidates: pd.DataFrame | None  # scores and verdicts of every candidate; None when unavailable
    candidates_note: str
    ancestry: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Card:
    """One gallery entry: a quadruplet (or a rejected candidate) with its scores."""

    key: str
    status: str  # "accepted" | "rejected"
    instruction: str
    user: str
    assistant: str
    scores: dict[str, float]
    reason: str = ""
    input_uri: str = ""
    target_uri: str = ""
    image_problems: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------


def default_out_dir(dataset: str, version: str) -> Path:
    for name in (dataset, version):
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"cannot make a report folder from the name {name!r}")
    return Path("reports") / dataset / version


def load_version_data(storage: Storage, dataset: str, version: str) -> VersionData:
    manifest = load_manifest(storage, dataset, version)
    index = storage.read_parquet(f"{version_dir(dataset, version)}/index.parquet").to_pandas()
    candidates, note = load_candidates(storage, manifest)
    return VersionData(manifest, index, candidates, note, ancestry(storage, manifest))


def candidate_files(storage: Storage, run_id: str) -> list[str]:
    prefix = f"runs/{run_id}/dialogue"
    return [key for key in storage.list(prefix)
            if key.rsplit("/", 1)[-1].startswith("unit-") and key.endswith(".parquet")]


def read_columns(storage: Storage, key: str, columns: tuple[str, ...], keys: list[str] | None = None) -> pd.DataFrame:
    """The named columns of one Parquet file, optionally only the rows of `keys`."""
    data = storage.read_bytes(key)
    names = pq.read_schema(pa.BufferReader(data)).names
    present = [name for name in columns if name in names]
    filters = [("key", "in", list(keys))] if keys is not None else None
    return pq.read_table(pa.BufferReader(data), columns=present, filters=filters).to_pandas()


def load_candidates(storage: Storage, manifest: dict[str, Any]) -> tuple[pd.DataFrame | None, str]:
    run_id = manifest.get("run_id")
    if not run_id:
        return None, f"a {manifest['kind']} version names no run, so its rejected candidates are not at hand"
    files = candidate_files(storage, run_id)
    if not files:
        return None, f"no candidate rows under runs/{run_id}/dialogue (the run's files were deleted or moved)"
    frames = []
    for number, key in enumerate(files, 1):
        frame = read_columns(storage, key, CANDIDATE_COLUMNS)
        frames.append(frame.assign(unit_file=key))
        if number % 100 == 0:
            log.info("report: read %d of %d unit files of run %s", number, len(files), run_id)
    candidates = pd.concat(frames, ignore_index=True)
    for name in ("reject_stage", "reject_reason"):
        if name not in candidates:
            candidates[name] = None
    return candidates, f"{len(candidates)} candidates from {len(files)} unit files of run {run_id}"


def ancestry(storage: Storage, manifest: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The version's ancestors, depth first: (depth, summary), a missing parent marked as such."""
    found: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()

    def visit(parents: list[str], depth: int) -> None:
        for parent in parents:
            if depth > ANCESTRY_DEPTH or parent in seen:
                continue
            seen.add(parent)
            try:
                parent_manifest = load_manifest(storage, manifest["dataset"], parent)
            except VersionError:
                found.append((depth, {"version": parent, "missing": True}))
                continue
            found.append((depth, version_summary(parent_manifest)))
            visit(parent_manifest.get("parents", []), depth + 1)

    visit(manifest.get("parents", []), 1)
    return found


def version_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {name: manifest.get(name) for name in ("version", "kind", "samples", "created", "round")}


# --- plots --------------------------------------------------------------------------


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


def finite(values) -> np.ndarray:
    array = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return array[np.isfinite(array)]


def score_groups(data: VersionData, name: str) -> list[tuple[str, np.ndarray, str]]:
    """(label, values, colour) per group: accepted vs rejected when the run's rows are at hand."""
    if data.candidates is not None and name in data.candidates:
        alive = data.candidates["reject_reason"].isna()
        return [("accepted", finite(data.candidates.loc[alive, name]), "#55a868"),
                ("rejected", finite(data.candidates.loc[~alive, name]), "#c44e52")]
    return [("published", finite(data.index[name]), "#55a868")]


def score_plot(data: VersionData) -> bytes | None:
    thresholds = data.manifest.get("thresholds") or {}
    figure = new_figure(11, 3.4)
    drew = False
    for axis, (name, title) in zip(figure.subplots(1, len(SCORES)), SCORES.items()):
        groups = score_groups(data, name)
        everything = np.concatenate([values for _, values, _ in groups])
        if everything.size:
            edges = np.histogram_bin_edges(everything, bins=30)
            for label, values, colour in groups:
                axis.hist(values, bins=edges, alpha=0.6, color=colour, label=f"{label} ({values.size})")
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


def value_counts(values: pd.Series) -> list[tuple[str, int]]:
    counts = values.dropna().value_counts().sort_index()
    return [(f"{value:g}" if isinstance(value, float) else str(value), int(n)) for value, n in counts.items()]


def lineage_plot(index: pd.DataFrame) -> bytes | None:
    alphas = value_counts(index["alpha"]) if "alpha" in index else []
    rounds = value_counts(index["round"]) if "round" in index else []
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


# --- gallery ------------------------------------------------------------------------


def rank(version: str, key: str) -> str:
    return hashlib.sha256(f"{version}:{key}".encode()).hexdigest()


def gallery_keys(index: pd.DataFrame, version: str) -> list[str]:
    """A deterministic sample of keys, drawn from at most GALLERY_MAX_SHARDS shards."""
    shard_of = dict(zip(index["key"], index["shard"]))
    ranked = sorted(shard_of, key=lambda key: rank(version, key))
    shards: list[str] = []
    for key in ranked:
        if len(shards) == GALLERY_MAX_SHARDS:
            break
        if shard_of[key] not in shards:
            shards.append(shard_of[key])
    return [key for key in ranked if shard_of[key] in shards][:GALLERY_SIZE]


def thumbnail(data: bytes | None) -> tuple[str, str]:
    """(data URI, problem): a small JPEG of an untrusted image, or the reason it could not be shown."""
    try:
        image = fit_within(decode_image(data), THUMB_SIDE)
    except ImageRejected as err:
        return "", err.reason
    encoded = base64.b64encode(encode_jpeg(image, quality=85)).decode("ascii")
    return f"data:image/jpeg;base64,{encoded}", ""


def with_images(card: Card, input_image: bytes | None, target_image: bytes | None) -> Card:
    for attribute, data, label in (("input_uri", input_image, "x"), ("target_uri", target_image, "x~")):
        uri, problem = thumbnail(data)
        setattr(card, attribute, uri)
        if problem:
            card.image_problems.append(f"{label}: {problem}")
    return card


def scores_of(values: dict[str, Any]) -> dict[str, float]:
    scores = {}
    for name in SCORES:
        value = values.get(name)
        scores[name] = float("nan") if value is None or pd.isna(value) else float(value)
    return scores


def accepted_cards(storage: Storage, data: VersionData) -> list[Card]:
    manifest, index = data.manifest, data.index
    if index.empty:
        return []
    wanted = gallery_keys(index, manifest["version"])
    shards = index.loc[index["key"].isin(wanted), "shard"].unique()
    found, wanted_set = {}, set(wanted)
    for shard in sorted(shards):
        for sample in read_shard(storage, shard_key(manifest, shard)):
            if sample.key in wanted_set:
                found[sample.key] = sample
    cards = []
    for key in wanted:
        if key not in found:
            continue
        sample = found[key]
        card = Card(key, "accepted", str(sample.meta.get("instruction") or ""), sample.user, sample.assistant,
                    scores_of(sample.meta.get("scores") or {}))
        cards.append(with_images(card, sample.input_image, sample.target_image))
    return cards


def threshold_miss(candidates: pd.DataFrame, thresholds: dict[str, float]) -> pd.Series:
    """How far each candidate fell short of its worst-failed threshold (NaN when no score)."""
    misses = [thresholds[name] - pd.to_numeric(candidates[name], errors="coerce")
              for name in SCORES if name in thresholds and name in candidates]
    if not misses:
        return pd.Series(np.nan, index=candidates.index)
    return pd.concat(misses, axis=1).max(axis=1, skipna=False)


def near_threshold_cards(storage: Storage, data: VersionData) -> list[Card]:
    candidates = data.candidates
    if candidates is None or candidates.empty:
        return []
    thresholds = {name: float(value) for name, value in (data.manifest.get("thresholds") or {}).items()}
    rejected = candidates[candidates["reject_reason"].isin(FILTER_REASONS)].copy()
    rejected["miss"] = threshold_miss(rejected, thresholds)
    nearest = rejected[rejected["miss"].notna()].sort_values(["miss", "key"]).head(NEAR_SIZE)
    rows = {}
    for unit_file, group in nearest.groupby("unit_file"):
        for record in read_columns(storage, unit_file, CARD_COLUMNS, list(group["key"])).to_dict("records"):
            rows[record["key"]] = record
    cards = []
    for key in nearest["key"]:
        record = rows.get(key)
        if record is None:
            continue
        card = Card(key, "rejected", text(record.get("instruction")), text(record.get("user")),
                    text(record.get("assistant")), scores_of(record),
                    reason=f"{text(record.get('reject_stage'))}:{text(record.get('reject_reason'))}")
        cards.append(with_images(card, record.get("input_image"), record.get("target_image")))
    return cards


def text(value: Any) -> str:
    return "" if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else str(value)


# --- page ---------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#666}
img.plot{max-width:100%;border:1px solid #eee}
.columns{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;margin-bottom:12px;background:#fafafa}
.card.rejected{border-color:#e3a0a0;background:#fff6f6}
.pair{display:flex;gap:6px} .pair figure{margin:0;flex:1} .pair img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#666} .pass{color:#2a7a2a} .fail{color:#b22;font-weight:bold}
.text{white-space:pre-wrap;font-size:13px;margin:4px 0} .key{font-family:monospace;font-size:11px;color:#888}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    return html.escape(text(value), quote=True)


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    return "—" if np.isnan(value) else f"{value:.{digits}g}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = f"<tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr>" if any(headers) else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{number(cell)}</td>' if isinstance(cell, (int, float, np.number))
                         and not isinstance(cell, bool) else f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def plot_img(plots: dict[str, bytes], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    encoded = base64.b64encode(plots[name]).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{encoded}">'


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def header_section(data: VersionData) -> str:
    m = data.manifest
    shard_bytes = sum(int(shard.get("bytes", 0)) for shard in m.get("shards", []))
    rows = [["dataset", m["dataset"]], ["version", m["version"]], ["kind", m["kind"]],
            ["parents", ", ".join(m.get("parents", [])) or "—"], ["created", m.get("created")],
            ["code version", m.get("code_version")], ["config sha256", (m.get("config_sha256") or "")[:16]],
            ["run", m.get("run_id") or "—"], ["samples", int(m.get("samples", 0))],
            ["shards", f"{len(m.get('shards', []))} ({shard_bytes / 2**20:.1f} MiB)"]]
    thresholds = [[name, float(value)] for name, value in (m.get("thresholds") or {}).items()]
    stats = [[name] + [values.get(q) for q in ("mean", "min", "p10", "p50", "p90", "max")]
             for name, values in (m.get("score_stats") or {}).items() if values]
    return (f"<h1>{esc(m['dataset'])} / {esc(m['version'])}</h1>"
            f'<p class="muted">version report · {esc(m["kind"])} · {number(int(m.get("samples", 0)))} samples</p>'
            + table(["", ""], rows)
            + "<h2>Thresholds</h2>" + (table(["rule", "threshold (score >= passes)"], thresholds)
                                       if thresholds else "<p>none recorded</p>")
            + ("<h3>Published scores</h3>" + table(["score", "mean", "min", "p10", "p50", "p90", "max"], stats)
               if stats else ""))


def funnel_section(data: VersionData, plots: dict[str, bytes]) -> str:
    funnel = data.manifest.get("funnel") or {}
    steps = funnel_steps(funnel)
    first = steps[0][1] if steps else 0
    step_rows = [[label, count, percent(count, first), percent(count, steps[i - 1][1]) if i else "—"]
                 for i, (label, count) in enumerate(steps)]
    reasons = sorted((funnel.get("rejections") or {}).items(), key=lambda item: -item[1])
    return ("<h2>Funnel</h2>" + plot_img(plots, "funnel", "funnel and rejections")
            + table(["step", "count", f"of {steps[0][0] if steps else 'first'}", "of previous"], step_rows)
            + ("<h3>Rejections</h3>" + table(["stage:reason", "count", "share of first step"],
                                            [[reason, n, percent(n, first)] for reason, n in reasons])
               if reasons else ""))


def scores_section(data: VersionData, plots: dict[str, bytes]) -> str:
    source = (data.candidates_note if data.candidates is not None
              else f"published samples only: {data.candidates_note}")
    return ("<h2>Scores</h2>" + f'<p class="muted">{esc(source)}; dashed line: the threshold.</p>'
            + (plot_img(plots, "scores", "score histograms") or "<p>no scores recorded</p>"))


def cost_section(data: VersionData, plots: dict[str, bytes]) -> str:
    rows = cost_rows(data.manifest)
    if not rows:
        return ("<h2>Cost</h2><p>No cost recorded for this version "
                "(a union or re-threshold spends none: see its parents).</p>")
    total = ["total", sum(r["actor_seconds"] for r in rows), sum(r["gpu_seconds"] for r in rows),
             sum(r["actor_per_sample"] for r in rows), sum(r["gpu_per_sample"] for r in rows), None]
    body = [[r["stage"], r["actor_seconds"], r["gpu_seconds"], r["actor_per_sample"], r["gpu_per_sample"],
             r["generator_gpu_seconds"]] for r in rows]
    return ("<h2>Cost per accepted sample</h2>" + plot_img(plots, "cost", "cost per accepted sample")
            + table(["stage", "actor s", "GPU s", "actor s / sample", "GPU s / sample", "generator GPU s"],
                    body + [total]))


def lineage_section(data: VersionData, plots: dict[str, bytes]) -> str:
    m = data.manifest
    rows = [["  " * (depth - 1) + ("└ " if depth > 1 else "") + str(entry["version"]),
             "missing" if entry.get("missing") else entry.get("kind"),
             entry.get("samples"), entry.get("round"), entry.get("created")] for depth, entry in data.ancestry]
    rounds = value_counts(data.index["round"]) if "round" in data.index else []
    alphas = value_counts(data.index["alpha"]) if "alpha" in data.index else []
    facts = [["kind", m["kind"]], ["round", m.get("round", "—")],
             ["samples by round", ", ".join(f"{r}: {n}" for r, n in rounds) or "—"],
             ["samples by alpha", ", ".join(f"{a}: {n}" for a, n in alphas) or "— (no alpha: not SID)"]]
    by_alpha = alpha_rows(data.candidates)
    return ("<h2>Lineage</h2>" + table(["", ""], facts)
            + (table(["alpha", "candidates", "accepted", "rate", *(f"mean {name}" for name in SCORES)], by_alpha)
               if by_alpha else "")
            + (table(["ancestor", "kind", "samples", "round", "created"], rows) if rows
               else "<p>No parents: this version was made from scratch.</p>")
            + plot_img(plots, "lineage", "samples by alpha and round"))


def alpha_rows(candidates: pd.DataFrame | None) -> list[list[Any]]:
    """Per SID alpha: candidates, accepted, acceptance rate and mean scores (alpha trades w against x)."""
    if candidates is None or "alpha" not in candidates or candidates["alpha"].isna().all():
        return []
    rows = []
    for alpha, group in candidates.dropna(subset=["alpha"]).groupby("alpha"):
        accepted = int(group["reject_reason"].isna().sum())
        means = [mean_or_none(group[name]) if name in group else None for name in SCORES]
        rows.append([f"{alpha:g}", len(group), accepted, percent(accepted, len(group)), *means])
    return rows


def mean_or_none(values: pd.Series) -> float | None:
    kept = finite(values)
    return float(kept.mean()) if kept.size else None


def score_badges(scores: dict[str, float], thresholds: dict[str, Any]) -> str:
    badges = []
    for name, value in scores.items():
        passed = not np.isnan(value) and (name not in thresholds or value >= float(thresholds[name]))
        badges.append(f'<span class="{"pass" if passed else "fail"}">{esc(name)} {number(value)}</span>')
    return " ".join(badges)


def card_html(card: Card, thresholds: dict[str, Any]) -> str:
    images = "".join(
        f'<figure><img alt="{esc(label)}" src="{uri}"><figcaption>{esc(caption)}</figcaption></figure>' if uri
        else f"<figure><figcaption>{esc(caption)}: not shown</figcaption></figure>"
        for uri, label, caption in ((card.input_uri, "x", "x (reference)"), (card.target_uri, "x~", "x~ (new)"))
    )
    problems = f'<div class="fail">{esc("; ".join(card.image_problems))}</div>' if card.image_problems else ""
    reason = f'<div class="fail">rejected: {esc(card.reason)}</div>' if card.reason else ""
    return (f'<div class="card {card.status}"><div class="pair">{images}</div>{problems}{reason}'
            f"<div>{score_badges(card.scores, thresholds)}</div>"
            f'<div class="text"><b>instruction:</b> {esc(card.instruction)}</div>'
            f'<div class="text"><b>y (user):</b> {esc(card.user) or "—"}</div>'
            f'<div class="text"><b>y~ (assistant):</b> {esc(card.assistant) or "—"}</div>'
            f'<div class="key">{esc(card.key)}</div></div>')


def gallery_section(data: VersionData, accepted: list[Card], rejected: list[Card]) -> str:
    thresholds = data.manifest.get("thresholds") or {}
    left = (f"<h3>Accepted: {len(accepted)} sampled of {len(data.index)}</h3>"
            + "".join(card_html(card, thresholds) for card in accepted))
    if data.candidates is None:
        right = (f"<h3>Rejected near the thresholds</h3><p>Not available: {esc(data.candidates_note)}. "
                 "The gallery shows accepted samples only.</p>")
    else:
        right = (f"<h3>Rejected near the thresholds: the {len(rejected)} nearest</h3>"
                 + ("".join(card_html(card, thresholds) for card in rejected)
                    or "<p>No candidate was rejected by the filter.</p>"))
    return ('<h2>Gallery</h2><p class="muted">x, x~, y, y~ and scores; samples are drawn deterministically '
            f'(by a hash of version and key).</p><div class="columns"><div>{left}</div><div>{right}</div></div>')


def models_section(data: VersionData) -> str:
    models = data.manifest.get("models") or {}
    rows = [[name, spec.get("source") if isinstance(spec, dict) else spec,
             (spec.get("sha256") or spec.get("revision") or "")[:16] if isinstance(spec, dict) else ""]
            for name, spec in models.items()]
    listed = table(["model", "source", "sha256 / revision"], rows) if rows else "<p>none recorded</p>"
    return "<h2>Models</h2>" + listed


def render_html(data: VersionData, plots: dict[str, bytes], accepted: list[Card], rejected: list[Card]) -> str:
    m = data.manifest
    sections = [header_section(data), funnel_section(data, plots), scores_section(data, plots),
                cost_section(data, plots), lineage_section(data, plots), gallery_section(data, accepted, rejected),
                models_section(data)]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<link rel="icon" href="data:,">'
            f"<title>{esc(m['dataset'])}/{esc(m['version'])} report</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def write_report(storage: Storage, dataset: str, version: str, out_dir: str | Path | None = None) -> Path:
    """Write `report.html` and its PNG plots into `out_dir` (default reports/<dataset>/<version>/)."""
    started = time.perf_counter()
    out = Path(out_dir) if out_dir else default_out_dir(dataset, version)
    data = load_version_data(storage, dataset, version)
    plots = render_plots(data)
    accepted = accepted_cards(storage, data)
    try:
        rejected = near_threshold_cards(storage, data)
    except StorageError as err:  # a unit file that vanished since it was listed
        data.candidates_note += f" (reading candidate images failed: {err})"
        rejected = []
    out.mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
    path = out / "report.html"
    path.write_text(render_html(data, plots, accepted, rejected), encoding="utf-8")
    log.info("report %s/%s: %d samples, %s, %d plots, %d+%d gallery cards, %.1f s", dataset, version,
             len(data.index), data.candidates_note, len(plots), len(accepted), len(rejected),
             time.perf_counter() - started)
    return path
