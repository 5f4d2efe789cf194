"""The embedded demo: builds its tiny models on first use."""

from __future__ import annotations

from factory.config import FactoryConfig


def prepare_demo(config: FactoryConfig) -> None:
    """Build any tiny demo model that is not on disk yet (a few seconds, once)."""
