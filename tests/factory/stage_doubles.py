"""Orchestration-only stages for pipeline tests (no model is involved)."""

import os
from pathlib import Path

import pandas as pd

from factory.framework.stage import Stage


class Stamp(Stage):
    """Adds a column. A file `<storage root>/KILL_UNIT` holding a unit number makes the
    actor process die (os._exit) on that unit once; `RAISE_UNIT` raises an exception."""

    name = "filter"
    source = "plan"
    adds = ("stamped",)
    shaped_by = ("filter",)

    def __init__(self, config):
        super().__init__(config)
        self.root = Path(config.storage.root)

    def _trigger(self, name: str, unit: int) -> bool:
        path = self.root / name
        if path.exists() and int(path.read_text()) == unit:
            path.unlink()
            return True
        return False

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        unit = int(rows["unit"].iloc[0]) if len(rows) else -1
        if self._trigger("KILL_UNIT", unit):
            os._exit(1)
        if self._trigger("RAISE_UNIT", unit):
            raise RuntimeError("injected failure")
        rows["stamped"] = rows["key"].str.upper()
        rows["reject"] = [("odd_key" if int(key[1:]) % 2 else None) for key in rows["key"]]
        return rows


class DropsRows(Stamp):
    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows.iloc[1:]
