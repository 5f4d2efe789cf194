"""Dialogue drafting (paper section 3.2): a chat LLM writes the user's message `y` and the
assistant's answer `y~` for every candidate that passed the filter.

    Dialogue(config)(rows) -> rows + user, assistant, style, dialogue_attempts

Per alive row (`reject_reason` null): draw the style of `y` from `dialogue.styles`
(deterministic per sample key and `dialogue.seed`), render the prompt, generate in batches of
`dialogue.batch_size`, validate, retry the invalid ones with a new seed up to
`dialogue.max_attempts` times, then reject with the validator's reason (`dialogue:not_json`).
Rows are never dropped; rows rejected earlier pass through untouched (`factory.framework.stage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from factory.dataset.shards import sample_sizes_fact
from factory.framework.config import DialogueConfig, FactoryConfig, load_yaml
from factory.framework.executor import Step, run_steps
from factory.framework.stage import Stage
from models.engines import build_engine

if TYPE_CHECKING:
    from models.llm import Conversation, Engine

log = logging.getLogger(__name__)

FIELDS = ("user", "assistant")
BUILTIN_PROMPT = "dialogue_prompt.yaml"
PROMPT_PLACEHOLDERS = (
    "subject", "domain", "instruction", "style_name", "style_guide",
    "min_user_chars", "max_user_chars", "min_assistant_chars", "max_assistant_chars",
)

# --- validation -------------------------------------------------------------------------


@dataclass(frozen=True)
class DialogueLimits:
    min_user_chars: int = 3
    max_user_chars: int = 400
    min_assistant_chars: int = 10
    max_assistant_chars: int = 1200
    max_output_bytes: int = 64 * 1024  # a whole raw output above this is refused unparsed

    @classmethod
    def from_config(cls, config: DialogueConfig) -> DialogueLimits:
        return cls(config.min_user_chars, config.max_user_chars, config.min_assistant_chars, config.max_assistant_chars)

    def bounds(self, field: str) -> tuple[int, int]:
        if field == "user":
            return self.min_user_chars, self.max_user_chars
        return self.min_assistant_chars, self.max_assistant_chars


DEFAULT_LIMITS = DialogueLimits()
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
TEMPLATE_MARKER = re.compile(
    r"\{\{|\}\}"  # jinja / format escapes
    r"|\{[A-Za-z_][A-Za-z0-9_]*\}"  # {subject}
    r"|\$\{?(?:" + "|".join(PROMPT_PLACEHOLDERS) + r")\b"  # $subject
    r"|<</?SYS>>|\[/?INST\]|</?s>|<unk>|<\|[A-Za-z0-9_]+\|>",  # chat-format tokens
    re.IGNORECASE,
)


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _DuplicateKey(keys)
    return dict(pairs)


def validate_dialogue(
    text: str | bytes, instruction: str, limits: DialogueLimits = DEFAULT_LIMITS
) -> tuple[dict[str, str] | None, str | None]:
    """Parse one LLM output into `{"user", "assistant"}` (stripped), or return why not.

    Accepts the bare JSON object or one inside a ```json fence. Reasons: oversized, not_utf8,
    empty_output, not_json, duplicate_keys, not_object, missing_field, extra_keys, not_string,
    empty_field, control_chars, template_marker, too_short, too_long, echoes_instruction.
    """
    if isinstance(text, (bytes, bytearray)):
        if len(text) > limits.max_output_bytes:
            return None, "oversized"
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_utf8"
    if len(text) > limits.max_output_bytes:
        return None, "oversized"
    body = unfence(text)
    if not body:
        return None, "empty_output"
    try:
        data = json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey:
        return None, "duplicate_keys"
    except (ValueError, RecursionError):
        return None, "not_json"
    if not isinstance(data, dict):
        return None, "not_object"
    if not set(FIELDS) <= data.keys():
        return None, "missing_field"
    if data.keys() - set(FIELDS):
        return None, "extra_keys"
    cleaned = {}
    for field in FIELDS:
        value = data[field]
        if not isinstance(value, str):
            return None, "not_string"
        reason = check_text(value.strip(), field, limits)
        if reason:
            return None, reason
        cleaned[field] = value.strip()
    if normalized(cleaned["user"]) == normalized(instruction):
        return None, "echoes_instruction"
    return cleaned, None


def unfence(text: str) -> str:
    """The content of the first ``` code fence, or the whole text, stripped."""
    match = FENCE.search(text)
    return (match.group(1) if match else text).strip()


def check_text(value: str, field: str, limits: DialogueLimits) -> str | None:
    if not value:
        return "empty_field"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        return "not_utf8"
    if CONTROL_CHARS.search(value):
        return "control_chars"
    if TEMPLATE_MARKER.search(value):
        return "template_marker"
    low, high = limits.bounds(field)
    if len(value) < low:
        return "too_short"
    if len(value) > high:
        return "too_long"
    return None


def normalized(text: str) -> str:
    return " ".join(str(text).casefold().split()).strip(" .!?")


def dialogue_schema(limits: DialogueLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The JSON schema every engine decodes to: exactly `user` and `assistant`, strings whose
    lengths match the validator's bounds and that hold no braces, brackets, angle brackets
    or control characters and no leading or trailing whitespace (so a constrained output
    always passes the validator's format checks).

    The lengths are a bounded repetition inside the pattern, not `minLength` / `maxLength`:
    llguidance intersects those with a pattern and, for some bounds (20..160 with SmolLM2's
    vocabulary), cannot decide whether the intersection is empty and refuses the schema."""
    banned = r"{}<>\[\]\x00-\x08\x0b\x0c\x0e-\x1f\x7f"

    def text(field: str) -> dict[str, Any]:
        low, high = limits.bounds(field)
        return {"type": "string", "pattern": rf"^[^{banned}\s][^{banned}]{{{low - 2},{high - 2}}}[^{banned}\s]$"}

    return {
        "type": "object",
        "properties": {field: text(field) for field in FIELDS},
        "required": list(FIELDS),
        "additionalProperties": False,
    }


