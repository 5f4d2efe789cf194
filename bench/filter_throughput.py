"""Filter throughput at real model sizes (random weights): stage vs floor vs one-at-a-time.

    python bench/filter_throughput.py [-n 64] [--batch-size 16] [--image-size 512] [--loop-candidates 16]

- stage: the `Filter` stage end to end through a Ray Data actor pool (one actor holding
  every core): JPEG bytes and instruction text in, scores out. Timed from the moment the
  actor has loaded its models to the end of its last batch; the wall time with the actor
  start is printed too.
- floor: the same models' forward passes alone (CLIP image + text, DINO on target and
  input) on pre-decoded, pre-processed tensors, same batch size, in one process, measured
  before and after the stage inside a Ray Data actor set up like the stage's (with 2 torch
  threads, OpenMP behaves differently in Ray Data's UDF thread than in a main thread).
- loop: the stage called on one candidate at a time in that actor (first 16 by default).

Also printed: CPU seconds per candidate (floor process vs stage actor). On a busy shared
machine both views move; run it when the machine is quiet.

Models: open_clip ViT-B-32 (random init) and a transformers ViTModel with the
dino-vits16 shape (hidden 384, 12 layers, 6 heads, patch 16, image 224).
The last line is `ratio stage/floor: X`. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from bench.synthetic import photo_like_jpeg  # noqa: E402
from factory.framework.config import FactoryConfig  # noqa: E402
from factory.tiny.dino import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from stages.filter import Filter  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--candidates", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per forward pass")
    parser.add_argument("--image-size", type=int, default=512, help="side of the generated JPEGs")
    parser.add_argument("--loop-candidates", type=int, default=16, help="candidates for the one-at-a-time loop")
    return parser.parse_args()


def build_dino_vits16(path: Path) -> str:
    """A random-weight ViTModel with facebook/dino-vits16's shape and image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(
        size={"height": 224, "width": 224}, resample=2, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(path)
    return str(path)



def make_candidates(count: int, side: int) -> pd.DataFrame:
    subjects = ["dog", "cat", "backpack", "teapot", "sneaker", "person"]
    places = ["on the beach", "in the snow", "on a wooden table", "in Times Square", "under a cherry tree"]
    return pd.DataFrame(
        {
            "key": [f"k{number:06d}" for number in range(count)],
            "instruction": [f"a {subjects[n % 6]} {places[n % 5]}" for n in range(count)],
            "input_image": [photo_like_jpeg(2 * n, side) for n in range(count)],
            "target_image": [photo_like_jpeg(2 * n + 1, side) for n in range(count)],
            "reject_stage": [None] * count,
            "reject_reason": [None] * count,
        }
    )


class TimedFilter(Filter):
    """The stage, recording when its models were ready, when each batch ended, and the
    seconds spent decoding and preprocessing."""

    def __init__(self, config: FactoryConfig):
        super().__init__(config)
        self.ready_at = time.time()
        self.ready_cpu = time.process_time()
        self.prepare_seconds = 0.0

    def prepare(self, rows, positions):
        started = time.perf_counter()
        prepared = super().prepare(rows, positions)
        self.prepare_seconds += time.perf_counter() - started
        return prepared

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        import torch

        out = super().__call__(rows)[["key", "clip_t", "dino", "reject_reason"]].copy()
        out["ready_at"] = self.ready_at
        out["done_at"] = time.time()
        out["cpu_s"] = time.process_time() - self.ready_cpu
        out["prepare_seconds"] = self.prepare_seconds
        out["threads"] = torch.get_num_threads()
        return out


class Reference:
    """The floor and the loop, run as a Ray Data UDF exactly like the stage (same cores,
    threads and calling thread), so only the stage's own costs differ."""

    def __init__(self, config: FactoryConfig, rows: pd.DataFrame, batch_size: int, loop_candidates: int):
        self.stage = Filter(config)
        self.rows, self.batch_size, self.loop_candidates = rows, batch_size, loop_candidates
        self.stage(rows.iloc[:batch_size])  # warm up

    def __call__(self, tasks: pd.DataFrame) -> pd.DataFrame:
        timings = [getattr(self, task)() for task in tasks["task"]]
        return pd.DataFrame({"task": tasks["task"], "wall": [t[0] for t in timings], "cpu": [t[1] for t in timings]})

    def floor(self) -> tuple[float, float]:
        """Forward passes alone on tensors prepared beforehand; (wall, CPU) seconds."""
        import torch

        from factory.framework.images import decode_image

        clip, dino, rows = self.stage.clip, self.stage.dino, self.rows
        targets = [decode_image(data) for data in rows["target_image"]]
        inputs = [decode_image(data) for data in rows["input_image"]]
        clip_pixels = clip.image_tensors(targets)
        tokens = clip.tokenizer(list(rows["instruction"]))
        dino_pixels = [dino.image_tensors(targets), dino.image_tensors(inputs)]
        started, started_cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(rows), self.batch_size):
            part = slice(start, start + self.batch_size)
            clip.embed_pixels(clip_pixels[part])
            clip.embed_tokens(tokens[part])
            dino.embed_pixels(torch.cat([pixels[part] for pixels in dino_pixels]))
        return time.perf_counter() - started, time.process_time() - started_cpu

    def loop(self) -> tuple[float, float]:
        """The stage called on one candidate at a time; (wall, CPU) seconds."""
        started, started_cpu = time.perf_counter(), time.process_time()
        for position in range(self.loop_candidates):
            self.stage(self.rows.iloc[[position]])
        return time.perf_counter() - started, time.process_time() - started_cpu


