"""The instruction bank: hand-written templates with one `{subject}` slot, per domain.

The shipped bank is `factory/instructions.yaml`; `plan.instructions` may point at another
file of the same shape:

    instructions:
      human:
        - {id: hum-scene-001, category: scene, template: "a photo of a {subject} on the beach"}
      object:
        - {id: obj-style-001, category: style, template: "an oil painting of a {subject}"}

Validation policy: a bank with any bad entry is refused as a whole, with one error that
names every bad template's id and reason (`BankError.problems`), before any work starts.
Dropping bad templates quietly would skew the instruction mix a plan draws from.
`read_bank` returns the valid entries and the problems side by side, for callers that
prefer to count rejections and go on.

A template is plain text with exactly one `{subject}` and no other braces; `render` uses
string replacement, never `str.format`, so a subject from outside cannot inject fields.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from factory.framework.config import UnsafeYaml, load_yaml

SLOT = "{subject}"
DOMAINS = ("human", "object")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
CATEGORY_PATTERN = re.compile(r"^[a-z][a-z_]{0,31}$")
# Categories of the shipped bank (SID weights rare ones); other banks may add their own.
CATEGORIES = (
    "scene", "style", "action", "outfit", "accessory", "expression", "material",
    "color", "shape", "season", "weather", "lighting", "camera",
)


class BankError(ValueError):
    """An instruction bank that cannot be used; `problems` lists (id, reason) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        listed = "; ".join(f"{ident}: {reason}" for ident, reason in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"instruction bank {source} has {len(problems)} bad entries: {listed}{more}")


@dataclass(frozen=True)
class Instruction:
    id: str
    domain: str
    category: str
    template: str

    def render(self, subject: str) -> str:
        return render(self.template, subject)


@dataclass
class BankReport:
    instructions: list[Instruction]
    problems: list[tuple[str, str]]  # (template id or position, reason)

    def rejected(self) -> dict[str, int]:
        """Counts of bad entries by reason (the reason's first word)."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.problems))


def shipped_bank_path() -> Path:
    return Path(str(resources.files("factory") / "instructions.yaml"))


def load_bank(path: str | Path | None = None) -> list[Instruction]:
    """Load and validate a bank (the shipped one when `path` is None); raise BankError if any entry is bad."""
    report = read_bank(path)
    if report.problems:
        raise BankError(str(path or shipped_bank_path()), report.problems)
    return report.instructions


def read_bank(path: str | Path | None = None) -> BankReport:
    """Load a bank and split it into valid instructions and (id, reason) problems."""
    source = Path(path) if path else shipped_bank_path()
    try:
        raw = load_yaml(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BankError(str(source), [("(file)", "not found")]) from None
    except UnsafeYaml as err:
        raise BankError(str(source), [("(file)", f"refused: {err}")]) from None
    except OSError as err:  # a folder, no permission
        raise BankError(str(source), [("(file)", f"cannot be read: {err.strerror or err}")]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BankError(str(source), [("(file)", f"not valid YAML: {err}")]) from None
    return parse_bank(raw)


def parse_bank(raw: object) -> BankReport:
    sections = raw.get("instructions") if isinstance(raw, dict) else None
    if not isinstance(sections, dict):
        return BankReport([], [("(file)", "bad_layout: expected a top-level 'instructions' mapping")])
    instructions: list[Instruction] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for domain, entries in sections.items():
        if domain not in DOMAINS:
            problems.append((str(domain), f"bad_domain: expected one of {DOMAINS}"))
            continue
        if not isinstance(entries, list | None):
            problems.append((str(domain), "bad_layout: expected a list of entries"))
            continue
        for position, entry in enumerate(entries or []):
            label = f"{domain}[{position}]"
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                label = entry["id"]
            problem = entry_problem(entry, seen)
            if problem:
                problems.append((label, problem))
                continue
            seen.add(entry["id"])
            instructions.append(Instruction(entry["id"], domain, entry["category"], entry["template"]))
    return BankReport(instructions, problems)


def entry_problem(entry: object, seen_ids: set[str]) -> str | None:
    """Why one bank entry is unusable, or None."""
    if not isinstance(entry, dict) or set(entry) != {"id", "category", "template"}:
        return "bad_entry: expected exactly the keys id, category, template"
    ident, category, template = entry["id"], entry["category"], entry["template"]
    if not isinstance(ident, str) or not ID_PATTERN.match(ident):
        return "bad_id: lowercase letters, digits and '-', at most 64 characters"
    if ident in seen_ids:
        return "duplicate_id"
    if not isinstance(category, str) or not CATEGORY_PATTERN.match(category):
        return "bad_category: lowercase letters and '_'"
    if not isinstance(template, str):
        return "bad_template: not a string"
    return template_problem(template)


def template_problem(template: str) -> str | None:
    """Why a template cannot be rendered, or None: it needs exactly one `{subject}` and no other braces."""
    count = template.count(SLOT)
    rest = template.replace(SLOT, "")
    if count == 0:
        return "missing_placeholder: no {subject}"
    if count > 1:
        return f"extra_placeholder: {{subject}} appears {count} times"
    if "{" in rest or "}" in rest:
        return "extra_placeholder: braces other than the one {subject}"
    if not rest.strip() or any(ord(ch) < 32 for ch in template):
        return "bad_template: empty or has control characters"
    return None


def render(template: str, subject: str) -> str:
    """Put `subject` into the template's one `{subject}` slot ("a {subject}" becomes "an ..."
    before a vowel: a spelling heuristic, not a pronunciation one)."""
    problem = template_problem(template)
    if problem:
        raise ValueError(f"cannot render template {template!r}: {problem}")
    subject = " ".join(subject.split())
    if not subject:
        raise ValueError("cannot render a template with an empty subject")
    before, after = template.split(SLOT)
    if subject[0].lower() in "aeiou" and re.search(r"(^|\s)[Aa] $", before):
        before = before[:-2] + ("an " if before[-2] == "a" else "An ")
    return before + subject + after