# --- prompt -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DialoguePrompt:
    source: str
    system: str
    user: string.Template
    styles: dict[str, string.Template]
    sha256: str


def load_prompt(config: DialogueConfig) -> DialoguePrompt:
    """Read the prompt YAML (`dialogue.prompt_file`, else the shipped one) and check it."""
    if config.prompt_file and config.prompt_file.startswith("builtin:"):  # a file shipped in a package
        source = config.prompt_file
        package, _, name = source.removeprefix("builtin:").replace("/", ".").rpartition(".yaml")[0].rpartition(".")
        raw = (resources.files(package) / f"{name}.yaml").read_text("utf-8")
    elif config.prompt_file:
        source, raw = config.prompt_file, Path(config.prompt_file).read_text(encoding="utf-8")
    else:
        source = f"builtin:stages/{BUILTIN_PROMPT}"
        raw = (resources.files("stages") / BUILTIN_PROMPT).read_text("utf-8")
    data = load_yaml(raw)
    if not isinstance(data, dict) or not {"system", "user", "styles"} <= data.keys():
        raise ValueError(f"prompt file {source} needs 'system', 'user' and 'styles'")
    styles = {str(name): " ".join(str(text).split()) for name, text in dict(data["styles"]).items()}
    missing = sorted(set(config.styles) - set(styles))
    if missing:
        raise ValueError(f"dialogue.styles names {missing}, which prompt file {source} does not describe")
    canonical = json.dumps({"system": data["system"], "user": data["user"], "styles": styles}, sort_keys=True)
    prompt = DialoguePrompt(
        source=source,
        system=str(data["system"]).strip(),
        user=string.Template(str(data["user"]).strip()),
        styles={name: string.Template(text) for name, text in styles.items()},
        sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    )
    for template in (prompt.user, *prompt.styles.values()):  # an unknown $name fails now
        template.substitute({name: "x" for name in PROMPT_PLACEHOLDERS})
    return prompt


def prompt_fingerprint(config: FactoryConfig, prompt: DialoguePrompt | None = None) -> dict[str, Any]:
    """What identifies the prompting for a version's manifest: template and schema hashes (of
    `prompt` where given: the one a stage loaded and drafts with)."""
    dialogue = config.dialogue
    prompt = prompt or load_prompt(dialogue)
    schema = json.dumps(dialogue_schema(DialogueLimits.from_config(dialogue)), sort_keys=True)
    return {
        "source": prompt.source,
        "sha256": prompt.sha256,
        "schema_sha256": hashlib.sha256(schema.encode("utf-8")).hexdigest(),
        "styles": dict(dialogue.styles),
        "constrained": dialogue.constrained,
        "engine": dialogue.engine,
        "model": dialogue.model,
    }


def build_conversation(prompt: DialoguePrompt, row: dict[str, Any], style: str, limits: DialogueLimits) -> Conversation:
    values = {
        "subject": row["subject"],
        "domain": row["domain"],
        "instruction": row["instruction"],
        "style_name": style,
        **{name: getattr(limits, name) for name in PROMPT_PLACEHOLDERS if name.endswith("_chars")},
    }
    values["style_guide"] = prompt.styles[style].substitute(values, style_guide="")
    return [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.user.substitute(values)},
    ]