def actor_pool(dataset, udf, args: tuple, cores: int, batch_size: int):
    import ray

    return dataset.map_batches(
        udf,
        fn_constructor_args=args,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cores,
        batch_size=batch_size,
        batch_format="pandas",
    ).to_pandas()


def run_reference(tasks: list[str], rows: pd.DataFrame, config: FactoryConfig, args, cores: int) -> dict:
    import ray

    udf_args = (config, rows, args.batch_size, args.loop_candidates)
    out = actor_pool(ray.data.from_pandas(pd.DataFrame({"task": tasks})), Reference, udf_args, cores, len(tasks))
    return {task: (wall, cpu) for task, wall, cpu in zip(out["task"], out["wall"], out["cpu"])}


def run_stage(rows: pd.DataFrame, config: FactoryConfig, ray_batch_size: int, cores: int) -> dict:
    import ray

    started = time.time()
    out = actor_pool(ray.data.from_pandas(rows), TimedFilter, (config,), cores, ray_batch_size)
    wall = time.time() - started
    steady = out["done_at"].max() - out["ready_at"].min()
    return {
        "steady_s": steady, "wall_s": wall, "rows": len(out), "scored": int(out["clip_t"].notna().sum()),
        "prepare_share": out["prepare_seconds"].max() / steady, "threads": int(out["threads"].iloc[0]),
        "cpu_s": out["cpu_s"].max(),
    }


def measure(args: argparse.Namespace, config: FactoryConfig, cores: int) -> dict:
    """floor, stage, floor again, then the loop."""
    import ray

    rows = make_candidates(args.candidates, args.image_size)
    ray.init(
        num_cpus=cores, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}},
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        before = run_reference(["floor"], rows, config, args, cores)
        stage = run_stage(rows, config, ray_batch_size=4 * args.batch_size, cores=cores)
        after = run_reference(["floor", "loop"], rows, config, args, cores)
    finally:
        ray.shutdown()
    return {
        "count": len(rows), "floors": [before["floor"], after["floor"]], "stage": stage,
        "loop_rate": args.loop_candidates / after["loop"][0],
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = os.cpu_count() or 1
    print(f"{args.candidates} candidates, {args.image_size}px JPEGs, batch {args.batch_size}, {cores} cores")
    with tempfile.TemporaryDirectory() as folder:
        dino = build_dino_vits16(Path(folder) / "dino-vits16")
        config = FactoryConfig.model_validate(
            {"filter": {"clip_model": "ViT-B-32", "clip_pretrained": None, "dino_model": dino,
                        "batch_size": args.batch_size, "num_cpus": cores}}
        )
        result = measure(args, config, cores)
    report(result)


def report(result: dict) -> None:
    count, stage = result["count"], result["stage"]
    floor_walls = [wall for wall, _ in result["floors"]]
    floor_cpu = sum(cpu for _, cpu in result["floors"]) / len(result["floors"])
    floor_rate = count / (sum(floor_walls) / len(floor_walls))
    stage_rate = count / stage["steady_s"]
    runs = ", ".join(f"{count / wall:.2f}" for wall in floor_walls)
    print(f"floor (forward passes on tensors): {floor_rate:.2f} candidates/s (runs: {runs})")
    print(f"stage (Ray Data actor pool, models ready to last batch): {stage_rate:.2f} candidates/s "
          f"[{stage['scored']}/{stage['rows']} scored, {stage['threads']} torch threads]")
    wall = stage["wall_s"]
    print(f"stage wall incl. actor start and model load: {count / wall:.2f} candidates/s ({wall:.1f} s)")
    print(f"stage time decoding + preprocessing: {100 * stage['prepare_share']:.1f}%")
    print(f"CPU seconds per candidate: floor {floor_cpu / count:.3f}, stage {stage['cpu_s'] / count:.3f} "
          f"(ratio {floor_cpu / stage['cpu_s']:.2f})")
    print(f"loop (one candidate per call): {result['loop_rate']:.2f} candidates/s")
    print(f"ratio stage/loop: {stage_rate / result['loop_rate']:.2f}")
    print(f"ratio stage/floor: {stage_rate / floor_rate:.2f}")


if __name__ == "__main__":
    main()
