"""What every stage's `run(ctx)` receives: the validated config, the opened storage, and what the
application assembling the stages (`factory.run`) hands down: the unit steps (generate -> filter ->
dialogue) for a stage that runs them itself (SID, once per round), and the live progress display
the executor opens while units run (`factory.progress`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.storage import Storage, open_storage

if TYPE_CHECKING:
    from factory.framework.executor import Step  # the executor builds on this module


@dataclass
class RunContext:
    config: FactoryConfig
    storage: Storage = field(default=None)  # opened from config.storage when not given
    unit_steps: tuple[Step, ...] = ()
    # opens the live progress of a run's unit stages (by name) while they run; None: no display
    progress: Callable[[RunContext, list[str]], AbstractContextManager] | None = None

    def __post_init__(self) -> None:
        if self.storage is None:
            self.storage = open_storage(self.config.storage)

    @cached_property
    def run_dir(self) -> str:
        return layout.run_dir(self.config.run_id)

    def watch(self, stages: list[str]) -> AbstractContextManager:
        """The live progress of `stages` while the `with` block runs (nothing without a `progress`)."""
        return self.progress(self, stages) if self.progress else nullcontext()

    def unit_key(self, stage: str, unit: int) -> str:
        return layout.unit_file(self.config.run_id, stage, unit)

    @property
    def version(self) -> str:
        return self.config.publish.version or self.config.run_id
