"""The vllm adapter. vLLM cannot be installed here: check the early, clear error, and the
calls the adapter makes against a stand-in module with vLLM's API shape."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from factory.framework.config import DialogueConfig
from models.engines import build_engine
from models.llm import EngineUnavailable

SCHEMA = {"type": "object", "properties": {"user": {"type": "string"}}, "required": ["user"]}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_says_what_to_install():
    with pytest.raises(EngineUnavailable, match=r"pip install 'cafe-factory\[vllm\]'"):
        build_engine(DialogueConfig(engine="vllm"))


def stand_in_vllm(monkeypatch, structured: bool) -> dict:
    calls: dict = {}

    @dataclass
    class Completion:
        text: str

    @dataclass
    class RequestOutput:
        outputs: list

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def chat(self, conversations, sampling_params, use_tqdm):
            calls["chat"] = (conversations, sampling_params)
            return [RequestOutput([Completion(f"text {n}")]) for n in range(len(conversations))]

    class Params:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.LLM, vllm.SamplingParams, vllm.sampling_params = LLM, Params, sampling
    if structured:
        sampling.StructuredOutputsParams = Params
    else:
        sampling.GuidedDecodingParams = Params
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return calls


@pytest.mark.parametrize("structured, field", [(True, "structured_outputs"), (False, "guided_decoding")])
def test_adapter_maps_config_seeds_and_schema(monkeypatch, structured, field):
    calls = stand_in_vllm(monkeypatch, structured)
    config = DialogueConfig(engine="vllm", tensor_parallel_size=4, num_gpus=4, temperature=0.7, max_new_tokens=64)
    engine = build_engine(config)
    conversations = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]

    texts = engine.generate(conversations, [3, 4], SCHEMA)

    assert texts == ["text 0", "text 1"]
    assert calls["init"]["model"] == "meta-llama/Llama-2-70b-chat-hf"
    assert calls["init"]["tensor_parallel_size"] == 4 and calls["init"]["distributed_executor_backend"] == "mp"
    sent, params = calls["chat"]
    assert sent == conversations
    assert [p.seed for p in params] == [3, 4] and params[0].temperature == 0.7 and params[0].max_tokens == 64
    assert getattr(params[1], field).json == SCHEMA
    engine.generate(conversations, [3, 4], None)
    assert not hasattr(calls["chat"][1][0], field)
