"""The vllm adapter. vLLM cannot be installed here: check the early, clear error, and every call
the adapter makes against a stand-in with vLLM 0.29.0's signatures (tests/models/vllm_stand_in.py)."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from factory.framework.config import DialogueConfig
from models.engines import build_engine
from models.llm import EngineUnavailable
from models.llm_vllm import VllmEngine
from tests.models import vllm_stand_in

REPO = Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "properties": {"user": {"type": "string"}}, "required": ["user"]}
CONVERSATIONS = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_says_what_to_install():
    with pytest.raises(EngineUnavailable, match=r"pip install 'cafe-factory\[vllm\]'"):
        build_engine(DialogueConfig(engine="vllm"))


@pytest.fixture
def recorded(monkeypatch) -> vllm_stand_in.Recorded:
    """`vllm` and `vllm.sampling_params` are the stand-in; returns what it records."""
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.LLM, vllm.SamplingParams, vllm.sampling_params = vllm_stand_in.LLM, vllm_stand_in.SamplingParams, sampling
    vllm.__version__ = vllm_stand_in.VERSION
    sampling.SamplingParams = vllm_stand_in.SamplingParams
    sampling.StructuredOutputsParams = vllm_stand_in.StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(vllm_stand_in.LLM, "recorded", vllm_stand_in.Recorded())
    return vllm_stand_in.LLM.recorded


def tensor_parallel_config() -> DialogueConfig:
    return DialogueConfig(engine="vllm", tensor_parallel_size=4, num_gpus=4, temperature=0.7, max_new_tokens=64)


def test_adapter_maps_config_seeds_and_schema(recorded):
    engine = build_engine(tensor_parallel_config())

    texts = engine.generate(CONVERSATIONS, [3, 4], SCHEMA)

    assert texts == ["text 0", "text 1"]
    init = vllm_stand_in.LLM.recorded.init
    assert init["model"] == "meta-llama/Llama-2-70b-chat-hf" and init["gpu_memory_utilization"] == 0.9
    assert init["tensor_parallel_size"] == 4 and init["distributed_executor_backend"] == "mp"
    sent, params = vllm_stand_in.LLM.recorded.chats[-1]
    assert sent == CONVERSATIONS
    assert [p.seed for p in params] == [3, 4] and params[0].temperature == 0.7 and params[0].max_tokens == 64
    assert params[1].structured_outputs.json == SCHEMA
    engine.generate(CONVERSATIONS, [3, 4], None)
    assert vllm_stand_in.LLM.recorded.chats[-1][1][0].structured_outputs is None


def renamed(kwargs: dict, right: str, wrong: str) -> dict:
    kwargs = dict(kwargs)
    kwargs[wrong] = kwargs.pop(right)
    return kwargs


@pytest.mark.parametrize("method, right, wrong", [
    ("engine_kwargs", "gpu_memory_utilization", "gpu_mem_util"),
    ("engine_kwargs", "dtype", "torch_dtype"),
    ("engine_kwargs", "distributed_executor_backend", "executor_backend"),
    ("sampling_kwargs", "top_p", "nucleus_p"),
    ("sampling_kwargs", "structured_outputs", "guided_decoding"),  # 0.11's older name, gone in 0.12
])
def test_an_adapter_with_a_misspelt_argument_fails_against_the_stand_in(recorded, monkeypatch, method, right, wrong):
    original = getattr(VllmEngine, method)
    monkeypatch.setattr(VllmEngine, method, lambda self, *args: renamed(original(self, *args), right, wrong))
    with pytest.raises(TypeError, match=wrong):
        build_engine(tensor_parallel_config()).generate(CONVERSATIONS, [3, 4], SCHEMA)


def test_the_extra_pins_the_vllm_the_stand_in_copies_and_ray_tests_with():
    from importlib.metadata import requires

    pyproject = (REPO / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'^vllm = \["vllm==([0-9.]+)"\]', pyproject, re.M)
    ray_llm = [r for r in requires("ray") if r.startswith("vllm") and "extra == \"llm\"" in r]
    assert pinned == vllm_stand_in.VERSION
    assert [re.search(r"==([0-9.]+)", r).group(1) for r in ray_llm] == [pinned]
