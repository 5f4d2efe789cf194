"""The chat LLM engines by `dialogue.engine` name (the interface is `models.llm`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.llm import Engine, EngineError
from models.llm_openai import OpenAIEngine
from models.llm_transformers import TransformersEngine
from models.llm_vllm import VllmEngine

if TYPE_CHECKING:
    from factory.framework.config import DialogueConfig

IMPLEMENTATIONS = {"transformers": TransformersEngine, "vllm": VllmEngine, "openai": OpenAIEngine}


def build_engine(config: DialogueConfig, storage: Any = None) -> Engine:
    """Build the engine named by `config.engine`; `storage` (the run's storage section) fetches an
    `s3://` model for the engines that load weights."""
    cls = IMPLEMENTATIONS.get(config.engine)
    if cls is None:
        raise EngineError(f"unknown LLM engine {config.engine!r} (known: {sorted(IMPLEMENTATIONS)})")
    return cls(config) if cls is OpenAIEngine else cls(config, storage=storage)
