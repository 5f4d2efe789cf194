"""Chat LLM engines behind one interface, chosen by `config.dialogue.engine`.

    engine = build_engine(config.dialogue)  # models.engines
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

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from factory.framework.config import DialogueConfig

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



def sampling_settings(config: DialogueConfig) -> dict[str, Any]:
    """The sampling settings every engine applies, for `describe()`."""
    return {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
    }
