"""The `vllm` engine: a thin adapter over `vllm.LLM.chat` for GPU nodes.

Written against vLLM 0.29.0, the version the `vllm` extra pins (the one Ray 2.60's `llm` extra
pins, so every node of a cluster runs the same): `SamplingParams(structured_outputs=
StructuredOutputsParams(json=schema))`. StructuredOutputsParams exists from 0.11 (0.11 has both
it and the older `guided_decoding=GuidedDecodingParams`; 0.12 dropped GuidedDecodingParams), so
the adapter needs 0.11 or later. vLLM cannot be installed on the CPU test machines: the test
checks every call against a stand-in whose signatures are copied from vLLM 0.29.0's source, so a
misspelt or removed argument fails it; run it on a GPU node before relying on it.

Placement: the Ray Data actor that builds this engine asks for `dialogue.num_gpus >=
tensor_parallel_size` GPUs, so Ray puts the whole tensor-parallel group on one node, and vLLM
runs its workers as local processes (`distributed_executor_backend="mp"`) on those GPUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from factory.framework.models_cache import local_model, model_ref
from models.llm import BatchEngine, Conversation, EngineUnavailable, sampling_settings

if TYPE_CHECKING:
    from factory.framework.config import DialogueConfig

INSTALL_HINT = "install the vllm extra (pip install 'cafe-factory[vllm]') on GPU nodes"


def import_vllm():
    try:
        import vllm  # the optional `vllm` extra, on GPU nodes only
    except ImportError as err:
        raise EngineUnavailable(
            f"dialogue.engine 'vllm' needs vLLM, which is not importable ({err}): {INSTALL_HINT}"
        ) from None
    return vllm


class VllmEngine(BatchEngine):
    name = "vllm"

    def __init__(self, config: DialogueConfig, storage: Any = None):
        self.config = config
        self.storage = storage
        self.vllm = import_vllm()
        self.llm = self.vllm.LLM(**self.engine_kwargs())

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": local_model(self.config.model, self.storage, "dialogue.model"),
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "dtype": self.config.dtype,
            "seed": self.config.seed,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
        }
        if self.config.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "mp"
        if self.config.max_model_len:
            kwargs["max_model_len"] = self.config.max_model_len
        return kwargs

    def describe(self) -> dict[str, Any]:
        version = getattr(self.vllm, "__version__", "unknown")
        return {"engine": self.name, "model": model_ref(self.config.model), "vllm": version,
                "tensor_parallel_size": self.config.tensor_parallel_size, **sampling_settings(self.config)}

    def _generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None
    ) -> list[str | None]:
        params = [self.sampling_params(seed, json_schema) for seed in seeds]
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [output.outputs[0].text if output.outputs else None for output in outputs]

    def sampling_params(self, seed: int, json_schema: dict[str, Any] | None):
        return self.vllm.SamplingParams(**self.sampling_kwargs(seed, json_schema))

    def sampling_kwargs(self, seed: int, json_schema: dict[str, Any] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "max_tokens": self.config.max_new_tokens,
            "seed": seed,
        }
        if json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams  # the optional `vllm` extra

            kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        return kwargs
