"""The references stage: every source kind, the bad-image catalogue, stable ids and parts."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.dataset.reference_sets import list_parts, load_references, load_rejections, read_part
from factory.dataset.reference_sources import (
    ReferencesError,
    generated_candidates,
    is_clean_s3_name,
    unsafe_member_name,
)
from factory.framework.config import ConfigError, FactoryConfig, validate_config
from factory.framework.stage import RunContext
from factory.framework.storage import S3Storage
from models.sd_drawer import StableDiffusionDrawer
from stages import references

# --- helpers -------------------------------------------------------------------------------


def noise(size=(48, 40), mode="RGB", seed=0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    data = np.random.default_rng(seed).integers(0, 256, size[0] * size[1] * channels, dtype=np.uint8)
    return Image.frombytes(mode, size, data.tobytes())


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 27).astype(np.uint16)
    data = encoded(Image.frombytes("I;16", (48, 40), ramp.astype("<u2").tobytes()))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    return data


def exif_rotated_jpeg() -> bytes:
    """64x32 pixels stored, left half red and right half blue, EXIF orientation 6 (rotate 90 CW to view)."""
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = (240, 0, 0)
    array[:, 32:] = (0, 0, 240)
    array += np.random.default_rng(1).integers(0, 8, array.shape, dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


def config_for(tmp_path: Path, sources: list[dict], storage: dict | None = None, **refs) -> FactoryConfig:
    raw = {
        "storage": storage or {"root": str(tmp_path / "root")},
        "references": {"set": "refs", "min_side": 8, "sources": sources, **refs},
    }
    return validate_config(raw)


def run_stage(config: FactoryConfig) -> tuple[dict, RunContext]:
    ctx = RunContext(config)
    return references.run(ctx), ctx


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def stored_image(row) -> Image.Image:
    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


# --- folder source and the bad-image catalogue ----------------------------------------------


CATALOGUE = {
    # name: (bytes, expected reason, or None when the image is converted and kept)
    "zero.jpg": (b"", "empty_image"),
    "truncated.jpg": (encoded(noise((64, 64)), "JPEG")[:300], "corrupt_image"),
    "text.jpg": (b"this is a text file, not a picture\n" * 4, "corrupt_image"),
    "notes.txt": (b"just notes", "not_an_image_file"),
    "bomb.png": (png_claiming(100_000, 100_000), "image_too_large"),
    "one_pixel.png": (encoded(noise((1, 1))), "image_too_small"),
    "flat.png": (encoded(Image.new("RGB", (64, 64), (120, 30, 200))), "degenerate_image"),
    "flat_gray.jpg": (encoded(Image.new("L", (64, 64), 128), "JPEG"), "degenerate_image"),
    "gray.png": (encoded(noise(mode="L")), None),
    "palette.png": (encoded(noise().convert("P", palette=Image.Palette.ADAPTIVE)), None),
    "rgba.png": (encoded(noise(mode="RGBA")), None),
    "cmyk.jpg": (encoded(noise(mode="CMYK"), "JPEG"), None),
    "sixteen_bit.png": (sixteen_bit_png(), None),
    "rotated.jpg": (exif_rotated_jpeg(), None),
    "photo.webp": (encoded(noise(), "WEBP"), None),
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_bad_image_catalogue(tmp_path, name):
    data, reason = CATALOGUE[name]
    folder = write_files(tmp_path / "in", {name: data, "good.png": encoded(noise(seed=7))})
    summary, ctx = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder), "subject": "cat"}]))
    stored = load_references(ctx.storage, "refs")
    rejected = load_rejections(ctx.storage, "refs")
    if reason is None:
        assert summary == {"set": "refs", "references": 2, "parts": 1, "rejected": {}, "digest": summary["digest"]}
        assert len(summary["digest"]) == 64  # the set's content (tests/stages/test_plan.py checks what it tells)
        row = stored[stored["origin"] == name].iloc[0]
        assert stored_image(row).size == (row["width"], row["height"])
    else:
        assert summary["references"] == 1 and summary["rejected"] == {reason: 1}
        assert rejected[["origin", "reason"]].values.tolist() == [[name, reason]]
        assert list(stored["origin"]) == ["good.png"]


def test_exif_rotated_image_is_stored_upright(tmp_path):
    folder = write_files(tmp_path / "in", {"rotated.jpg": exif_rotated_jpeg()})
    _, ctx = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder), "subject": "flag"}]))
    image = np.asarray(stored_image(load_references(ctx.storage, "refs").iloc[0]), dtype=np.int32)
    assert image.shape[:2] == (64, 32)  # portrait now: 32 wide, 64 tall
    top, bottom = image[:24].mean(axis=(0, 1)), image[40:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, "the red half belongs on top once rotated"
    assert bottom[2] > 200 and bottom[0] < 60


def test_max_pixels_and_max_file_size_refuse_before_decoding(tmp_path):
    folder = write_files(tmp_path / "in", {"a.png": encoded(noise((64, 64))), "b.png": encoded(noise((16, 16)))})
    summary, _ = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder), "subject": "x"}],
                                      max_pixels=1000))
    assert summary["references"] == 1 and summary["rejected"] == {"image_too_large": 1}
    summary, _ = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder), "subject": "x"}],
                                      max_file_mb=0.005))
    assert summary["references"] == 1 and summary["rejected"] == {"file_too_large": 1}


def test_folder_subjects_weird_names_and_store_size(tmp_path):
    folder = write_files(tmp_path / "in", {
        "golden_retriever/one.jpg": encoded(noise((300, 200)), "JPEG"),
        "çà va/über ü.png": encoded(noise(seed=2)),
        "top_level.png": encoded(noise(seed=3)),
        ".hidden.png": encoded(noise(seed=4)),
    })
    with open(os.path.join(os.fsencode(folder / "golden_retriever"), b"caf\xe9 \xff.png"), "wb") as handle:
        handle.write(encoded(noise(seed=5)))  # a name that is not UTF-8
    summary, ctx = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder)}], store_size=64))
    stored = load_references(ctx.storage, "refs").set_index("origin")
    assert summary["rejected"] == {"missing_subject": 1}  # top-level file, no subject, object domain
    assert set(stored.index) == {"golden_retriever/one.jpg", "çà va/über ü.png",
                                 "golden_retriever/caf\ufffd \ufffd.png"}
    assert stored.loc["golden_retriever/one.jpg", "subject"] == "golden retriever"
    assert stored.loc["çà va/über ü.png", "subject"] == "çà va"
    assert (stored.loc["golden_retriever/one.jpg", ["width", "height"]] == [64, 43]).all()
    for ident in stored["reference_id"]:
        assert ident.isascii() and "/" not in ident and "." not in ident and ".." not in ident
    assert set(stored["source"]) == {"folder"} and set(stored["domain"]) == {"object"}
    assert stored["prompt"].isna().all() and stored["seed"].isna().all()


def test_human_domain_defaults_subject_to_person(tmp_path):
    folder = write_files(tmp_path / "in", {"00001.png": encoded(noise())})
    _, ctx = run_stage(config_for(tmp_path, [{"kind": "folder", "path": str(folder), "domain": "human"}]))
    assert load_references(ctx.storage, "refs")[["subject", "domain"]].values.tolist() == [["person", "human"]]


def test_same_inputs_give_byte_identical_parts_in_id_order(tmp_path):
    folder = write_files(tmp_path / "in", {f"dog/{i}.png": encoded(noise(seed=i)) for i in range(5)})
    source = [{"kind": "folder", "path": str(folder)}]
    first = config_for(tmp_path, source, part_size=2, storage={"root": str(tmp_path / "a")})
    second = config_for(tmp_path, source, part_size=2, storage={"root": str(tmp_path / "b")})
    summary, ctx_a = run_stage(first)
    _, ctx_b = run_stage(second)
    keys = list_parts(ctx_a.storage, "refs")
    assert summary["parts"] == 3 and [k.rsplit("/", 1)[1] for k in keys] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for key in [*keys, "references/refs/rejections.parquet"]:
        assert ctx_a.storage.read_bytes(key) == ctx_b.storage.read_bytes(key)
    ids = list(load_references(ctx_a.storage, "refs")["reference_id"])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert list(read_part(ctx_a.storage, "refs", 1, columns=["reference_id"])["reference_id"]) == ids[2:4]

    (folder / "dog" / "4.png").unlink()  # a smaller re-run drops the part it no longer fills
    (folder / "dog" / "3.png").unlink()
    summary, _ = run_stage(first)
    assert summary["parts"] == 2 and len(list_parts(ctx_a.storage, "refs")) == 2
    assert list(load_references(ctx_a.storage, "refs")["reference_id"]) == [
        i for i in ids if i in set(load_references(ctx_a.storage, "refs")["reference_id"])]


def test_duplicate_source_counts_duplicates(tmp_path):
    folder = write_files(tmp_path / "in", {"a.png": encoded(noise())})
    source = {"kind": "folder", "path": str(folder), "subject": "x"}
    summary, _ = run_stage(config_for(tmp_path, [source, source]))
    assert summary["references"] == 1 and summary["rejected"] == {"duplicate_reference": 1}


def test_missing_folder_fails_before_any_work(tmp_path):
    config = config_for(tmp_path, [{"kind": "folder", "path": str(tmp_path / "nowhere")}])
    with pytest.raises(ReferencesError, match="reference folder not found"):
        run_stage(config)
    assert not (tmp_path / "root").exists()


def test_load_references_of_an_empty_set(tmp_path):
    _, ctx = run_stage(config_for(tmp_path, []))
    frame = load_references(ctx.storage, "refs")
    assert frame.empty and "reference_id" in frame.columns


# --- s3 ---------------------------------------------------------------------------------------


def test_s3_source_reads_through_the_configured_endpoint(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = {
        "refs/teapot/a.jpg": encoded(noise(seed=1), "JPEG"),
        "refs/日本/猫.png": encoded(noise(seed=2)),
        "refs/teapot/broken.png": b"\x89PNG not really",
        "refs/../escape.png": encoded(noise(seed=3)),
        "refs/a//double.png": encoded(noise(seed=4)),
        "other/outside.png": encoded(noise(seed=5)),
        "refs/empty-folder/": b"",
    }
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    storage = {"root": str(tmp_path / "root"), "endpoint_url": endpoint, "max_attempts": 2}
    config = config_for(tmp_path, [{"kind": "s3", "path": f"s3://{bucket}/refs"}], storage=storage)
    summary, ctx = run_stage(config)
    stored = load_references(ctx.storage, "refs").set_index("origin")
    assert set(stored.index) == {"teapot/a.jpg", "日本/猫.png"}
    assert stored.loc["日本/猫.png", "subject"] == "日本" and set(stored["source"]) == {"s3"}
    assert summary["rejected"] == {"corrupt_image": 1, "unsafe_name": 2}
    rejected = load_rejections(ctx.storage, "refs")
    assert set(rejected[rejected.reason == "unsafe_name"]["origin"]) == {"../escape.png", "a//double.png"}


def test_s3_objects_over_max_file_mb_are_refused_from_their_listed_size_never_read(tmp_path, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="refs/dog/small.png", Body=encoded(noise(seed=1)))
    client.put_object(Bucket=bucket, Key="refs/dog/big.png", Body=encoded(noise((200, 200), seed=2)))
    real_read, reads = S3Storage.read_bytes, []

    def recorded_read(self, key: str) -> bytes:
        reads.append(key)
        return real_read(self, key)

    monkeypatch.setattr(S3Storage, "read_bytes", recorded_read)
    storage = {"root": str(tmp_path / "root"), "endpoint_url": endpoint, "max_attempts": 2}
    config = config_for(tmp_path, [{"kind": "s3", "path": f"s3://{bucket}/refs"}], storage=storage, max_file_mb=0.05)
    summary, ctx = run_stage(config)
    assert summary["references"] == 1 and summary["rejected"] == {"file_too_large": 1}
    assert load_rejections(ctx.storage, "refs")["origin"].tolist() == ["dog/big.png"]
    assert reads == ["dog/small.png"]


@pytest.mark.parametrize("name,clean", [
    ("dog/a.jpg", True), ("日本/猫.png", True), ("a b/c.jpg", True),
    ("../a.jpg", False), ("a/../b.jpg", False), ("a//b.jpg", False), ("./a.jpg", False),
    ("/a.jpg", False), ("a\x00.jpg", False), ("a\\b.jpg", False),
])
def test_s3_names_the_storage_layer_would_rewrite_are_unsafe(name, clean):
    assert is_clean_s3_name(name) is clean


def test_s3_source_with_a_missing_bucket_fails_clearly(tmp_path, s3_server):
    storage = {"root": str(tmp_path / "root"), "endpoint_url": s3_server, "max_attempts": 1}
    config = config_for(tmp_path, [{"kind": "s3", "path": "s3://no-such-bucket-here/refs"}], storage=storage)
    with pytest.raises(ReferencesError, match="no-such-bucket-here"):
        run_stage(config)


# --- webdataset ---------------------------------------------------------------------------------


def add_member(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shard(path: Path, members: list[tuple], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            add_member(archive, *member)
    return path


def test_webdataset_source(tmp_path):
    shards = tmp_path / "shards"
    write_shard(shards / "train" / "shard-000.tar", [
        ("000.jpg", encoded(noise(seed=1), "JPEG")), ("000.cls", b"dog\n"),
        ("001.png", encoded(noise(seed=2))), ("001.json", json.dumps({"subject": "red teapot"}).encode()),
        ("./002.webp", encoded(noise(seed=3), "WEBP")), ("./002.txt", b"backpack"),
        ("003.txt", b"a caption without an image"),
        ("../escape.jpg", encoded(noise(seed=4), "JPEG")),
        ("/etc/absolute.jpg", encoded(noise(seed=5), "JPEG")),
        ("a/../../up.png", encoded(noise(seed=6))),
        ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
    ])
    write_shard(shards / "val" / "shard-000.tar", [("000.jpg", encoded(noise(seed=9), "JPEG")), ("000.cls", b"dog")])
    config = config_for(tmp_path, [{"kind": "webdataset", "path": f"{shards}/{{train,val}}/shard-*.tar"}])
    summary, ctx = run_stage(config)
    stored = load_references(ctx.storage, "refs").set_index("origin")
    assert dict(stored["subject"]) == {
        "train/shard-000.tar/000": "dog", "train/shard-000.tar/001": "red teapot",
        "train/shard-000.tar/002": "backpack", "val/shard-000.tar/000": "dog"}
    assert summary["rejected"] == {"unsafe_member_name": 3, "unsupported_member": 1, "no_image_member": 1}
    rejected = load_rejections(ctx.storage, "refs")
    assert set(rejected[rejected.reason == "unsafe_member_name"]["origin"]) == {
        "train/shard-000.tar/../escape.jpg", "train/shard-000.tar//etc/absolute.jpg",
        "train/shard-000.tar/a/../../up.png"}
    assert len(set(stored["reference_id"])) == 4 and not (tmp_path / "escape.jpg").exists()


def test_webdataset_damaged_shards_are_counted_and_the_good_samples_kept(tmp_path):
    shards = tmp_path / "shards"
    whole = write_shard(shards / "whole.tar", [(f"{i:03d}.png", encoded(noise(seed=i))) for i in range(3)])
    data = whole.read_bytes()
    second_header = 512 + (len(encoded(noise(seed=0))) + 511) // 512 * 512
    (shards / "cut.tar").write_bytes(data[: second_header + 512 + 100])  # second member's data cut short
    (shards / "junk.tar").write_bytes(b"not a tar archive at all" * 40)
    config = config_for(tmp_path, [{"kind": "webdataset", "path": f"{shards}/*.tar", "subject": "dog"}])
    summary, ctx = run_stage(config)
    stored = load_references(ctx.storage, "refs")
    assert sorted(stored["origin"]) == ["cut.tar/000", "whole.tar/000", "whole.tar/001", "whole.tar/002"]
    assert summary["rejected"] == {"truncated_shard": 1, "unreadable_shard": 1, "read_error": 1}


def test_damaged_compressed_shards_are_counted_and_the_good_samples_kept(tmp_path):
    shards = tmp_path / "shards"
    members = [(f"{i:03d}.png", encoded(noise(seed=i))) for i in range(3)]
    write_shard(shards / "whole.tar", members)
    gz = write_shard(tmp_path / "whole.tar.gz", members, "w:gz").read_bytes()
    xz = bytearray(write_shard(tmp_path / "whole.tar.xz", members, "w:xz").read_bytes())
    (shards / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])  # ends inside the second member's data
    (shards / "head.tar.gz").write_bytes(gz[:100])  # ends inside the first header
    xz[len(xz) // 2 : len(xz) // 2 + 16] = b"\xff" * 16  # corrupt inside the second member's data
    (shards / "corrupt.tar.xz").write_bytes(bytes(xz))
    config = config_for(tmp_path, [{"kind": "webdataset", "path": f"{shards}/*.tar*", "subject": "dog"}])
    summary, ctx = run_stage(config)
    stored = load_references(ctx.storage, "refs")
    assert sorted(stored["origin"]) == [
        "corrupt.tar.xz/000", "cut.tar.gz/000", "whole.tar/000", "whole.tar/001", "whole.tar/002"]
    assert summary["rejected"] == {"truncated_shard": 2, "unreadable_shard": 1, "read_error": 2}
    rejected = load_rejections(ctx.storage, "refs").groupby("reason")["origin"].apply(sorted).to_dict()
    assert rejected == {"truncated_shard": ["corrupt.tar.xz", "cut.tar.gz"], "unreadable_shard": ["head.tar.gz"],
                        "read_error": ["corrupt.tar.xz/001", "cut.tar.gz/001"]}


def test_more_shards_than_open_files_allowed_keeps_every_sample(tmp_path):
    shards = tmp_path / "shards"
    for i in range(64):
        write_shard(shards / f"shard-{i:03d}.tar", [("000.png", encoded(noise((16, 16), seed=i)))])
    config = config_for(tmp_path, [{"kind": "webdataset", "path": f"{shards}/shard-*.tar", "subject": "dog"}],
                        io_threads=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    try:
        summary, _ = run_stage(config)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert summary["references"] == 64 and summary["rejected"] == {}


def test_a_metadata_member_nested_past_jsons_limit_is_skipped_like_any_unreadable_one(tmp_path):
    shards = tmp_path / "shards"
    write_shard(shards / "shard-000.tar", [
        ("000.png", encoded(noise(seed=1))), ("000.json", b"[" * 30_000 + b"]" * 30_000), ("000.cls", b"dog"),
        ("001.png", encoded(noise(seed=2))), ("001.json", json.dumps({"subject": "red teapot"}).encode()),
    ])
    config = config_for(tmp_path, [{"kind": "webdataset", "path": f"{shards}/shard-*.tar"}])
    summary, ctx = run_stage(config)
    stored = load_references(ctx.storage, "refs").set_index("origin")
    assert dict(stored["subject"]) == {"shard-000.tar/000": "dog", "shard-000.tar/001": "red teapot"}
    assert summary["rejected"] == {}


def test_webdataset_without_shards_fails_before_work(tmp_path):
    config = config_for(tmp_path, [{"kind": "webdataset", "path": str(tmp_path / "none-*.tar")}])
    with pytest.raises(ReferencesError, match="no WebDataset shards"):
        run_stage(config)


@pytest.mark.parametrize("name,unsafe", [
    ("000.jpg", False), ("./000.jpg", False), ("dir/000.jpg", False), ("..foo.jpg", False),
    ("../000.jpg", True), ("a/../../000.jpg", True), ("/abs.jpg", True), ("a\x00b.jpg", True),
    ("C:/x.jpg", True), ("a\\..\\b.jpg", True), ("", True),
])
def test_unsafe_member_names(name, unsafe):
    assert unsafe_member_name(name) is unsafe


# --- generated ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from factory.tiny.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")


def generated_config(tmp_path, tiny_sd, root="root", **extra):
    source = {"kind": "generated", "prompts": ["dog", "apple"], "per_prompt": 2, "seed": 3}
    settings = {"sd_model": tiny_sd, "sd_size": 64, "sd_steps": 2, "batch_size": 3, **extra}
    return config_for(tmp_path, [source], storage={"root": str(tmp_path / root)}, **settings)


def test_generated_references_record_prompt_and_seed(tmp_path, tiny_sd):
    summary, ctx = run_stage(generated_config(tmp_path, tiny_sd))
    stored = load_references(ctx.storage, "refs")
    assert summary["references"] == 4 and summary["rejected"] == {}
    assert set(stored["source"]) == {"generated"} and set(stored["domain"]) == {"object"}
    assert sorted(set(zip(stored["subject"], stored["prompt"]))) == [
        ("apple", "a photo of an apple"), ("dog", "a photo of a dog")]
    assert stored["seed"].nunique() == 4 and (stored[["width", "height"]] == 64).all().all()
    assert stored["image"].nunique() == 4

    _, again = run_stage(generated_config(tmp_path, tiny_sd, root="again"))
    for key in list_parts(ctx.storage, "refs"):
        assert ctx.storage.read_bytes(key) == again.storage.read_bytes(key)


def test_generated_seeds_survive_adding_classes(tmp_path):
    config = FactoryConfig().references
    source = validate_config({"references": {"sources": [
        {"kind": "generated", "prompts": ["dog"], "per_prompt": 2}]}}).references.sources[0]
    more = source.model_copy(update={"prompts": ["cat", "dog"]})
    ids = {c.reference_id: c.seed for c in generated_candidates(source, config)}
    more_ids = {c.reference_id: c.seed for c in generated_candidates(more, config)}
    assert set(ids.items()) < set(more_ids.items())


def test_generated_with_a_missing_model_fails_before_any_work(tmp_path):
    config = config_for(tmp_path, [{"kind": "generated", "prompts": ["dog"]}], sd_model=str(tmp_path / "no-model"))
    with pytest.raises(ReferencesError, match="references.sd_model"):
        run_stage(config)
    assert not (tmp_path / "root").exists()


def test_a_failed_drawing_batch_is_counted_and_the_stage_goes_on(tmp_path, tiny_sd, monkeypatch):
    real_call = StableDiffusionDrawer.__call__

    def fail_on_apples(self, rows):
        if any("apple" in prompt for prompt in rows["prompt"]):
            rows = rows.assign(prompt=None)  # the real pipeline refuses a batch without prompts
        return real_call(self, rows)

    monkeypatch.setattr(StableDiffusionDrawer, "__call__", fail_on_apples)
    summary, ctx = run_stage(generated_config(tmp_path, tiny_sd, batch_size=1))
    assert summary["references"] == 2 and summary["rejected"] == {"generation_failed": 2}
    assert set(load_references(ctx.storage, "refs")["subject"]) == {"dog"}


def test_a_killed_drawing_resumes_with_what_it_drew_and_ends_with_the_same_parts(tmp_path, tiny_sd, monkeypatch):
    real_call = StableDiffusionDrawer.__call__
    calls = []

    def killed_at_the_third_batch(self, rows):
        calls.append(list(rows["reference_id"]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-ingest
        return real_call(self, rows)

    monkeypatch.setattr(StableDiffusionDrawer, "__call__", killed_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_stage(generated_config(tmp_path, tiny_sd, batch_size=1))
    drawn_first = [ids for ids in calls[:2]]
    calls.clear()
    _, ctx = run_stage(generated_config(tmp_path, tiny_sd, batch_size=1))
    assert len(calls) == 2 and not set(map(tuple, calls)) & set(map(tuple, drawn_first))  # only the rest drawn
    monkeypatch.setattr(StableDiffusionDrawer, "__call__", real_call)
    _, clean = run_stage(generated_config(tmp_path, tiny_sd, root="clean", batch_size=1))
    for key in list_parts(clean.storage, "refs"):
        assert ctx.storage.read_bytes(key) == clean.storage.read_bytes(key)


@pytest.mark.slow
def test_generated_on_ray_actors_matches_the_driver(tmp_path, tiny_sd):
    import ray

    _, local = run_stage(generated_config(tmp_path, tiny_sd, root="local"))
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        _, pooled = run_stage(generated_config(tmp_path, tiny_sd, root="pooled", concurrency=2))
    finally:
        ray.shutdown()
    here, there = load_references(local.storage, "refs"), load_references(pooled.storage, "refs")
    meta = ["reference_id", "subject", "prompt", "seed", "width", "height"]
    assert len(here) == 4 and here[meta].equals(there[meta])
    for mine, theirs in zip(here["image"], there["image"]):  # thread counts differ: equal up to float rounding
        difference = np.abs(np.asarray(Image.open(io.BytesIO(mine)), dtype=float)
                            - np.asarray(Image.open(io.BytesIO(theirs)), dtype=float))
        assert difference.mean() < 2.0


# --- config --------------------------------------------------------------------------------------


def test_config_refuses_bad_set_names_and_prompts(tmp_path):
    with pytest.raises(ConfigError, match="references.set"):
        validate_config({"references": {"set": "../x"}})
    with pytest.raises(ConfigError, match="sd_prompt"):
        validate_config({"references": {"sd_prompt": "a photo"}})
    with pytest.raises(ConfigError, match="sd_size"):
        validate_config({"references": {"sd_size": 100}})
    with pytest.raises(ConfigError, match="s3://"):
        validate_config({"references": {"sources": [{"kind": "s3", "path": "bucket/prefix"}]}})
