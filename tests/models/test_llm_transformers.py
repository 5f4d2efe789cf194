"""The transformers engine on a tiny random Llama, through its real chat template."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from factory.framework.config import DialogueConfig
from models.engines import build_engine
from models.llm_transformers import top_p_filter, unpack_bitmask
from stages.dialogue import DialogueLimits, dialogue_schema

LIMITS = DialogueLimits(min_user_chars=3, max_user_chars=24, min_assistant_chars=8, max_assistant_chars=40)
SCHEMA = dialogue_schema(LIMITS)


@pytest.fixture(scope="module")
def engine(tiny_llama, one_torch_thread):
    return build_engine(DialogueConfig(engine="transformers", model=tiny_llama, num_gpus=0,
                                       max_new_tokens=300, temperature=1.0, top_p=1.0))


def chats(count: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "Write a JSON dialogue."},
             {"role": "user", "content": f"Subject: dog. Instruction: a dog on the beach, take {n}."}]
            for n in range(count)]


def test_constrained_outputs_follow_the_schema_and_repeat_per_seed(engine):
    texts = engine.generate(chats(3), [5, 6, 7], SCHEMA)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert engine.generate(chats(3), [5, 6, 7], SCHEMA) == texts
    assert engine.generate(chats(3), [8, 9, 10], SCHEMA) != texts


def test_unconstrained_random_model_emits_no_json(engine):
    texts = engine.generate(chats(2), [1, 2], None)
    assert len(texts) == 2
    for text in texts:
        with pytest.raises(ValueError):
            json.loads(text)


def test_prompt_goes_through_the_chat_template(engine):
    rendered = engine.tokenizer.apply_chat_template(chats(1)[0], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s>[INST] <<SYS>>\nWrite a JSON dialogue.\n<</SYS>>") and rendered.endswith("[/INST]")


def test_unpack_bitmask_matches_llguidance_layout():
    bitmask = torch.zeros((2, 2), dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[1, 1] = 1 << 3  # token 35
    allowed = unpack_bitmask(bitmask, vocab_size=70)
    assert allowed.shape == (2, 70)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]
    assert allowed[1].nonzero().flatten().tolist() == [35]  # tokens past the mask's 64 bits stay off


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, 0.75)
    assert kept.nonzero()[:, 1].tolist() == [0, 1]
    assert torch.equal(top_p_filter(probs, 1.0), probs)
