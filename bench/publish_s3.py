"""Shard publishing to a 127.0.0.1 S3 server: the factory vs bare boto3 vs img2dataset.

    python bench/publish_s3.py [--samples 240] [--image-size 512] [--shard-mb 16] [--no-img2dataset]

One moto `ThreadedMotoServer` on 127.0.0.1, in its own process (so no side shares its GIL
with the server), receives, in one run:

- factory: `factory.dataset.publisher.publish_samples` to an `s3://` root (tar encoding, sha256,
  shard uploads, index.parquet, manifest), timed around the call;
- boto3: `client.upload_file` (default transfer settings: multipart above 8 MiB, 10 threads)
  of the very same shard bytes (checked by sha256), written to local files beforehand, timed
  around the uploads alone;
- img2dataset (from its own venv, default /work/bench-venv): the same JPEGs (every `x` and
  `x~`) served by a local HTTP server on 127.0.0.1, written as WebDataset shards to the same
  S3 server (s3fs, endpoint from FSSPEC_S3_ENDPOINT_URL), `--resize_mode no` and no
  re-encoding, 1 process; timed as a whole process and from its own shard stats.

factory and boto3 run --rounds times, alternated, and their medians are compared; img2dataset
runs once. The factory PUTs a shard below storage.multipart_threshold_mb (64) in one request
and uses boto3's managed multipart upload above it. MB/s counts shard bytes written (MiB).
Ratios: factory/boto3, factory/img2dataset. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.synthetic import photo_like_jpeg  # noqa: E402
from factory.dataset.shards import Sample, cut_points, encode_shard, estimated_bytes  # noqa: E402

BUCKET = "bench-publish"
FAKE_KEYS = {
    "AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
}
MOTO_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server._server.server_address[1], flush=True)
sys.stdin.read()
server.stop()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=240, help="quadruplets (each has two JPEGs)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--shard-mb", type=int, default=16, help="factory shard_max_bytes, in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="factory and boto3 runs, alternated; medians reported")
    parser.add_argument("--img2dataset", default="/work/bench-venv/bin/img2dataset", help="its executable")
    parser.add_argument("--no-img2dataset", action="store_true")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="markdown file to append to")
    parser.add_argument("--no-results", action="store_true", help="print only")
    return parser.parse_args(argv)


# --- data --------------------------------------------------------------------------------



def make_samples(count: int, side: int) -> list[Sample]:
    samples = []
    for number in range(count):
        key = hashlib.sha256(f"bench-{number}".encode()).hexdigest()[:24]
        samples.append(Sample(
            key=key,
            input_image=photo_like_jpeg(2 * number, side),
            target_image=photo_like_jpeg(2 * number + 1, side),
            user=f"Show my dog {number} on the beach, please.",
            assistant=f"Here is your dog {number} on a sunny beach, waves behind it.",
            meta={"key": key, "reference_id": f"ref-{number // 4}", "scores": {"clip_t": 0.31, "dino": 0.66}},
        ))
    return sorted(samples, key=lambda sample: sample.key)


# --- the S3 server -------------------------------------------------------------------------


class MotoProcess:
    """moto's ThreadedMotoServer on 127.0.0.1 in a child process; `endpoint` once started."""

    def __enter__(self) -> MotoProcess:
        self.process = subprocess.Popen([sys.executable, "-c", MOTO_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env={**os.environ, **FAKE_KEYS})  # stderr: one log line per request
        self.endpoint = f"http://127.0.0.1:{int(self.process.stdout.readline())}"
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def s3_client(endpoint: str):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


# --- the three writers ---------------------------------------------------------------------


def run_factory(endpoint: str, samples: list[Sample], shard_bytes: int, version: str) -> dict:
    from factory.dataset.manifest import VersionSpec
    from factory.dataset.publisher import publish_samples
    from factory.framework.config import StorageConfig
    from factory.framework.storage import S3Storage

    root = f"s3://{BUCKET}/factory"
    storage = S3Storage(root, StorageConfig(root=root, endpoint_url=endpoint))
    spec = VersionSpec(dataset="bench", version=version, kind="bootstrap", thresholds={"clip_t": 0.3, "dino": 0.6})
    started = time.perf_counter()
    manifest = publish_samples(storage, spec, samples, shard_max_bytes=shard_bytes)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": sum(s["bytes"] for s in manifest["shards"]),
            "shards": manifest["shards"], "files": len(manifest["shards"])}