# --- styles and seeds -------------------------------------------------------------------


def unit_draw(*parts: Any) -> float:
    """A uniform number in [0, 1) that depends only on `parts`."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def draw_style(key: str, seed: int, mix: dict[str, float]) -> str:
    """The style of one sample's user text: the same key and seed always give the same style."""
    names = sorted(name for name, share in mix.items() if share > 0)
    total = sum(mix[name] for name in names)
    point, edge = unit_draw("style", seed, key) * total, 0.0
    for name in names:
        edge += mix[name]
        if point < edge:
            return name
    return names[-1]


def attempt_seed(key: str, seed: int, attempt: int) -> int:
    """The sampling seed of one attempt at one sample (31 bits: fits every engine)."""
    return int(unit_draw("sample", seed, key, attempt) * 2**31)


# --- stage ------------------------------------------------------------------------------


class Dialogue(Stage):
    """Adds `user`, `assistant`, `style`, `dialogue_attempts`; rejects what stays invalid."""

    name = "dialogue"
    source = "filter"
    adds = ("user", "assistant", "style", "dialogue_attempts")
    keeps_images = ("input_image", "target_image")  # its accepted rows are the samples publish reads
    shaped_by = ("references", "plan", "generate", "filter", "dialogue")

    def __init__(self, config: FactoryConfig, engine: Engine | None = None):
        super().__init__(config)
        self.settings = config.dialogue
        self.limits = DialogueLimits.from_config(self.settings)
        self.prompt = load_prompt(self.settings)
        self.schema = dialogue_schema(self.limits) if self.settings.constrained else None
        self.engine = engine

    def setup(self) -> None:
        if self.engine is None:
            self.engine = build_engine(self.settings, self.config.storage)

    def describe(self) -> dict[str, Any]:
        return {"dialogue_prompt": prompt_fingerprint(self.config, self.prompt)}

    def unit_facts(self, out: pd.DataFrame) -> dict[str, Any]:
        return sample_sizes_fact(out)

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        records = rows.to_dict("records")
        alive = list(range(len(records)))
        styles = [draw_style(str(record["key"]), self.settings.seed, self.settings.styles) for record in records]
        attempts = [0] * len(records)
        accepted, failures = self._draft(records, alive, styles, attempts)
        rows["style"] = styles
        rows["user"] = [accepted.get(pos, {}).get("user") for pos in alive]
        rows["assistant"] = [accepted.get(pos, {}).get("assistant") for pos in alive]
        rows["dialogue_attempts"] = attempts
        self.count("attempts", sum(attempts))
        rows["reject"] = [failures.get(pos) for pos in alive]
        log.info("dialogue: %d accepted, rejected %s", len(accepted), dict(Counter(failures.values())))
        return rows

    def _draft(
        self, records: list[dict[str, Any]], alive: list[int], styles: list, attempts: list[int]
    ) -> tuple[dict[int, dict[str, str]], dict[int, str]]:
        accepted: dict[int, dict[str, str]] = {}
        failures: dict[int, str] = {}
        pending = list(alive)
        for attempt in range(1, self.settings.max_attempts + 1):
            for start in range(0, len(pending), self.settings.batch_size):
                chunk = pending[start:start + self.settings.batch_size]
                texts = self._generate([records[pos] for pos in chunk], [styles[pos] for pos in chunk], attempt)
                for pos, text in zip(chunk, texts):
                    attempts[pos] = attempt
                    record = records[pos]
                    parsed, reason = (None, "engine_error") if text is None else validate_dialogue(
                        text, str(record["instruction"]), self.limits
                    )
                    if parsed is not None:
                        accepted[pos] = parsed
                        failures.pop(pos, None)
                    else:
                        failures[pos] = reason
            pending = [pos for pos in pending if pos not in accepted]
            if not pending:
                break
        return accepted, failures

    def _generate(self, records: list[dict[str, Any]], styles: list[str], attempt: int) -> list[str | None]:
        conversations = [build_conversation(self.prompt, rec, style, self.limits)
                         for rec, style in zip(records, styles)]
        seeds = [attempt_seed(str(rec["key"]), self.settings.seed, attempt) for rec in records]
        texts = self.engine.generate(conversations, seeds, self.schema)
        if len(texts) != len(records):
            raise RuntimeError(f"engine {self.engine.name} returned {len(texts)} texts for {len(records)} prompts")
        return texts


def run(ctx) -> dict:
    """Draft dialogues for every unit's filtered candidates (an actor pool over units)."""
    return run_steps(ctx, [Step("dialogue", Dialogue)])
