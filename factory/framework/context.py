"""What every stage's `run(ctx)` receives: the validated config, the opened storage and the unit
steps (generate -> filter -> dialogue) that the application assembling the stages (`factory.run`)
hands to a stage that runs them itself (SID, once per round)."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.storage is None:
            self.storage = open_storage(self.config.storage)

    @cached_property
    def run_dir(self) -> str:
        return layout.run_dir(self.config.run_id)

    def unit_key(self, stage: str, unit: int) -> str:
        return layout.unit_file(self.config.run_id, stage, unit)

    @property
    def version(self) -> str:
        return self.config.publish.version or self.config.run_id
