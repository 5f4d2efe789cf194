"""Memory a version's key set holds: `manifest.KeySet` against the frozenset of str it replaced.

    python bench/key_memory.py [--keys 100000 1000000]

Each training rank (and each SID pool actor) keeps a reviewed version's keys for its whole run
(`manifest.version_keys`). For each size, a fresh process builds an Arrow column of sample-shaped keys
(24 characters), then the set, drops the column and prints, per key, the bytes the set holds and the peak while it
was built, as tracemalloc counts them. Prints a ratio measured in one
run; not a test.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def held_bytes(kind: str, count: int) -> tuple[int, int]:
    """(bytes the `kind` set of `count` keys holds, peak bytes while it was built), as tracemalloc counts
    Python and numpy allocations (Arrow's own buffers, the column's, are not counted)."""
    import hashlib
    import tracemalloc

    import pyarrow as pa

    sys.path.insert(0, str(REPO))
    from factory.dataset.manifest import KeySet

    column = pa.chunked_array([[hashlib.sha256(str(n).encode()).hexdigest()[:24] for n in range(count)]])
    gc.collect()
    tracemalloc.start()
    keys = KeySet.of(column) if kind == "keyset" else frozenset(column.to_pylist())
    del column
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    assert len(keys) == count
    return held, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(*held_bytes(args.child[0], int(args.child[1])))
        return
    print(f"{'keys':>10} {'frozenset B/key held (peak)':>28} {'KeySet B/key held (peak)':>25} {'held ratio':>10}")
    for count in args.keys:
        per_key = {}
        for kind in ("frozenset", "keyset"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(count)], check=True,
                                 capture_output=True, text=True).stdout
            per_key[kind] = [int(value) / count for value in out.split()]
        (set_held, set_peak), (keys_held, keys_peak) = per_key["frozenset"], per_key["keyset"]
        print(f"{count:>10,} {set_held:>20.1f} ({set_peak:>5.1f}) {keys_held:>17.1f} ({keys_peak:>5.1f}) "
              f"{set_held / keys_held:>9.1f}x")


if __name__ == "__main__":
    main()
