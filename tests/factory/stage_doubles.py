"""Orchestration-only stage callables for pipeline tests (no model is involved)."""

import os
from pathlib import Path

import pandas as pd


class Stamp:
    """Adds a column. A file `<storage root>/KILL_UNIT` holding a unit number makes the
    actor process die (os._exit) on that unit once; `RAISE_UNIT` raises an exception."""

    def __init__(self, config):
        self.root = Path(config.storage.root)

    def _trigger(self, name: str, unit: int) -> bool:
        path = self.root / name
        if path.exists() and int(path.read_text()) == unit:
            path.unlink()
            return True
        return False

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        unit = int(rows["unit"].iloc[0])
        if self._trigger("KILL_UNIT", unit):
            os._exit(1)
        if self._trigger("RAISE_UNIT", unit):
            raise RuntimeError("injected failure")
        rows["stamped"] = rows["key"].str.upper()
        return rows


class DropsRows:
    def __init__(self, config):
        pass

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows.iloc[1:]
