"""The version report: numbers, escaping, gallery, and a render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
import zlib
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from factory.dataset.manifest import VersionSpec, union_versions
from factory.dataset.publisher import publish_samples
from factory.framework import layout
from factory.framework.config import StorageConfig
from factory.framework.storage import LocalStorage, Storage, open_storage
from factory.report import GALLERY_MAX_SHARDS, GALLERY_SIZE, NEAR_SIZE, write_report
from factory.versions import main
from tests.factory.conftest import jpeg, make_samples

THRESHOLDS = {"clip_t": 0.3, "dino": 0.6}
HOSTILE_USER = 'Make it pop <script>alert("x")</script> & <img src=x onerror=alert(1)>'
ALPHAS = (0.25, 0.5, 0.75)
CLIP_MISSES = (0.01, 0.03, 0.05, 0.07, 0.09, 0.11)  # how far each filter rejection falls short
DINO_MISSES = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12)
COST = {"generate": {"actor_seconds": 44.0, "gpu_seconds": 44.0, "generator_gpu_seconds": 40.0},
        "filter": {"actor_seconds": 5.5, "gpu_seconds": 2.75},
        "dialogue": {"actor_seconds": 11.0, "gpu_seconds": 22.0}}


def sid_samples() -> list:
    samples = []
    for n, sample in enumerate(make_samples(11, start=100, round_=1)):
        meta = {**sample.meta, "round": 1, "generator": {**sample.meta["generator"], "alpha": ALPHAS[n % 3]}}
        user = HOSTILE_USER if n == 0 else sample.user
        samples.append(replace(sample, meta=meta, user=user))
    return samples


def candidate_row(key: str, unit: int, clip_t: float, dino: float, stage=None, reason=None, alpha=0.75,
                  **texts) -> dict:
    return {"key": key, "unit": unit, "alpha": alpha, "clip_t": clip_t, "dino": dino,
            "pass_clip_t": clip_t >= THRESHOLDS["clip_t"], "pass_dino": dino >= THRESHOLDS["dino"],
            "reject_stage": stage, "reject_reason": reason, "input_image": jpeg(zlib.crc32(key.encode()) % 997),
            "target_image": None if stage == "generate" else jpeg(zlib.crc32(key.encode()) % 991 + 1),
            "instruction": texts.get("instruction", f"instruction of {key}"),
            "user": texts.get("user"), "assistant": texts.get("assistant")}


def funnel(rows: pd.DataFrame, written: int) -> dict:
    """The funnel a publish of these rows states (an oracle for the page's numbers)."""
    generated = rows["reject_stage"].ne("generate")
    passed_clip = generated & rows["pass_clip_t"]
    passed_dino = passed_clip & rows["pass_dino"]
    rejected = rows[rows["reject_reason"].notna()]
    reasons = (rejected["reject_stage"] + ":" + rejected["reject_reason"]).value_counts()
    return {"planned": len(rows), "generated": int(generated.sum()), "passed_clip": int(passed_clip.sum()),
            "passed_dino": int(passed_dino.sum()), "dialogue_accepted": int(rows["reject_reason"].isna().sum()),
            "written": written, "rejections": {reason: int(count) for reason, count in sorted(reasons.items())}}


def run_rows(accepted: list) -> pd.DataFrame:
    rows = [candidate_row(s.key, n % 2, s.meta["scores"]["clip_t"], s.meta["scores"]["dino"],
                          alpha=s.meta["generator"]["alpha"], instruction=s.meta["instruction"], user=s.user,
                          assistant=s.assistant)
            for n, s in enumerate(accepted)]
    for n, miss in enumerate(CLIP_MISSES):
        rows.append(candidate_row(f"clipmiss{n}", n % 2, THRESHOLDS["clip_t"] - miss, 0.9,
                                  "filter", "clip_t_below_threshold", instruction=f"near <b>clip</b> {n}"))
    for n, miss in enumerate(DINO_MISSES):
        rows.append(candidate_row(f"dinomiss{n}", n % 2, 0.5, THRESHOLDS["dino"] - miss,
                                  "filter", "dino_below_threshold"))
    rows.append(candidate_row("talkfail", 0, 0.5, 0.9, "dialogue", "dialogue_invalid_json"))
    rows.append(candidate_row("genfail", 1, float("nan"), float("nan"), "generate", "corrupt_image"))
    return pd.DataFrame(rows)


def build_root(storage: Storage, units: int | None = None) -> Storage:
    """v0 (bootstrap), v1 (SID round 1 of v0, with its run's rows) and u1 = v0 + v1.

    `units` spreads the same run rows over that many unit files (default: two)."""
    publish_samples(storage, VersionSpec(dataset="demo", version="v0", kind="bootstrap", thresholds=THRESHOLDS,
                                         funnel={"planned": 5, "written": 5}), make_samples(5))
    accepted = sid_samples()
    rows = run_rows(accepted)
    if units is not None:
        rows["unit"] = np.arange(len(rows)) % units
    # as a run stores them: x in the reference set, x~ in generate's unit files, the rest in dialogue's
    part = layout.reference_part("r", 0)
    rows = rows.assign(reference_part=part, reference_id=rows["key"])
    references = rows[["reference_id", "input_image"]].rename(columns={"input_image": "image"})
    storage.write_parquet(part, pa.Table.from_pandas(references, preserve_index=False))
    for unit, unit_rows in rows.groupby("unit"):
        unit_rows = unit_rows.reset_index(drop=True)
        drawn = pa.Table.from_pandas(unit_rows[["key", "unit", "target_image"]], preserve_index=False)
        storage.write_parquet(layout.unit_file("run1", "generate", unit), drawn)
        kept = pa.Table.from_pandas(unit_rows.drop(columns=["input_image", "target_image"]), preserve_index=False)
        storage.write_parquet(layout.unit_file("run1", "dialogue", unit), kept)
    spec = VersionSpec(dataset="demo", version="v1", kind="sid", parents=["v0"], thresholds=THRESHOLDS,
                       funnel=funnel(rows, len(accepted)), cost=COST, extra={"run_id": "run1", "round": 1})
    publish_samples(storage, spec, accepted, shard_max_samples=3)
    union_versions(storage, VersionSpec(dataset="demo", version="u1", kind="union", parents=["v0", "v1"]))
    return storage


@pytest.fixture(scope="module")
def factory_root(tmp_path_factory):
    """Shared by the tests that only read it."""
    return build_root(LocalStorage(tmp_path_factory.mktemp("root")))


@pytest.fixture(scope="module")
def report(factory_root, tmp_path_factory):
    path = write_report(factory_root, "demo", "v1", tmp_path_factory.mktemp("report"))
    return path, path.read_text(encoding="utf-8")


class Tables(HTMLParser):
    """Every table cell's text, row by row."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def row(self, first: str) -> list[str]:
        return next(row for row in self.rows if row and row[0] == first)


def card_keys(page: str, status: str) -> list[str]:
    return re.findall(rf'<div class="card {status}">.*?<div class="key">([^<]*)</div>', page, flags=re.S)


def test_report_states_the_funnel_thresholds_and_cost_per_sample(report, factory_root):
    _, page = report
    tables = Tables(page)
    expected = funnel(run_rows(sid_samples()), 11)
    for name, label in (("planned", "planned"), ("generated", "generated"), ("passed_clip", "passed CLIP"),
                        ("passed_dino", "passed DINO"), ("dialogue_accepted", "dialogue accepted"),
                        ("written", "written")):
        assert tables.row(label)[1] == f"{expected[name]:,}"
    assert tables.row("filter:clip_t_below_threshold")[1] == str(len(CLIP_MISSES))
    assert tables.row("generate:corrupt_image")[1] == "1"
    assert float(tables.row("clip_t")[1]) == 0.3 and float(tables.row("dino")[1]) == 0.6
    dialogue = tables.row("dialogue")
    assert float(dialogue[4]) == pytest.approx(COST["dialogue"]["gpu_seconds"] / 11, rel=1e-3)
    assert tables.row("samples by alpha")[1] == "0.25: 4, 0.5: 4, 0.75: 3"
    rejected_at_075 = len(CLIP_MISSES) + len(DINO_MISSES) + 2  # every rejected candidate was drawn at 0.75
    assert tables.row("0.75")[1:4] == [str(3 + rejected_at_075), "3", f"{100 * 3 / (3 + rejected_at_075):.1f}%"]
    assert tables.row("v0")[1] == "bootstrap"


def test_user_text_from_the_llm_is_escaped_and_the_page_has_no_script(report):
    _, page = report
    assert "<script" not in page.lower() and "onerror=alert" not in page.replace("&lt;img src=x onerror=alert", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page
    assert "near &lt;b&gt;clip&lt;/b&gt;" in page


def test_plots_are_saved_and_embedded_and_images_are_inline(report):
    path, page = report
    for name in ("funnel", "scores", "cost", "lineage"):
        png = (path.parent / f"{name}.png").read_bytes()
        assert Image.open(io.BytesIO(png)).format == "PNG"
        assert base64.b64encode(png).decode() in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/") for source in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page)
    thumbnail = next(s for s in sources if s.startswith("data:image/jpeg"))
    assert max(Image.open(io.BytesIO(base64.b64decode(thumbnail.split(",", 1)[1]))).size) <= 256


def test_gallery_samples_deterministically_and_shows_the_nearest_rejections(report, factory_root, tmp_path):
    _, page = report
    accepted = card_keys(page, "accepted")
    index = factory_root.read_parquet("datasets/demo/v1/index.parquet").to_pandas().set_index("key")
    assert 0 < len(accepted) <= GALLERY_SIZE and set(accepted) <= set(index.index)
    assert index.loc[accepted, "shard"].nunique() <= GALLERY_MAX_SHARDS
    misses = sorted([(m, f"clipmiss{n}") for n, m in enumerate(CLIP_MISSES)]
                    + [(m, f"dinomiss{n}") for n, m in enumerate(DINO_MISSES)])
    assert card_keys(page, "rejected") == [key for _, key in misses[:NEAR_SIZE]]
    assert "rejected: filter:dino_below_threshold" in page and "talkfail" not in page
    rejected_cards = re.findall(r'<div class="card rejected"><div class="pair">(.*?)</div>', page, flags=re.S)
    assert rejected_cards and all(card.count('src="data:image/') == 2 for card in rejected_cards), \
        "a near-threshold card must show x (from the reference set) and x~ (from generate's unit file)"
    again = write_report(factory_root, "demo", "v1", tmp_path / "again").read_text(encoding="utf-8")
    assert again == page


def test_a_union_shows_accepted_samples_only_and_says_why(tmp_path):
    factory_root = build_root(LocalStorage(tmp_path / "root"))
    page = write_report(factory_root, "demo", "u1", tmp_path / "u1").read_text(encoding="utf-8")
    assert card_keys(page, "accepted") and not card_keys(page, "rejected")
    assert "The gallery shows accepted samples only" in page and "union version names no run" in page
    factory_root.delete("runs/run1/dialogue/unit-000000.parquet")
    factory_root.delete("runs/run1/dialogue/unit-000001.parquet")
    page = write_report(factory_root, "demo", "v1", tmp_path / "v1").read_text(encoding="utf-8")
    assert "no candidate rows under runs/run1/dialogue" in page and not card_keys(page, "rejected")


def test_report_reads_a_version_on_s3(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    storage = build_root(open_storage(StorageConfig(root=f"s3://{bucket}/factory", endpoint_url=endpoint)))
    page = write_report(storage, "demo", "v1", tmp_path / "s3").read_text(encoding="utf-8")
    assert card_keys(page, "accepted") and len(card_keys(page, "rejected")) == NEAR_SIZE


def test_cli_writes_the_report(factory_root, tmp_path, capsys, monkeypatch):
    root = ["--set", f"storage.root={factory_root.base}"]
    assert main(root + ["report", "v1", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.html").is_file() and "report" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(root + ["report", "v0"]) == 0
    assert (tmp_path / "reports" / "demo" / "v0" / "report.html").is_file()
    assert main(root + ["report", "nope"]) == 2
    (tmp_path / "a-file").write_text("mine")
    capsys.readouterr()
    assert main(root + ["report", "v1", "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file is a file: name a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_report_killed_while_written_leaves_the_last_one_whole(factory_root, tmp_path, monkeypatch):
    import os

    import factory.report.page

    first = write_report(factory_root, "demo", "v1", tmp_path).read_bytes()
    def render_html(data, plots, accepted, rejected, disagreements=()):  # the real signature
        return "<html>the next report"

    monkeypatch.setattr(factory.report.page, "render_html", render_html)

    def killed_before_the_rename(source, target):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        write_report(factory_root, "demo", "v1", tmp_path)
    assert (tmp_path / "report.html").read_bytes() == first
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def comparable(page: str) -> str:
    """The page without what differs between two builds of the same rows: times and the unit-file count."""
    page = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", "TIME", page)
    return re.sub(r"candidates from \d+ unit files", "candidates from N unit files", page)


def test_a_run_grown_to_many_unit_files_gives_the_same_figures(report, tmp_path):
    path, page = report
    rows = len(run_rows(sid_samples()))
    grown = build_root(LocalStorage(tmp_path / "root"), units=rows)  # one candidate per unit file
    assert len(grown.list("runs/run1/dialogue")) == rows
    grown_path = write_report(grown, "demo", "v1", tmp_path / "grown")
    grown_page = grown_path.read_text(encoding="utf-8")
    assert f"{rows} candidates from {rows} unit files" in grown_page
    assert f"{rows} candidates from 2 unit files" in page
    for name in ("funnel", "scores", "cost", "lineage"):
        assert (grown_path.parent / f"{name}.png").read_bytes() == (path.parent / f"{name}.png").read_bytes(), name
    assert card_keys(grown_page, "rejected") == card_keys(page, "rejected")
    assert comparable(grown_page) == comparable(page)


def random_run(units: int, rows: int, seed: int = 7) -> pd.DataFrame:
    """Candidate rows with scores anywhere in [-1, 1] (and a few outside or missing), over `units` files."""
    rng = np.random.default_rng(seed)
    stages = [None, "filter", "filter", "generate", "dialogue"]
    reasons = {None: None, "generate": "corrupt_image", "dialogue": "dialogue_invalid_json"}
    frame = pd.DataFrame({"key": [f"k{n:05d}" for n in range(rows)], "unit": rng.integers(0, units, rows),
                          "alpha": rng.choice([0.25, 0.5, np.nan], rows),
                          "clip_t": rng.uniform(-1.05, 1.05, rows), "dino": rng.uniform(-1, 1, rows)})
    frame.loc[rng.random(rows) < 0.05, "dino"] = np.nan
    drawn = [stages[n] for n in rng.integers(0, len(stages), rows)]
    frame["reject_stage"] = drawn
    frame["reject_reason"] = [("clip_t_below_threshold" if clip < THRESHOLDS["clip_t"] else "dino_below_threshold")
                              if stage == "filter" else reasons[stage] for stage, clip in zip(drawn, frame["clip_t"])]
    frame["unit_file"] = [layout.unit_file("run", "dialogue", int(unit)) for unit in frame["unit"]]
    return frame


def test_candidate_summaries_merged_per_unit_equal_the_summary_of_every_row():
    from factory.report.summary import SCORE_BINS, SCORE_RANGE, CandidateSummary, merge, threshold_miss

    rows = random_run(units=23, rows=3000)
    per_unit = [CandidateSummary.of_rows(group.drop(columns="unit_file"), THRESHOLDS, unit_file)
                for unit_file, group in rows.groupby("unit_file")]
    merged = merge(reversed(per_unit))  # the order units are read in does not matter
    at_once = CandidateSummary.of_rows(rows, THRESHOLDS, files=len(per_unit))
    assert (merged.rows, merged.files) == (at_once.rows, at_once.files) == (len(rows), 23)
    alive = rows["reject_reason"].isna()
    for name in ("clip_t", "dino"):
        for group, chosen in (("accepted", alive), ("rejected", ~alive)):
            values = rows.loc[chosen, name].dropna().clip(*SCORE_RANGE)
            expected = np.histogram(values, bins=SCORE_BINS, range=SCORE_RANGE)[0]
            assert np.array_equal(merged.histograms[name][group], expected), (name, group)
            assert np.array_equal(at_once.histograms[name][group], expected), (name, group)
    oracle = rows.dropna(subset=["alpha"]).groupby("alpha")
    assert sorted(merged.alphas) == sorted(oracle.groups) == [0.25, 0.5]
    for alpha, group in oracle:
        tally = merged.alphas[alpha]
        assert (tally.candidates, tally.accepted) == (len(group), int(group["reject_reason"].isna().sum()))
        for name in ("clip_t", "dino"):
            assert tally.mean(name) == pytest.approx(group[name].mean())
    # the old all-rows computation of the near-threshold gallery, as the oracle
    rejected = rows[rows["reject_reason"].isin(["clip_t_below_threshold", "dino_below_threshold"])].copy()
    rejected["miss"] = threshold_miss(rejected, THRESHOLDS)
    nearest = rejected[rejected["miss"].notna()].sort_values(["miss", "key"]).head(NEAR_SIZE)
    expected = list(zip(nearest["miss"], nearest["key"], nearest["unit_file"]))
    assert merged.nearest == at_once.nearest == expected and len(expected) == NEAR_SIZE


def test_candidates_are_read_one_unit_file_at_a_time(tmp_path, monkeypatch):
    import gc
    import weakref

    from factory.dataset.manifest import load_manifest
    from factory.report import data

    storage = build_root(LocalStorage(tmp_path / "root"), units=7)
    read, alive_at_read = [], []
    original = data.read_columns

    def counting(*args, **kwargs):
        gc.collect()
        alive_at_read.append(sum(ref() is not None for ref in read))
        frame = original(*args, **kwargs)
        read.append(weakref.ref(frame))
        return frame

    monkeypatch.setattr(data, "read_columns", counting)
    summary, note = data.summarise_candidates(storage, load_manifest(storage, "demo", "v1"))
    unit_rows = [len(storage.read_parquet(key)) for key in data.candidate_files(storage, "run1")]
    assert len(read) == len(unit_rows) == 7 and summary.rows == sum(unit_rows)
    assert alive_at_read == [0] * 7, "a unit file's rows were still held when the next one was read"
    gc.collect()
    assert all(ref() is None for ref in read)  # the summary keeps no rows


def test_the_index_is_read_in_bounded_batches_of_the_columns_the_report_uses(factory_root, monkeypatch):
    from factory.report import data
    from factory.report.summary import INDEX_COLUMNS, IndexSummary

    batches = []
    original = IndexSummary.add_batch

    def counting(self, batch):
        batches.append((batch.num_rows, tuple(batch.schema.names)))
        original(self, batch)

    monkeypatch.setattr(data, "INDEX_BATCH_ROWS", 3)
    monkeypatch.setattr(IndexSummary, "add_batch", counting)
    streamed = data.summarise_index(factory_root, "demo", "v1")
    index = factory_root.read_parquet("datasets/demo/v1/index.parquet")
    assert len(batches) == -(-index.num_rows // 3) and max(rows for rows, _ in batches) == 3
    assert all(set(names) <= set(INDEX_COLUMNS) and "instruction" not in names for _, names in batches)
    batches.clear()
    whole = IndexSummary("v1")
    whole.add_batch(index)
    assert (streamed.rows, streamed.rounds, streamed.alphas, streamed.shard_first) == \
        (whole.rows, whole.rounds, whole.alphas, whole.shard_first)
    assert all(np.array_equal(streamed.histograms[name], whole.histograms[name]) for name in ("clip_t", "dino"))
    frame = index.to_pandas()
    alphas = frame["alpha"].value_counts().sort_index()
    assert streamed.counts("alpha") == [(f"{alpha:g}", int(n)) for alpha, n in alphas.items()]
    assert set(streamed.shard_first) == set(frame["shard"])


# --- headless Chromium over the DevTools pipe (no Playwright, no websocket) ------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe")


class DevTools:
    """Chrome DevTools Protocol over `--remote-debugging-pipe`: JSON messages ended by NUL on fds 3/4.

    bash (not dash, which knows fds 0-9 only) moves the pipe ends to fds 3 and 4 before exec.
    """

    def __init__(self, profile: Path, log: Path, timeout: float = 60):
        to_browser, self.write_fd = os.pipe()
        self.read_fd, from_browser = os.pipe()
        command = ["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "bash", CHROMIUM, *CHROMIUM_FLAGS,
                   f"--user-data-dir={profile}", "about:blank"]
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(command, pass_fds=(to_browser, from_browser),
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        os.close(to_browser)
        os.close(from_browser)
        self.log, self.deadline, self.buffer, self.last_id, self.events = log, time.monotonic() + timeout, b"", 0, []

    def receive(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer; its log: {self.log}")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium closed the pipe; its log: {self.log}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while True:
            found = [event for event in self.events if event.get("method") == method]
            if found:
                return found[0]
            self.events.append(self.receive())

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (EOFError, TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)


def page_problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries, and any request leaving the file."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            values = (arg.get("value", arg.get("description")) for arg in params["args"])
            problems.append("console: " + " ".join(map(str, values)))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            problems.append(f"exception: {details.get('text')} {details.get('exception', {}).get('description')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append("log: " + params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:", "about:")):
                problems.append(f"request: {url}")
    return problems


def render(browser: DevTools, url: str, screenshot: Path) -> tuple[list[str], dict]:
    """Load a page in a fresh tab; return its problems and a few facts about what it drew."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1200, "height": 2000, "deviceScaleFactor": 1, "mobile": False}, session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_for("Page.loadEventFired")
    facts = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """({
        images: document.images.length,
        broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
        height: document.body.scrollHeight, title: document.title})"""}, session)["result"]["value"]
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    problems = page_problems(browser.events)
    browser.send("Target.closeTarget", {"targetId": target})
    return problems, facts


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (CI installs it: .ci/run)")
def test_report_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    path, _ = report
    control = tmp_path / "control.html"
    control.write_text('<!doctype html><body><p>control</p><script>console.error("planted error");'
                       "throw new Error('planted exception')</script></body>", encoding="utf-8")
    browser = DevTools(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        control_problems, _ = render(browser, control.as_uri(), tmp_path / "control.png")
        problems, facts = render(browser, path.resolve().as_uri(), tmp_path / "report.png")
    finally:
        browser.close()
    assert any("planted error" in p for p in control_problems), control_problems  # the detector works
    assert any("planted exception" in p for p in control_problems), control_problems
    assert problems == [], problems
    assert facts["images"] >= 4 + 2 * NEAR_SIZE and facts["broken"] == 0 and facts["title"] == "demo/v1 report"
    shot = Image.open(tmp_path / "report.png")
    assert shot.width == 1200 and shot.height >= 2000
    pixels = np.asarray(shot.convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn, not a blank page
    print(f"report screenshot: {tmp_path / 'report.png'}")