def shard_groups(samples: list[Sample], shard_bytes: int) -> list[list[Sample]]:
    """The samples of each of the factory's shards: key order, cut by `cut_points`."""
    ordered = sorted(samples, key=lambda sample: sample.key)
    starts = cut_points([estimated_bytes(sample.payload_bytes()) for sample in ordered], shard_bytes, 10_000)
    return [ordered[start:end] for start, end in zip(starts, [*starts[1:], len(ordered)])]


def encode_seconds(samples: list[Sample], shard_bytes: int) -> float:
    """The factory's tar encoding + sha256 alone (no upload), for the breakdown."""
    started = time.perf_counter()
    for group in shard_groups(samples, shard_bytes):
        hashlib.sha256(encode_shard(group)).hexdigest()
    return time.perf_counter() - started


def shard_files(samples: list[Sample], shard_bytes: int, expected: list[dict], folder: Path) -> list[Path]:
    """The factory's shards, byte for byte (checked by sha256), as local files."""
    paths = []
    for number, group in enumerate(shard_groups(samples, shard_bytes)):
        data = encode_shard(group)
        if hashlib.sha256(data).hexdigest() != expected[number]["sha256"]:
            raise RuntimeError("boto3 side: shard bytes differ from the factory's")
        path = folder / f"shard-{number:06d}.tar"
        path.write_bytes(data)
        paths.append(path)
    return paths


def run_boto3(endpoint: str, paths: list[Path], prefix: str) -> dict:
    client = s3_client(endpoint)
    started = time.perf_counter()
    for path in paths:
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": sum(p.stat().st_size for p in paths), "files": len(paths)}


