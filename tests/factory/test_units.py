"""A run's files: the plan read one unit at a time, images joined by reading only their row groups."""

from __future__ import annotations

import io
import os

import pandas as pd
import pyarrow as pa
import pytest

from factory.framework import layout
from factory.framework.images import read_part_rows
from factory.framework.storage import LocalStorage
from factory.framework.units import ImageJoin, SortedFooters, read_plan_unit, write_plan, write_unit


class CountingStorage(LocalStorage):
    """Counts the bytes read through `open` (what Parquet readers use)."""

    read = 0

    def open(self, key):
        data = super().open(key).read()
        outer = self

        class Counted(io.BytesIO):
            def read(self, size=-1):
                out = super().read(size)
                outer.read += len(out)
                return out

            def readinto(self, buffer):
                count = super().readinto(buffer)
                outer.read += count
                return count

        return Counted(data)

    def parquet_source(self, key):  # Parquet readers too, not LocalStorage's Arrow file
        return self.open(key)


@pytest.fixture
def storage(tmp_path):
    return CountingStorage(tmp_path / "root")


def test_the_plan_is_read_one_unit_at_a_time(storage):
    plan = pd.DataFrame({"key": [f"k{n:03d}" for n in range(40)], "unit": [n // 8 for n in range(40)],
                         "note": [os.urandom(20000) for _ in range(40)]})
    write_plan(storage, "r", pa.Table.from_pandas(plan, preserve_index=False), 8)
    whole = storage.size(layout.plan_part("r", 0))
    storage.read = 0
    unit = read_plan_unit(storage, "r", 3)
    assert unit["key"].tolist() == [f"k{n:03d}" for n in range(24, 32)]
    assert storage.read < whole / 3, "reading one unit must not read the whole plan"


def test_images_are_joined_from_their_homes_reading_only_the_groups_that_hold_them(storage):
    part = layout.reference_part("s", 0)
    references = pa.table({"reference_id": [f"ref{n:03d}" for n in range(64)],
                           "image": [os.urandom(20000) for _ in range(64)]})
    storage.write_parquet(part, references, row_group_size=4)
    drawn = pd.DataFrame({"key": [f"k{n:03d}" for n in range(32)], "unit": 0,
                          "target_image": [os.urandom(20000) for _ in range(32)]})
    write_unit(storage, "r", "generate", 0, drawn, {"stage": "generate"})
    wanted = pd.DataFrame({"key": ["k005", "k030"], "unit": [0, 0], "reference_part": part,
                           "reference_id": ["ref002", "ref060"]}, index=[5, 30])
    storage.read = 0
    joined = ImageJoin(storage, "r").add(wanted.copy(), ("input_image", "target_image"), positions=[5, 30])
    assert storage.read < 0.3 * (storage.size(part) + storage.size(layout.unit_file("r", "generate", 0)))
    by_key = ImageJoin(storage, "r").add(wanted.copy(), ("input_image", "target_image"))
    assert joined["target_image"].tolist() == by_key["target_image"].tolist() == drawn["target_image"][[5, 30]].tolist()
    references = references.to_pandas().set_index("reference_id")["image"]
    assert joined["input_image"].tolist() == [references["ref002"], references["ref060"]]


def test_joins_that_share_footers_read_a_reference_part_footer_once(storage):
    part = layout.reference_part("s", 0)
    ids = [f"ref{n:03d}" for n in range(64)]
    images = [os.urandom(2000) for _ in ids]
    storage.write_parquet(part, pa.table({"reference_id": ids, "image": images}), row_group_size=4)
    footer_bytes = int.from_bytes(storage.read_bytes(part)[-8:-4], "little")
    footers = SortedFooters(storage, "reference_id")
    assert ImageJoin(storage, "r", footers=footers).reference_images(part, {"ref002", "ref060"}) == {
        "ref002": images[2], "ref060": images[60]}
    storage.read = 0
    assert ImageJoin(storage, "r", footers=footers).reference_images(part, {"ref033"}) == {"ref033": images[33]}
    assert storage.read < footer_bytes  # the second join read its row group (8 KB), not the footer again


def test_rows_of_a_part_are_read_from_their_row_groups_only(tmp_path):
    storage = CountingStorage(str(tmp_path))
    ids = [f"id{n:02d}" for n in range(14)]
    images = [os.urandom(100_000) for _ in range(14)]  # row groups of 4, 4, 4, 2 rows
    storage.write_parquet("part.parquet", pa.table({"image_id": ids, "image": images}), row_group_size=4)
    storage.read = 0
    assert read_part_rows(storage, "part.parquet", [13, 0, 3]) == {ids[n]: images[n] for n in (13, 0, 3)}
    assert 600_000 < storage.read < 700_000  # groups 0 and 3: six images, not fourteen


def test_plan_metadata_that_is_not_json_is_a_damaged_file_naming_it(tmp_path, caplog):
    import pyarrow.parquet as pq

    from factory.framework.storage import DamagedFile
    from factory.framework.units import PLAN_META, plan_part_meta, plan_units

    storage = LocalStorage(tmp_path)
    write_plan(storage, "r", pa.table({"key": ["a", "b"], "unit": [0, 0]}), 2, {"fingerprint": "f"})
    for key in (layout.plan_part("r", 0), layout.plan("r")):
        table = pq.read_table(storage.url(key))
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, PLAN_META: b"[" * 5000}),
                       storage.url(key))
    assert plan_part_meta(storage, "r", 0) is None  # the partition is drawn again
    assert "its footer metadata is not JSON: the partition is drawn again" in caplog.text
    with pytest.raises(DamagedFile, match=f"damaged Parquet file {storage.url(layout.plan('r'))}: its footer"):
        plan_units(storage, "r")
