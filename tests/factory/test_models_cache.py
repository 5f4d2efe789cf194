"""factory.framework.models_cache against moto's S3 server: one download per node, never a half one, clear errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from factory.framework.config import StorageConfig


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    from factory.tiny.dino import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("dino") / "tiny-dino")


def upload(folder: str | Path, endpoint: str, url: str) -> StorageConfig:
    from factory.framework.storage import S3Storage

    settings = StorageConfig(root=url, endpoint_url=endpoint)
    storage = S3Storage(url, settings)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            storage.upload_file(path, path.relative_to(folder).as_posix())
    return settings


@pytest.fixture
def counted_gets(monkeypatch):
    """Every object the resolver downloads, by key."""
    from factory.framework.storage import S3Storage

    gets: list[str] = []
    real = S3Storage.download_file

    def counting(self, key, local_path):
        gets.append(key)
        return real(self, key, local_path)

    monkeypatch.setattr(S3Storage, "download_file", counting)
    return gets


def test_an_s3_dino_loads_through_the_real_scorer_and_downloads_once(tiny_dino, s3_bucket, counted_gets, model_cache):
    from factory.framework.models_cache import local_model
    from filters.dino import DinoScorer

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    files = sorted(p.relative_to(tiny_dino).as_posix() for p in Path(tiny_dino).rglob("*") if p.is_file())

    local = local_model(url, settings, "filter.dino_model")
    assert Path(local).parent == model_cache and sorted(counted_gets) == files
    scorer = DinoScorer(local)
    assert scorer.model.config.hidden_size > 0
    assert local_model(url, settings, "filter.dino_model") == local
    assert sorted(counted_gets) == files  # the second resolve fetched nothing
    assert local_model(tiny_dino, settings, "filter.dino_model") == tiny_dino  # a local path is itself
    assert local_model("facebook/dino-vits16", settings) == "facebook/dino-vits16"  # so is a hub id


def test_a_changed_model_is_a_new_cache_entry(tiny_dino, s3_bucket):
    from factory.framework.models_cache import local_model
    from factory.framework.storage import S3Storage

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    first = local_model(url, settings, "filter.dino_model")
    S3Storage(url, settings).write_bytes("README.md", b"retrained")
    second = local_model(url, settings, "filter.dino_model")
    assert second != first and (Path(second) / "README.md").read_bytes() == b"retrained"


def test_a_killed_half_download_is_never_used(tiny_dino, s3_bucket, model_cache, counted_gets):
    from factory.framework.models_cache import describe_s3, local_model

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    entry = describe_s3(url, settings).entry
    leftover = model_cache / f".{entry}.partial-4242-0"  # what a download killed half-way leaves
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{half")

    local = local_model(url, settings, "filter.dino_model")
    assert Path(local).name == entry and counted_gets  # downloaded afresh, not taken from the leftover
    assert (Path(local) / "config.json").read_bytes() == (Path(tiny_dino) / "config.json").read_bytes()
    assert not leftover.exists()
    from filters.dino import DinoScorer

    DinoScorer(local)


def test_the_next_download_removes_other_entries_half_downloads_unless_one_is_under_way(tiny_dino, s3_bucket,
                                                                                       model_cache):
    import fcntl

    from factory.framework.models_cache import local_model

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    model_cache.mkdir(parents=True, exist_ok=True)
    abandoned = model_cache / ".last-nights-g-0a1b.partial-4242-0"  # killed, of an entry never asked for again
    under_way = model_cache / ".tonights-g-2c3d.partial-4343-0"  # another process downloads it now, holding its lock
    for partial in (abandoned, under_way):
        partial.mkdir()
        (partial / "unet.safetensors").write_bytes(b"half")
    with open(model_cache / ".tonights-g-2c3d.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        local_model(url, settings, "filter.dino_model")
        fcntl.flock(held, fcntl.LOCK_UN)
    assert not abandoned.exists() and under_way.exists()


def test_two_threads_resolving_at_once_download_once(tiny_dino, s3_bucket, counted_gets):
    from factory.framework.models_cache import local_model

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    files = sorted(p.relative_to(tiny_dino).as_posix() for p in Path(tiny_dino).rglob("*") if p.is_file())
    start = threading.Barrier(2)
    results: list[str] = []

    def resolve():
        start.wait()
        results.append(local_model(url, settings, "filter.dino_model"))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert sorted(counted_gets) == files  # each object fetched once, not once per thread


def test_a_single_object_model_resolves_to_its_file(tmp_path, s3_bucket):
    from factory.framework.models_cache import local_model
    from factory.tiny.clip import build_tiny_clip
    from filters.clip import ClipScorer

    endpoint, bucket = s3_bucket
    tiny = build_tiny_clip(tmp_path / "tiny-clip")
    settings = upload(tmp_path / "tiny-clip", endpoint, f"s3://{bucket}/models/tiny-clip")
    pretrained = local_model(f"s3://{bucket}/models/tiny-clip/tiny-clip.pt", settings, "filter.clip_pretrained")
    config = local_model(f"s3://{bucket}/models/tiny-clip/tiny-clip.json", settings, "filter.clip_model_config")
    assert Path(pretrained).name == "tiny-clip.pt" and Path(config).name == "tiny-clip.json"
    scorer = ClipScorer(tiny.model_name, pretrained, model_config=config)
    assert scorer.embed_texts(["a dog"]).shape[0] == 1


def test_a_missing_s3_model_fails_naming_the_key(s3_bucket):
    from factory.framework.models_cache import ModelUnavailable, local_model

    endpoint, bucket = s3_bucket
    settings = StorageConfig(root=f"s3://{bucket}", endpoint_url=endpoint)
    with pytest.raises(ModelUnavailable, match=r"filter\.dino_model='s3://.*/models/nothing-here'.*no objects"):
        local_model(f"s3://{bucket}/models/nothing-here", settings, "filter.dino_model")
    with pytest.raises(ModelUnavailable, match=r"dialogue\.model=.*bucket does not exist") as caught:
        local_model("s3://no-such-bucket-here/llm", settings, "dialogue.model")
    assert "testing-secret-key" not in str(caught.value) and "testing-key-id" not in str(caught.value)


def test_check_inputs_lists_s3_models_before_any_work(tiny_dino, s3_bucket):
    from factory.framework.config import ConfigError, load_config
    from factory.run import check_inputs

    endpoint, bucket = s3_bucket
    upload(tiny_dino, endpoint, f"s3://{bucket}/models/tiny-dino")
    overrides = [f"storage.endpoint_url={endpoint}", f"filter.dino_model=s3://{bucket}/models/tiny-dino",
                 "filter.clip_pretrained=openai", "filter.clip_model_config=null",
                 "dialogue.model=hub/llm", "references.sources=[]",
                 "generate.generators.profusion.model=hub/sd", "generate.generators.profusion.checkpoint=null",
                 "generate.generators.cafe.model=hub/sd", "generate.generators.ip_adapter.model=hub/sd",
                 "generate.generators.ip_adapter.checkpoint=hub/ip-adapter"]
    check_inputs(load_config(None, overrides), "filter")  # present on S3: passes
    missing = load_config(None, [*overrides, f"dialogue.model=s3://{bucket}/models/no-llm"])
    with pytest.raises(ConfigError, match=r"dialogue\.model='s3://.*/models/no-llm': no objects"):
        check_inputs(missing, "filter")


def test_the_manifest_names_an_s3_model_by_url_and_etag_digest(tiny_dino, s3_bucket):
    from factory.framework.models_cache import describe_s3, model_fingerprint

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/models/tiny-dino"
    settings = upload(tiny_dino, endpoint, url)
    named = model_fingerprint(url, settings)
    assert named == {"source": url, "etag_sha256": describe_s3(url, settings).digest}
    assert len(named["etag_sha256"]) == 64


def test_check_inputs_checks_only_the_generator_the_stage_draws_with(tmp_path):
    """A night that draws with ProFusion is not refused for an IP-Adapter it never loads."""
    from factory.framework.config import ConfigError, load_config
    from factory.run import check_inputs

    overrides = ["filter.clip_pretrained=openai", "filter.clip_model_config=null", "filter.dino_model=hub/dino",
                 "dialogue.model=hub/llm", "references.sources=[]",
                 f"generate.generators.profusion.model={tmp_path}", "generate.generators.profusion.checkpoint=hub/pn",
                 f"generate.generators.ip_adapter.model={tmp_path / 'no-sd15-here'}"]
    check_inputs(load_config(None, overrides), "generate")
    drawing_with_the_adapter = load_config(None, [*overrides, "plan.generator=ip_adapter"])
    with pytest.raises(ConfigError, match=r"generate\.generators\.ip_adapter\.model: .*no-sd15-here does not exist"):
        check_inputs(drawing_with_the_adapter, "generate")
    check_inputs(drawing_with_the_adapter, "filter")  # loads no generator
