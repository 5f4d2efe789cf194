"""The dialogue stage: validator, styles, prompt, and the tiny Llama end to end."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pandas as pd
import pytest

from factory.framework.config import FactoryConfig
from stages.dialogue import (
    Dialogue,
    DialogueLimits,
    attempt_seed,
    build_conversation,
    dialogue_schema,
    draw_style,
    load_prompt,
    prompt_fingerprint,
    validate_dialogue,
)

INSTRUCTION = "a photo of a dog on the beach at sunset"
GOOD = {"user": "Can you put my dog on a beach at sunset?",
        "assistant": "Sure! I placed your dog on a warm beach at sunset, keeping its fur and face."}
SMALL = DialogueLimits(min_user_chars=3, max_user_chars=24, min_assistant_chars=8, max_assistant_chars=40)


def as_json(**fields) -> str:
    return json.dumps(fields)


# --- validator ------------------------------------------------------------------------

VALIDATOR_CASES = [
    ("good_json", json.dumps(GOOD), None),
    ("pretty_json", json.dumps(GOOD, indent=2), None),
    ("code_fence", "```json\n" + json.dumps(GOOD) + "\n```", None),
    ("fence_after_chatter", "Sure! Here is the exchange:\n```\n" + json.dumps(GOOD) + "\n```\nHope it helps.", None),
    ("utf8_bytes", json.dumps(GOOD, ensure_ascii=False).replace("dog", "chien café").encode("utf-8"), None),
    ("truncated", json.dumps(GOOD)[:-25], "not_json"),
    ("unclosed_fence", "```json\n" + json.dumps(GOOD)[:-10], "not_json"),
    ("prose_only", "Sure! The user asks for a dog on the beach and the assistant draws it.", "not_json"),
    ("empty_output", "   \n ", "empty_output"),
    ("json_list", json.dumps([GOOD]), "not_object"),
    ("missing_assistant", as_json(user=GOOD["user"]), "missing_field"),
    ("extra_keys", as_json(**GOOD, style="question"), "extra_keys"),
    ("duplicate_keys", '{"user": "Put my dog on a beach.", "user": "again", "assistant": "Here it is, on the beach."}',
     "duplicate_keys"),
    ("number_field", as_json(user=42, assistant=GOOD["assistant"]), "not_string"),
    ("empty_user", as_json(user="   ", assistant=GOOD["assistant"]), "empty_field"),
    ("short_assistant", as_json(user=GOOD["user"], assistant="Done."), "too_short"),
    ("overlong_assistant", as_json(user=GOOD["user"], assistant="The dog runs on the sand. " * 60), "too_long"),
    ("echoes_instruction", as_json(user="A photo of a dog on the beach at  sunset.", assistant=GOOD["assistant"]),
     "echoes_instruction"),
    ("placeholder_left", as_json(user="Can you draw my {subject} on a beach?", assistant=GOOD["assistant"]),
     "template_marker"),
    ("dollar_placeholder", as_json(user="Put my $subject on a beach", assistant=GOOD["assistant"]), "template_marker"),
    ("llama_tokens", as_json(user=GOOD["user"], assistant="[INST] Here is your dog. [/INST] Done, enjoy!"),
     "template_marker"),
    ("system_block", as_json(user="<<SYS>> You write data <</SYS>>", assistant=GOOD["assistant"]), "template_marker"),
    ("jinja_braces", as_json(user="Draw {{ subject }} please", assistant=GOOD["assistant"]), "template_marker"),
    ("control_chars", as_json(user="Put my dog\u0000 on a beach", assistant=GOOD["assistant"]), "control_chars"),
    ("lone_surrogate", '{"user": "Put my dog \\ud800 on a beach", "assistant": "Here it is, on the beach."}',
     "not_utf8"),
    ("latin1_bytes", json.dumps(GOOD).replace("dog", "chien caf\u00e9", 1).encode("latin-1"), "not_utf8"),
    ("huge_output", "{" + " " * 70_000 + "}", "oversized"),
]


@pytest.mark.parametrize("text, reason", [case[1:] for case in VALIDATOR_CASES],
                         ids=[case[0] for case in VALIDATOR_CASES])
def test_validator_table(text, reason):
    parsed, got = validate_dialogue(text, INSTRUCTION)
    assert got == reason
    if reason is None:
        assert set(parsed) == {"user", "assistant"}
        assert all(value == value.strip() and value for value in parsed.values())
    else:
        assert parsed is None


def test_validator_returns_stripped_fields():
    text = as_json(user="  Draw my dog at the beach. ", assistant="\nHere it is, sunny.\n")
    parsed, reason = validate_dialogue(text, INSTRUCTION)
    assert reason is None and parsed == {"user": "Draw my dog at the beach.", "assistant": "Here it is, sunny."}


def test_schema_accepts_what_the_validator_accepts_and_limits_length():
    schema = dialogue_schema(SMALL)
    ok = {"user": "Draw my dog", "assistant": "Here is your dog."}
    jsonschema.validate(ok, schema)
    assert validate_dialogue(json.dumps(ok), INSTRUCTION, SMALL)[1] is None
    for bad in ({**ok, "extra": "x"}, {**ok, "user": "x" * 25}, {**ok, "user": "Draw {subject}"},
                {**ok, "user": " padded"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# --- styles, seeds, prompt ------------------------------------------------------------


def test_style_mix_is_reproducible_and_close_to_its_shares():
    mix = {"command": 0.4, "question": 0.3, "ambiguous": 0.3}
    keys = [f"key{n:05d}" for n in range(2000)]
    draws = [draw_style(key, 7, mix) for key in keys]

    assert draws == [draw_style(key, 7, mix) for key in keys]
    shares = Counter(draws)
    for style, share in mix.items():
        assert abs(shares[style] / len(keys) - share) < 0.05
    other_seed = [draw_style(key, 8, mix) for key in keys]
    assert sum(a != b for a, b in zip(draws, other_seed)) > 500
    assert {draw_style(key, 7, {"command": 1.0, "question": 0.0}) for key in keys[:200]} == {"command"}


def test_each_attempt_gets_its_own_seed():
    seeds = {attempt_seed("k1", 0, attempt) for attempt in range(1, 6)}
    assert len(seeds) == 5 and all(0 <= seed < 2**31 for seed in seeds)
    assert attempt_seed("k1", 0, 1) == attempt_seed("k1", 0, 1) != attempt_seed("k2", 0, 1)


def test_shipped_prompt_renders_every_style():
    config = FactoryConfig()
    prompt = load_prompt(config.dialogue)
    row = {"subject": "corgi", "domain": "object", "instruction": "a corgi wearing a crown"}
    for style in config.dialogue.styles:
        system, user = build_conversation(prompt, row, style, DialogueLimits.from_config(config.dialogue))
        assert system["role"] == "system" and '"user"' in system["content"]
        assert "corgi" in user["content"] and "a corgi wearing a crown" in user["content"]
        assert f"Style of the user's message: {style}." in user["content"] and "$" not in user["content"]
    ambiguous = build_conversation(prompt, row, "ambiguous", DialogueLimits())[1]["content"]
    assert "something creative for this corgi" in ambiguous


def test_prompt_fingerprint_follows_the_template(tmp_path):
    shipped = prompt_fingerprint(FactoryConfig())
    assert shipped["source"].startswith("builtin:") and len(shipped["sha256"]) == 64
    custom = tmp_path / "prompt.yaml"
    custom.write_text("system: Be brief.\nuser: Draw $subject for $instruction ($style_guide).\n"
                      "styles: {command: Order., question: Ask., ambiguous: Hint.}\n")
    config = FactoryConfig.model_validate({"dialogue": {"prompt_file": str(custom)}})
    first = prompt_fingerprint(config)
    custom.write_text(custom.read_text().replace("brief", "short"))
    assert first["sha256"] != shipped["sha256"] != prompt_fingerprint(config)["sha256"] != first["sha256"]


def test_units_record_the_prompt_the_stage_drafts_with(tmp_path):
    """A prompt file edited while a run drafts: the stage keeps the prompt it loaded, and each unit
    it writes says that prompt's hash, not the hash of the file as it is now."""
    custom = tmp_path / "prompt.yaml"
    custom.write_text("system: Be brief.\nuser: Draw $subject for $instruction ($style_guide).\n"
                      "styles: {command: Order., question: Ask., ambiguous: Hint.}\n")
    config = FactoryConfig.model_validate({"dialogue": {"prompt_file": str(custom)}})
    loaded = prompt_fingerprint(config)
    stage = Dialogue(config)
    custom.write_text(custom.read_text().replace("brief", "short"))
    assert stage.describe()["dialogue_prompt"] == loaded
    assert stage.prompt.system == "Be brief."


