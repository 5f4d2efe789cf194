"""The page: one self-contained HTML file (no script, nothing loaded from outside, every text escaped)."""

from __future__ import annotations

import base64
import html
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from factory.cost import version_estimates
from factory.framework.storage import LocalStorage, Storage, StorageError
from factory.report.data import VersionData, default_out_dir, load_version_data, text
from factory.report.evals import eval_rows
from factory.report.gallery import Card, accepted_cards, near_threshold_cards
from factory.report.plots import cost_rows, funnel_steps, render_plots
from factory.report.review import disagreement_cards, figure_rows
from factory.report.summary import SCORES, CandidateSummary
from filters.rules import RULES

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#666}
img.plot{max-width:100%;border:1px solid #eee}
.columns{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;margin-bottom:12px;background:#fafafa}
.card.rejected{border-color:#e3a0a0;background:#fff6f6}
.card.disagreement{border-color:#e0c060;background:#fffbea}
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
                    body + [total]) + estimate_section(data.manifest))


def estimate_section(manifest: dict) -> str:
    """GPU-hours per 1M accepted at this version's pass rate, per device kind (`factory.cost`)."""
    rows = version_estimates(manifest)
    if not rows:
        return ""
    body = [[r["device"], r["unit"], *(f"{r['stages'][s]:,.0f} ({r['sources'][s]})" for s in r["stages"]),
             f"{r['total']:,.0f}"] for r in rows]
    return ("<h3>1M accepted samples at this pass rate</h3>"
            '<p class="muted">hours per stage; in brackets where each figure comes from: measured (this version '
            "or bench/real_size.py), paper, derived or assumed</p>"
            + table(["device", "unit", "generate", "filter", "dialogue", "total"], body))


def lineage_section(data: VersionData, plots: dict[str, bytes]) -> str:
    m = data.manifest
    rows = [["  " * (depth - 1) + ("└ " if depth > 1 else "") + str(entry["version"]),
             "missing" if entry.get("missing") else entry.get("kind"),
             entry.get("samples"), entry.get("round"), entry.get("created")] for depth, entry in data.ancestry]
    rounds, alphas = data.index.counts("round"), data.index.counts("alpha")
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


def alpha_rows(candidates: CandidateSummary | None) -> list[list[Any]]:
    """Per SID alpha: candidates, accepted, acceptance rate and mean scores (alpha trades w against x)."""
    if candidates is None:
        return []
    return [[f"{alpha:g}", tally.candidates, tally.accepted, percent(tally.accepted, tally.candidates),
             *(tally.mean(name) for name in SCORES)] for alpha, tally in sorted(candidates.alphas.items())]


def score_badges(scores: dict[str, float], thresholds: dict[str, Any]) -> str:
    badges = []
    for name, value in scores.items():
        passed = bool(RULES[name].passes(value, thresholds[name])) if name in thresholds and name in RULES \
            else not np.isnan(value)
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
    reason += "".join(f'<div class="text">{esc(vote)}</div>' for vote in card.votes)
    return (f'<div class="card {card.status}"><div class="pair">{images}</div>{problems}{reason}'
            f"<div>{score_badges(card.scores, thresholds)}</div>"
            f'<div class="text"><b>instruction:</b> {esc(card.instruction)}</div>'
            f'<div class="text"><b>y (user):</b> {esc(card.user) or "—"}</div>'
            f'<div class="text"><b>y~ (assistant):</b> {esc(card.assistant) or "—"}</div>'
            f'<div class="key">{esc(card.key)}</div></div>')


def gallery_section(data: VersionData, accepted: list[Card], rejected: list[Card]) -> str:
    thresholds = data.manifest.get("thresholds") or {}
    left = (f"<h3>Accepted: {len(accepted)} sampled of {data.index.rows}</h3>"
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


def review_section(data: VersionData, disagreements: list[Card]) -> str:
    review = data.manifest.get("review")
    if not review:
        return ""
    thresholds = data.manifest.get("thresholds") or {}
    cards = "".join(card_html(card, thresholds) for card in disagreements)
    return ("<h2>Human review</h2>" + table(["", ""], figure_rows(review))
            + f"<h3>Disagreements: {len(disagreements)} of {review['disagreements']}</h3>"
            + (f'<div class="columns">{cards}</div>' if cards else "<p>The reviewers agreed on every sample.</p>"))


def models_section(data: VersionData) -> str:
    models = data.manifest.get("models") or {}
    rows = [[name, spec.get("source") if isinstance(spec, dict) else spec,
             (spec.get("sha256") or spec.get("revision") or "")[:16] if isinstance(spec, dict) else ""]
            for name, spec in models.items()]
    listed = table(["model", "source", "sha256 / revision"], rows) if rows else "<p>none recorded</p>"
    return "<h2>Models</h2>" + listed


def evals_section(data: VersionData) -> str:
    if not data.evals:
        return ("<h2>Evaluations</h2><p>No generator trained on this version has been evaluated "
                "(<code>python -m factory.run --stage eval</code>).</p>")
    headers = ["checkpoint", "eval set", "condition", "images", "DINO", "CLIP-I", "CLIP-T", "created"]
    return "<h2>Evaluations</h2>" + table(headers, eval_rows(data.evals))


def render_html(data: VersionData, plots: dict[str, bytes], accepted: list[Card], rejected: list[Card],
                disagreements: list[Card] = ()) -> str:
    m = data.manifest
    sections = [header_section(data), review_section(data, list(disagreements)), funnel_section(data, plots),
                scores_section(data, plots),
                cost_section(data, plots), lineage_section(data, plots), gallery_section(data, accepted, rejected),
                models_section(data), evals_section(data)]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<link rel="icon" href="data:,">'
            f"<title>{esc(m['dataset'])}/{esc(m['version'])} report</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def write_report(storage: Storage, dataset: str, version: str, out_dir: str | Path | None = None) -> Path:
    """Write `report.html` and its PNG plots into `out_dir` (default reports/<dataset>/<version>/)."""
    started = time.perf_counter()
    out = Path(out_dir) if out_dir else default_out_dir(dataset, version)
    if out.exists() and not out.is_dir():  # before the version is read
        raise ValueError(f"--out {out} is a file: name a folder for report.html and its plots")
    data = load_version_data(storage, dataset, version)
    plots = render_plots(data)
    accepted = accepted_cards(storage, data)
    try:
        rejected = near_threshold_cards(storage, data)
    except StorageError as err:  # a unit file that vanished since it was listed
        data.candidates_note += f" (reading candidate images failed: {err})"
        rejected = []
    disagreements = disagreement_cards(storage, data.manifest)
    folder = LocalStorage(out)  # each file written whole, then renamed: a killed run leaves the last report
    for name, png in plots.items():
        folder.write_bytes(f"{name}.png", png)
    folder.write_bytes("report.html", render_html(data, plots, accepted, rejected, disagreements).encode("utf-8"))
    path = out / "report.html"
    log.info("report %s/%s: %d samples, %s, %d plots, %d+%d gallery cards, %.1f s", dataset, version,
             data.index.rows, data.candidates_note, len(plots), len(accepted), len(rejected),
             time.perf_counter() - started)
    return path
