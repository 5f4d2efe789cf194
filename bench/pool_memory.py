"""The SID driver's memory while it builds the image pool from a parent's shards (`factory.dataset.pool`).

    python bench/pool_memory.py [--rows 20000 40000] [--dim 512]

Builds the pool's ids and index (`finish_pool`, as `build_pool_from_shards` calls it) from
synthetic embedded chunks shaped as the shard embedders return them after Ray's Arrow round trip
(one row per shard with lists of ids, rows and embeddings), handed over one at a time as the
executor yields them. Each case runs in a fresh process on
local storage and prints the process's peak RSS above its start, per pool image. "bytes" is the
embedding as `PoolEmbedder` returns it now (float32 bytes); "floats" is a list of Python floats,
as it returned them until 2026-12-07 (and as chunks embedded before then are still read).
Flat (exact) index. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARD_ROWS = 1000


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def one_case(rows: int, dim: int, form: str) -> None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from factory.dataset.pool import finish_pool
    from factory.framework.storage import LocalStorage

    start = rss_mib()
    rng = np.random.default_rng(0)

    def embedded():  # a shard's chunk at a time, as run_resumable yields them, exploded as the builder does
        for shard in range(rows // SHARD_ROWS):
            vectors = rng.standard_normal((SHARD_ROWS, dim)).astype(np.float32)
            embeddings = [v.tobytes() for v in vectors] if form == "bytes" else [v.tolist() for v in vectors]
            frame = pd.DataFrame({"part": [shard], "image_id": [[f"{shard:06d}{n:018d}" for n in range(SHARD_ROWS)]],
                                  "row": [list(range(SHARD_ROWS))], "embedding": [embeddings]})
            chunk = pa.Table.from_pandas(frame, preserve_index=False).to_pandas()
            yield chunk.explode(["image_id", "row", "embedding"], ignore_index=True)

    with tempfile.TemporaryDirectory() as root:
        summary = finish_pool(LocalStorage(root), "bench", embedded(), exact_limit=10**9)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start
    print(f"{form:>6}: {summary['images']:>7} images, dim {dim}: peak {peak:7.0f} MiB above start, "
          f"{peak * 2**20 / rows:6.0f} B per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 40_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # one case, in its own process
    args = parser.parse_args()
    if args.case:
        return one_case(int(args.case[0]), args.dim, args.case[1])
    for rows in args.rows:
        for form in ("floats", "bytes"):
            subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--case", str(rows), form], check=True)


if __name__ == "__main__":
    main()