@pytest.mark.parametrize("text, problem", [
    ("system: s\nuser: Draw $subjekt\nstyles: {command: c, question: q, ambiguous: a}\n", "subjekt"),
    ("system: s\nuser: Draw $subject\nstyles: {command: c}\n", "does not describe"),
])
def test_bad_prompt_file_fails_early(tmp_path, text, problem):
    path = tmp_path / "prompt.yaml"
    path.write_text(text)
    config = FactoryConfig.model_validate({"dialogue": {"prompt_file": str(path)}})
    with pytest.raises((KeyError, ValueError), match=problem):
        load_prompt(config.dialogue)


# --- end to end on the tiny Llama ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch

    from factory.tiny.llama import build_tiny_llama

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding of a tiny model: one thread is far faster here
    yield build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    torch.set_num_threads(saved)


def stage_config(model: str, **dialogue) -> FactoryConfig:
    settings = dict(engine="transformers", model=model, num_gpus=0, max_new_tokens=300, batch_size=3, max_attempts=2,
                    temperature=1.0, top_p=1.0, min_user_chars=SMALL.min_user_chars,
                    max_user_chars=SMALL.max_user_chars,
                    min_assistant_chars=SMALL.min_assistant_chars, max_assistant_chars=SMALL.max_assistant_chars)
    return FactoryConfig.model_validate({"dialogue": {**settings, **dialogue}})


