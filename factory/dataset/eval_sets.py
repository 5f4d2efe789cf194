"""Eval sets: DreamBench's prompt lists, and the (reference, prompts) pairs built from a stored reference set.

A prompt file (`factory/eval_prompts/<name>.yaml`, or any YAML file of the same shape) holds an
`object` and a `live` list of templates with `{subject}`, the classes that take the live list
(`live_classes`), and optionally a map from subject folder names to class words (`subjects`).
A reference of the human domain, or whose class is live, gets the live list; any other the
object list. The eval stage draws every (reference, prompt) of the set with the checkpoint
under test; `eval_set_name` names the set in stored results.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from factory.dataset.reference_sets import load_references, set_complete
from factory.framework import layout
from factory.framework.config import PROMPTS_PER_PAIR, EvalConfig, EvalPair, load_yaml
from factory.framework.storage import Storage


@dataclass(frozen=True)
class PromptLists:
    name: str
    object: list[str]
    live: list[str]
    live_classes: frozenset[str]
    subjects: dict[str, str]  # subject as stored (folder name, underscores as spaces) -> class word

    def class_word(self, subject: str) -> str:
        return self.subjects.get(subject.replace("_", " "), subject)

    def for_reference(self, subject: str, domain: str) -> list[str]:
        live = domain == "human" or self.class_word(subject) in self.live_classes
        return self.live if live else self.object


def shipped_prompts(name: str) -> Path:
    return Path(str(resources.files("factory") / "eval_prompts" / f"{name}.yaml"))


def load_prompt_lists(name_or_path: str) -> PromptLists:
    """A shipped list by name (`dreambench`) or a YAML file of the same shape."""
    path = shipped_prompts(name_or_path)
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"eval.prompts: {name_or_path!r} is neither a shipped prompt list nor a file")
    raw = load_yaml(path.read_text()) or {}
    for key in ("object", "live"):
        templates = raw.get(key) or []
        if not templates or any(t.count("{subject}") != 1 for t in templates):
            raise ValueError(f"eval prompts {path}: '{key}' needs templates with '{{subject}}' exactly once")
        if len(templates) > PROMPTS_PER_PAIR:
            raise ValueError(f"eval prompts {path}: '{key}' holds {len(templates)} templates; at most "
                             f"{PROMPTS_PER_PAIR} (each prompt of a reference has its own seeds)")
    return PromptLists(
        name=str(raw.get("name") or path.stem),
        object=list(raw["object"]),
        live=list(raw["live"]),
        live_classes=frozenset(raw.get("live_classes") or ()),
        subjects={key.replace("_", " "): value for key, value in (raw.get("subjects") or {}).items()},
    )


def spread(items: list[str], count: int | None) -> list[str]:
    """`count` items spread evenly over the list (first and last included), or all of them."""
    if count is None or count >= len(items):
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in dict.fromkeys(picks.tolist())]


def eval_set_name(settings: EvalConfig) -> str:
    if settings.name:
        return settings.name
    if settings.reference_set:
        return f"{Path(settings.prompts).stem}-{settings.reference_set}"
    return "pairs"


def reference_set_pairs(storage: Storage, settings: EvalConfig) -> list[tuple[EvalPair, bytes]]:
    """One pair per reference of `settings.reference_set` (the first `references_per_subject` of each
    subject, in id order), prompted with its class's list; with the reference's image bytes."""
    name = settings.reference_set
    if not set_complete(storage, name):
        raise ValueError(
            f"eval.reference_set {name!r} is not built ({storage.url(layout.reference_complete(name))} is missing): "
            f"ingest it with "
            f"`python -m factory.run --stage references --set references.set={name} ...` first"
        )
    lists = load_prompt_lists(settings.prompts)
    references = load_references(storage, name, ["reference_id", "image", "subject", "domain"])
    pairs: list[tuple[EvalPair, bytes]] = []
    taken: dict[str, int] = {}
    for row in references.sort_values("reference_id").itertuples():
        taken[row.subject] = taken.get(row.subject, 0) + 1
        if settings.references_per_subject and taken[row.subject] > settings.references_per_subject:
            continue
        prompts = spread(lists.for_reference(row.subject, row.domain), settings.prompts_per_subject)
        pair = EvalPair(reference=f"{name}:{row.reference_id}", subject=lists.class_word(row.subject), prompts=prompts)
        pairs.append((pair, row.image))
    if not pairs:
        raise ValueError(f"eval.reference_set {name!r} holds no references")
    return pairs
