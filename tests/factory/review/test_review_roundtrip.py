"""The review round trip against a real Label Studio: export, two reviewers vote through the API, import."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from factory.dataset.manifest import list_versions, load_manifest, read_index, verify_version
from factory.framework import layout
from factory.framework.storage import LocalStorage
from factory.versions import main
from tests.factory.review.conftest import REVIEWERS
from tests.factory.test_report import build_root
from tests.reliability.test_tampered_parents import flip_a_byte

pytestmark = pytest.mark.slow

ODD_REASON = 'Ünïcødé "quotes" <b>tags</b> & \\back\\slash\n2nd line 🙂\ttab; DROP TABLE tasks;--'
MARGIN = "0.055"  # the run's filter rejections miss by 0.01..0.12: five lie within 0.055


def run(capsys, monkeypatch, server, root, *args, reviewer=REVIEWERS[0]):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.tokens[reviewer])
    code = main(["--set", f"storage.root={root}", "--set", "dataset=demo", *args])
    out, err = capsys.readouterr()
    return code, out + err


def client(server, reviewer):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=server.url, api_key=server.tokens[reviewer])


def tasks_by_key(server, project_id):
    listed = client(server, REVIEWERS[0]).tasks.list(project=project_id, fields="all")
    return {task.data["key"]: task for task in listed}


def vote(server, reviewer, project_id, verdicts):
    """`reviewer` submits one annotation per key: (keep|drop, reason)."""
    as_reviewer = client(server, reviewer)
    for key, task in tasks_by_key(server, project_id).items():
        verdict, reason = verdicts[key]
        result = [{"from_name": "verdict", "to_name": "x_new", "type": "choices", "value": {"choices": [verdict]}}]
        if reason:
            result.append({"from_name": "reason", "to_name": "x_new", "type": "textarea", "value": {"text": [reason]}})
        as_reviewer.annotations.create(id=task.id, result=result)


def decoded(uri):
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def newest_record(storage):
    keys = sorted(storage.list(layout.review_records("demo", "v1")))
    return json.loads(storage.read_bytes(keys[-1]))


def test_export_vote_import_publishes_the_kept_samples_with_the_review_figures(
        label_studio, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    storage = build_root(LocalStorage(root))
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "export", "demo/v1", "--url",
                     label_studio.url, "--rejected", "4", "--margin", MARGIN, "--seed", "3")
    assert code == 0, said
    record = newest_record(storage)
    assert record["frame"]["size"] == 5 and record["frame"]["sampled"] == 4 and record["tasks"] == 15
    tasks = tasks_by_key(label_studio, record["project_id"])
    published = sorted(key for key, origin in record["origins"].items() if origin == "published")
    rejected = sorted(key for key, origin in record["origins"].items() if origin == "rejected")
    assert sorted(tasks) == sorted(record["origins"]) and len(published) == 11
    assert all(key.startswith(("clipmiss", "dinomiss")) for key in rejected)
    assert "origin" not in json.dumps(tasks[published[0]].data)  # reviewers are not told the filter's verdict
    assert decoded(tasks[published[0]].data["x"]).format == "JPEG"
    assert decoded(tasks[rejected[0]].data["x_new"]).size[0] > 0

    one = {key: ("keep", "") for key in record["origins"]}
    one.update({published[0]: ("drop", "the subject changed"), published[1]: ("drop", ODD_REASON),
                rejected[2]: ("drop", ""), rejected[3]: ("drop", "")})
    two = {key: ("keep", "") for key in record["origins"]}
    two.update({published[0]: ("drop", "not the same dog"), published[2]: ("drop", "blurry"),
                rejected[1]: ("drop", ""), rejected[2]: ("drop", ""), rejected[3]: ("drop", "")})
    vote(label_studio, REVIEWERS[0], record["project_id"], one)
    vote(label_studio, REVIEWERS[1], record["project_id"], two)

    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "demo/v1")
    assert code == 0, said
    reviewed = next(m for m in list_versions(storage, "demo") if m["kind"] == "reviewed")
    kept = sorted(published[3:])  # published[0]: both drop; [1] and [2]: a tie, not kept
    assert sorted(read_index(storage, "demo", reviewed["version"]).column("key").to_pylist()) == kept
    assert reviewed["samples"] == 8 and reviewed["parents"] == ["v1"] and reviewed["shards_superset"]
    assert verify_version(storage, "demo", reviewed["version"]) == []
    parent = load_manifest(storage, "demo", "v1")
    parent_shards = {layout.shard("demo", "v1", shard["path"]) for shard in parent["shards"]}
    assert {shard["path"] for shard in reviewed["shards"]} <= parent_shards  # listed, not copied
    assert not storage.list(f"{layout.version_dir('demo', reviewed['version'])}/shards")

    review = reviewed["review"]
    assert review["reviewers"] == 2 and review["votes"] == 30
    assert review["published"] == {"keep": 8, "drop": 1, "tie": 2, "unreviewed": 0}
    assert review["rejected_sample"] == {"keep": 1, "drop": 2, "tie": 1, "unreviewed": 0}
    assert review["agreement"]["pairwise"] == pytest.approx(12 / 15)
    # 30 votes, 21 keep / 9 drop, three split pairs: alpha = 1 - (6 / 30) / (2 * 21 * 9 / (30 * 29))
    assert review["agreement"]["krippendorff_alpha"] == pytest.approx(1 - 0.2 / (378 / 870), abs=1e-6)
    assert review["precision"]["value"] == pytest.approx(8 / 9, abs=1e-6)
    found, lost = 8 / 9 * 11, 1 / 3 * 5
    assert review["recall_estimate"]["value"] == pytest.approx(found / (found + lost), abs=1e-6)

    verdicts = storage.read_parquet(layout.review_verdicts("demo", reviewed["version"])).to_pylist()
    reasons = [vote["reason"] for row in verdicts for vote in json.loads(row["votes"])]
    assert ODD_REASON in reasons  # a reviewer's text survives the round trip byte for byte

    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "demo/v1")
    assert code == 0 and "nothing new" in said
    assert len(list_versions(storage, "demo")) == 4  # v0, v1, u1 and the one reviewed version

    code, said = run(capsys, monkeypatch, label_studio, root, "review", "export", reviewed["version"],
                     "--url", label_studio.url)
    assert code == 0, said
    again = json.loads(storage.read_bytes(sorted(storage.list(layout.review_records("demo", reviewed["version"])))[-1]))
    assert sorted(again["origins"]) == kept  # a reviewed version exports its own samples, not its shards' others

    written = [path.read_bytes() for path in root.rglob("*") if path.is_file() and path.suffix in (".json", ".parquet")]
    for token in label_studio.tokens.values():
        assert token not in said and not any(token.encode() in blob for blob in written)


def test_import_before_anyone_voted_is_a_clear_error_and_publishes_nothing(label_studio, tmp_path, capsys,
                                                                          monkeypatch):
    root = tmp_path / "root"
    storage = build_root(LocalStorage(root))
    assert run(capsys, monkeypatch, label_studio, root, "review", "export", "v1", "--url", label_studio.url)[0] == 0
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "v1")
    assert code == 2
    assert "no submitted keep/drop annotation yet" in said and str(newest_record(storage)["project_id"]) in said
    assert [m["kind"] for m in list_versions(storage, "demo")].count("reviewed") == 0


def test_an_export_stopped_after_making_its_project_names_it_and_import_passes_it_over(label_studio, tmp_path,
                                                                                        capsys, monkeypatch):
    from itertools import islice

    from factory.review import studio

    root = tmp_path / "root"
    storage = build_root(LocalStorage(root))
    send = studio.import_tasks

    def connection_lost_after_two(client, project_id, tasks):
        send(client, project_id, islice(tasks, 2))
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(studio, "import_tasks", connection_lost_after_two)
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "export", "v1", "--url", label_studio.url)
    pending = newest_record(storage)
    assert code == 2 and pending["status"] == "exporting"
    assert f"export to Label Studio project {pending['project_id']} stopped" in said and "delete that project" in said
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "v1",
                     "--project", str(pending["project_id"]))
    assert code == 2 and "did not finish: delete that project in Label Studio and export again" in said
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "v1")
    assert code == 2 and "has no review exported to any project" in said


def test_a_wrong_token_is_refused_without_echoing_it(label_studio, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    build_root(LocalStorage(root))
    bad = label_studio.tokens[REVIEWERS[0]][:-6] + "AAAAAA"  # a PAT whose signature does not match
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", bad)
    code = main(["--set", f"storage.root={root}", "--set", "dataset=demo", "review", "export", "v1",
                 "--url", label_studio.url])
    out, err = capsys.readouterr()
    assert code == 2 and "error:" in err
    assert bad not in out + err


def annotate(server, reviewer, task_id, choices, reason="", **fields):
    result = [{"from_name": "verdict", "to_name": "x_new", "type": "choices", "value": {"choices": choices}}]
    if reason:
        result.append({"from_name": "reason", "to_name": "x_new", "type": "textarea", "value": {"text": [reason]}})
    client(server, reviewer).annotations.create(id=task_id, result=result, **fields)


def test_import_counts_every_ignored_vote_by_reason_and_refuses_when_none_is_valid(label_studio, tmp_path, capsys,
                                                                                  monkeypatch):
    root = tmp_path / "root"
    storage = build_root(LocalStorage(root))
    assert run(capsys, monkeypatch, label_studio, root, "review", "export", "v1", "--url", label_studio.url)[0] == 0
    project_id = newest_record(storage)["project_id"]
    fields = {"x": "", "x_new": "", "instruction": "", "user": "", "assistant": ""}
    client(label_studio, REVIEWERS[0]).projects.import_tasks(  # tasks the export never sent
        id=project_id, request=[{"data": {**fields, "key": key}} for key in ("neverexported", "../../evil")])
    tasks = tasks_by_key(label_studio, project_id)
    annotate(label_studio, REVIEWERS[1], tasks["neverexported"].id, ["keep"])
    annotate(label_studio, REVIEWERS[1], tasks["../../evil"].id, ["keep"])

    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "v1")
    assert code == 2 and "no valid keep/drop vote" in said and "nothing published" in said
    assert "unknown_key 1" in said and "not_exported 1" in said
    assert [m["kind"] for m in list_versions(storage, "demo")].count("reviewed") == 0

    published = sorted(key for key in tasks if key in newest_record(storage)["origins"])
    annotate(label_studio, REVIEWERS[1], tasks[published[0]].id, ["keep"])
    annotate(label_studio, REVIEWERS[1], tasks[published[0]].id, ["drop"], "second thoughts")  # the first: duplicate
    annotate(label_studio, REVIEWERS[1], tasks[published[1]].id, [], was_cancelled=True)
    annotate(label_studio, REVIEWERS[1], tasks[published[2]].id, ["keep", "drop"])
    annotate(label_studio, REVIEWERS[1], tasks[published[3]].id, ["keep"], "why " * 2000)
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "import", "v1")
    assert code == 0, said
    expected = {"unknown_key": 1, "not_exported": 1, "duplicate": 1, "cancelled": 1, "several_choices": 1}
    assert "ignored annotations: " + ", ".join(f"{k} {n}" for k, n in expected.items()) in said
    assert "reasons cut to 2000 characters: 1" in said
    reviewed = next(m for m in list_versions(storage, "demo") if m["kind"] == "reviewed")
    assert reviewed["review"]["ignored"] == expected and reviewed["review"]["votes"] == 2
    verdicts = storage.read_parquet(layout.review_verdicts("demo", reviewed["version"])).to_pylist()
    reasons = sorted(vote["reason"] for row in verdicts for vote in json.loads(row["votes"]))
    assert reasons == ["second thoughts", ("why " * 2000)[:2000]]


def test_export_refuses_a_version_whose_shard_was_changed_naming_it(label_studio, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    storage = build_root(LocalStorage(root))
    shard = flip_a_byte(storage, load_manifest(storage, "demo", "v1"))
    code, said = run(capsys, monkeypatch, label_studio, root, "review", "export", "v1", "--url", label_studio.url)
    assert code == 2 and shard in said and "does not match its manifest" in said, said
    assert "delete that project and export again" in said  # the project was made before the shard was read
    records = [json.loads(storage.read_bytes(key)) for key in storage.list(layout.review_records("demo", "v1"))]
    assert [record["status"] for record in records] == ["exporting"]  # an unfinished export: nothing imports it