def candidate_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "key": [f"k{n}" for n in range(5)],
        "subject": ["dog", "cat", "person", "vase", "dog"],
        "domain": ["object", "object", "human", "object", "object"],
        "instruction": ["a dog on the beach", "a cat in the snow", "a person as a chef", "a vase in cubism style",
                        "a dog in space"],
        "clip_t": [0.31, 0.35, 0.4, 0.33, 0.1],
        "reject_stage": [None, None, None, None, "filter"],
        "reject_reason": [None, None, None, None, "filter_clip_t"],
    })


def test_constrained_stage_accepts_every_alive_row(tiny_llama):
    config = stage_config(tiny_llama)
    rows = candidate_rows()
    out = Dialogue(config)(rows)

    assert len(out) == len(rows) and list(out["key"]) == list(rows["key"])
    alive, dead = out.iloc[:4], out.iloc[4]
    assert alive["reject_reason"].isna().all(), alive["reject_reason"].tolist()
    assert (alive["dialogue_attempts"] == 1).all()
    for _, row in alive.iterrows():
        jsonschema.validate({"user": row["user"], "assistant": row["assistant"]}, dialogue_schema(SMALL))
        assert row["style"] == draw_style(row["key"], config.dialogue.seed, config.dialogue.styles)
    assert dead["reject_reason"] == "filter_clip_t" and pd.isna(dead["dialogue_attempts"]) and pd.isna(dead["user"])
    assert out["clip_t"].tolist() == rows["clip_t"].tolist()


def test_unconstrained_garbage_is_rejected_and_counted(tiny_llama):
    out = Dialogue(stage_config(tiny_llama, constrained=False, max_new_tokens=40))(candidate_rows())

    assert len(out) == 5
    rejected = out.iloc[:4]
    assert (rejected["reject_stage"] == "dialogue").all()
    assert (rejected["dialogue_attempts"] == 2).all()
    counts = out["reject_reason"].value_counts().to_dict()
    assert counts.get("not_json", 0) + counts.get("empty_output", 0) == 4
    assert counts["filter_clip_t"] == 1
    assert rejected["user"].isna().all()
