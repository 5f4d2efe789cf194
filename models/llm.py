"""Chat LLM engines behind one interface, chosen by `config.dialogue.engine`.

    engine = build_engine(config.dialogue)
    texts = engine.generate(conversations, seeds, json_schema)

- `conversations`: one chat per prompt, each a list of `{"role": ..., "content": ...}`
  messages (system / user / assistant), rendered by the model's own chat template.
- `seeds`: one sampling seed per prompt, so a retry with a new seed draws a new answer and
  the same seed reproduces one (exactly for `transformers`; as far as the server allows for
  the others).
- `json_schema`: when given, decoding is constrained to it (llguidance for `transformers`,
  structured outputs for `vllm` and OpenAI-compatible servers); `None` decodes freely.
- Returns one entry per prompt, in order: the generated text, or `None` when the engine
  failed on that prompt alone (the caller counts it and may retry). When the backend is
  unreachable for the whole call, `generate` raises `EngineUnavailable` instead, so the
  work unit fails and is retried whole rather than rejecting every sample.

Implementations: `models.llm_transformers` (tests and the embedded demo), `models.llm_vllm`
(GPU nodes; optional extra), `models.llm_openai` (any OpenAI-compatible HTTP endpoint).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from factory.config import DialogueConfig

Message = dict[str, str]
Conversation = list[Message]


class EngineError(RuntimeError):
    """An engine could not be built or used."""


class EngineUnavailable(EngineError):
    """The backend is missing or unreachable: nothing was generated for the whole call."""


class Engine(Protocol):
    name: str

    def generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None = None
    ) -> list[str | None]:
        """One text (or None on a per-prompt failure) per conversation, in order."""

    def describe(self) -> dict[str, Any]:
        """Engine name, model and sampling settings: goes into the manifest."""


class BatchEngine:
    """Shared front of the engines: checks the batch, then `_generate` does the work."""

    name: str

    def generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None = None
    ) -> list[str | None]:
        if len(conversations) != len(seeds):
            raise ValueError("one seed per conversation")
        if not conversations:
            return []
        return self._generate(conversations, seeds, json_schema)

    def _generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None
    ) -> list[str | None]:
        raise NotImplementedError


IMPLEMENTATIONS = {
    "transformers": "models.llm_transformers:TransformersEngine",
    "vllm": "models.llm_vllm:VllmEngine",
    "openai": "models.llm_openai:OpenAIEngine",
}


def build_engine(config: DialogueConfig, storage: Any = None) -> Engine:
    """Build the engine named by `config.engine` (its module is imported only now); `storage` (the run's
    storage section) fetches an `s3://` model for the engines that load weights."""
    target = IMPLEMENTATIONS.get(config.engine)
    if target is None:
        raise EngineError(f"unknown LLM engine {config.engine!r} (known: {sorted(IMPLEMENTATIONS)})")
    module_name, class_name = target.split(":")
    cls = getattr(import_module(module_name), class_name)
    return cls(config, storage=storage) if config.engine != "openai" else cls(config)


def sampling_settings(config: DialogueConfig) -> dict[str, Any]:
    """The sampling settings every engine applies, for `describe()`."""
    return {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
    }