class ImageServer:
    """A static HTTP server on 127.0.0.1 over one folder, in a thread."""

    def __init__(self, folder: Path):
        handler = partial(QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ImageServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def run_img2dataset(executable: str, endpoint: str, samples: list[Sample], per_shard: int, folder: Path) -> dict:
    images = folder / "images"
    images.mkdir()
    names = []
    for sample in samples:
        for role, data in (("input", sample.input_image), ("target", sample.target_image)):
            name = f"{sample.key}-{role}.jpg"
            (images / name).write_bytes(data)
            names.append(name)
    with ImageServer(images) as server:
        url_list = folder / "urls.txt"
        url_list.write_text("".join(f"{server.url}/{name}\n" for name in names))
        command = [
            executable, "--url_list", str(url_list), "--input_format", "txt",
            "--output_folder", f"s3://{BUCKET}/img2dataset", "--output_format", "webdataset",
            "--resize_mode", "no", "--disable_all_reencoding", "True", "--processes_count", "1",
            "--thread_count", "16", "--number_sample_per_shard", str(per_shard), "--enable_wandb", "False",
            "--timeout", "30", "--retries", "0", "--distributor", "multiprocessing",
        ]
        env = {**os.environ, **FAKE_KEYS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=folder)
        seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"img2dataset exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    return {"seconds": seconds, **img2dataset_output(endpoint), "images": len(names)}


def img2dataset_output(endpoint: str) -> dict:
    """Shard bytes, success count and the time span from img2dataset's own per-shard stats."""
    client = s3_client(endpoint)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="img2dataset/").get("Contents", [])
    tars = [item for item in listing if item["Key"].endswith(".tar")]
    starts, ends, successes = [], [], 0
    for item in listing:
        if item["Key"].endswith("_stats.json"):
            stats = json.loads(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            starts.append(stats["start_time"])
            ends.append(stats["end_time"])
            successes += stats["successes"]
    return {"bytes": sum(item["Size"] for item in tars), "files": len(tars), "successes": successes,
            "own_seconds": (max(ends) - min(starts)) if starts else None}


# --- report --------------------------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def mb_per_s(result: dict, seconds_key: str = "seconds") -> float:
    return result["bytes"] / 2**20 / result[seconds_key]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"this {os.cpu_count()}-core CPU machine ({model}), no GPU, shared with other jobs"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update(FAKE_KEYS)
    samples = make_samples(args.samples, args.image_size)
    image_bytes = sum(len(s.input_image) + len(s.target_image) for s in samples)
    shard_bytes = args.shard_mb * 2**20
    lines = [f"{len(samples)} samples, {2 * len(samples)} JPEGs of {args.image_size} px, "
             f"{image_bytes / 2**20:.1f} MiB of images; factory shards up to {args.shard_mb} MiB; "
             f"load average {os.getloadavg()[0]:.1f}"]
    with MotoProcess() as moto, tempfile.TemporaryDirectory() as scratch:
        client = s3_client(moto.endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"x" * 2**20)  # moto loads its S3 backend lazily
        factories, uploads, paths = [], [], None
        for number in range(args.rounds):  # alternate the two, so a load change hits both
            factories.append(run_factory(moto.endpoint, samples, shard_bytes, f"v{number}"))
            paths = paths or shard_files(samples, shard_bytes, factories[0]["shards"], Path(scratch))
            uploads.append(run_boto3(moto.endpoint, paths, f"boto3/{number}"))
        factory, boto3 = median_run(factories), median_run(uploads)
        encode = encode_seconds(samples, shard_bytes)
        lines += [
            f"factory publish_samples: {factory['bytes'] / 2**20:7.1f} MiB in {factory['files']} shards, "
            f"median {factory['seconds']:.2f} s, {mb_per_s(factory):6.1f} MB/s "
            f"(runs: {', '.join(f'{mb_per_s(r):.1f}' for r in factories)}; tar encoding + sha256 alone {encode:.2f} s)",
            f"boto3 upload_file:       {boto3['bytes'] / 2**20:7.1f} MiB in {boto3['files']} files, "
            f"median {boto3['seconds']:.2f} s, {mb_per_s(boto3):6.1f} MB/s "
            f"(runs: {', '.join(f'{mb_per_s(r):.1f}' for r in uploads)}; same bytes, sha256 checked)",
        ]
        i2d = None
        if args.no_img2dataset:
            lines.append("img2dataset: skipped (--no-img2dataset)")
        elif not Path(args.img2dataset).exists():
            lines.append(f"img2dataset: not run: {args.img2dataset} is missing "
                         "(python -m venv /work/bench-venv && /work/bench-venv/bin/pip install img2dataset s3fs)")
        else:
            per_shard = max(1, round(2 * len(samples) * shard_bytes / max(factory["bytes"], 1)))
            i2d = run_img2dataset(args.img2dataset, moto.endpoint, samples, per_shard, Path(scratch))
            lines.append(
                f"img2dataset webdataset:  {i2d['bytes'] / 2**20:7.1f} MiB in {i2d['files']} shards "
                f"({i2d['successes']}/{i2d['images']} images), {i2d['seconds']:.2f} s, {mb_per_s(i2d):6.1f} MB/s "
                f"whole process; {i2d['own_seconds']:.2f} s, {mb_per_s(i2d, 'own_seconds'):6.1f} MB/s "
                f"by its shard stats")
    lines.append(f"ratio factory/boto3: {mb_per_s(factory) / mb_per_s(boto3):.2f}")
    if i2d:
        lines.append(f"ratio factory/img2dataset: {mb_per_s(factory) / mb_per_s(i2d):.2f} (whole process), "
                     f"{mb_per_s(factory) / mb_per_s(i2d, 'own_seconds'):.2f} (its shard stats)")
    print("\n".join(lines))
    if not args.no_results:
        section = [f"## publish_s3: {machine()}, {date.today().isoformat()}", "", "```", *lines, "```", ""]
        with Path(args.results).open("a") as handle:
            handle.write("\n".join(section) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
