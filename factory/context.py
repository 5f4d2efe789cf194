"""What every stage's `run(ctx)` receives: the validated config and the opened storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from factory import layout
from factory.config import FactoryConfig
from factory.storage import Storage, open_storage


@dataclass
class RunContext:
    config: FactoryConfig
    storage: Storage = field(default=None)  # opened from config.storage when not given

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
