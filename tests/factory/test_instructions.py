"""The instruction bank: the shipped bank's size and shape, validation, rendering."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from factory.dataset.instructions import (
    CATEGORIES,
    DOMAINS,
    BankError,
    load_bank,
    read_bank,
    render,
    shipped_bank_path,
)

SENTINEL = "Qzx"


@pytest.fixture(scope="module")
def bank():
    return load_bank()


def test_shipped_bank_has_at_least_100_templates_per_domain(bank):
    counts = Counter(instruction.domain for instruction in bank)
    assert set(counts) == set(DOMAINS)
    assert all(count >= 100 for count in counts.values()), counts


def test_shipped_bank_ids_are_unique_explicit_and_match_their_domain(bank):
    ids = [instruction.id for instruction in bank]
    assert len(ids) == len(set(ids))
    raw = yaml.safe_load(shipped_bank_path().read_text())["instructions"]
    assert sorted(entry["id"] for entries in raw.values() for entry in entries) == sorted(ids)
    prefix = {"human": "hum-", "object": "obj-"}
    assert all(i.id.startswith(prefix[i.domain] + i.category + "-") for i in bank)


def test_shipped_bank_is_varied(bank):
    for domain in DOMAINS:
        templates = [i.template for i in bank if i.domain == domain]
        assert len(templates) == len(set(templates)), f"repeated template in {domain}"
        categories = Counter(i.category for i in bank if i.domain == domain)
        assert len(categories) >= 8 and max(categories.values()) < 0.3 * len(templates), categories
    assert {i.category for i in bank} <= set(CATEGORIES)
    human = {i.category for i in bank if i.domain == "human"}
    obj = {i.category for i in bank if i.domain == "object"}
    assert {"scene", "style", "action", "outfit", "accessory", "season", "lighting", "camera"} <= human
    assert {"scene", "style", "material", "season", "lighting", "camera"} <= obj


def test_every_shipped_template_renders_with_exactly_one_subject(bank):
    for instruction in bank:
        text = instruction.render(SENTINEL)
        assert text.count(SENTINEL) == 1 and "{" not in text and "}" not in text, instruction.id
        assert text == " ".join(text.split()), f"stray whitespace in {instruction.id}"


def test_render_agrees_the_article_and_never_formats_the_subject():
    assert render("a photo of a {subject} on the beach", "dog") == "a photo of a dog on the beach"
    assert render("a photo of a {subject} on the beach", "elephant") == "a photo of an elephant on the beach"
    assert render("A {subject} in the snow", "owl") == "An owl in the snow"
    assert render("a red {subject}", "apple") == "a red apple"
    assert render("a {subject}", "{0.__class__} {x}") == "a {0.__class__} {x}"
    assert render("a photo of a {subject}", "  golden \n retriever ") == "a photo of a golden retriever"
    for bad in ["no slot here", "{subject} and {subject}", "a {subject} in {place}", "a {subject} }"]:
        with pytest.raises(ValueError, match="cannot render"):
            render(bad, "dog")
    with pytest.raises(ValueError, match="empty subject"):
        render("a {subject}", "  ")


def write_bank(tmp_path, human, obj=None):
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump({"instructions": {"human": human, "object": obj or []}}))
    return path


def test_an_external_bank_with_bad_placeholders_is_refused_naming_every_bad_id(tmp_path):
    path = write_bank(tmp_path, [
        {"id": "h-ok-1", "category": "scene", "template": "a {subject} at home"},
        {"id": "h-missing", "category": "scene", "template": "a person at home"},
        {"id": "h-twice", "category": "scene", "template": "{subject} meets {subject}"},
        {"id": "h-other", "category": "scene", "template": "a {subject} in {city}"},
        {"id": "h-positional", "category": "scene", "template": "a {subject} {}"},
    ])
    with pytest.raises(BankError) as caught:
        load_bank(path)
    message = str(caught.value)
    for ident in ("h-missing", "h-twice", "h-other", "h-positional"):
        assert ident in message
    assert "h-ok-1" not in message
    report = read_bank(path)
    assert [i.id for i in report.instructions] == ["h-ok-1"]
    assert report.rejected() == {"missing_placeholder": 1, "extra_placeholder": 3}


def test_an_external_bank_with_bad_entries_is_refused(tmp_path):
    good = {"id": "o-1", "category": "style", "template": "an oil painting of a {subject}"}
    path = write_bank(tmp_path, [], [
        good,
        dict(good),  # duplicate id
        {"id": "Bad Id", "category": "style", "template": "a {subject}"},
        {"id": "o-2", "category": "Style!", "template": "a {subject}"},
        {"id": "o-3", "category": "style", "template": "a {subject}", "weight": 2},
        {"id": "o-4", "category": "style", "template": 5},
        "just a string",
    ])
    report = read_bank(path)
    assert [i.id for i in report.instructions] == ["o-1"]
    assert report.rejected() == {"duplicate_id": 1, "bad_id": 1, "bad_category": 1, "bad_entry": 2, "bad_template": 1}
    with pytest.raises(BankError, match="6 bad entries"):
        load_bank(path)


def test_a_valid_external_bank_loads(tmp_path):
    path = write_bank(tmp_path, [{"id": "h-1", "category": "pose", "template": "a {subject} jumping"}])
    assert [(i.id, i.domain, i.category) for i in load_bank(path)] == [("h-1", "human", "pose")]


@pytest.mark.parametrize("text,problem", [
    ("instructions: [1, 2]", "bad_layout"),
    ("nothing: here", "bad_layout"),
    ("instructions: {robot: []}", "bad_domain"),
    ("instructions: {human: [\n", "not valid YAML"),
    ("instructions: {object: 5}", "object: bad_layout: expected a list of entries"),
    ("instructions: {object: " + "9" * 5000 + "}", r"refused: Exceeds the limit \(4300 digits\)"),
])
def test_a_malformed_bank_file_is_refused(tmp_path, text, problem):
    path = tmp_path / "bank.yaml"
    path.write_text(text)
    with pytest.raises(BankError, match=problem):
        load_bank(path)


def test_a_missing_bank_file_is_a_clear_error(tmp_path):
    with pytest.raises(BankError, match="not found"):
        load_bank(tmp_path / "absent.yaml")
    with pytest.raises(BankError, match="cannot be read: Is a directory"):
        load_bank(tmp_path)
