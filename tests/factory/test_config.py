import pytest

from factory.framework.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_and_hash_is_stable():
    first, second = load_config(), load_config()
    assert first.sha256() == second.sha256()
    assert first.filter.thresholds == {"clip_t": -0.1, "dino": 0.9}


def test_production_defaults_are_the_papers():
    from factory.framework.config import FactoryConfig

    config = FactoryConfig()
    assert config.filter.thresholds == {"clip_t": 0.3, "dino": 0.6}
    assert (config.filter.clip_model, config.filter.clip_pretrained) == ("ViT-B-32", "openai")
    assert config.filter.dino_model == "facebook/dino-vits16"


def test_override_changes_value_and_hash():
    base = load_config()
    changed = load_config(None, ["filter.thresholds.clip_t=0.25", "storage.root=/tmp/x"])
    assert changed.filter.thresholds["clip_t"] == 0.25
    assert changed.storage.root == "/tmp/x"
    assert changed.sha256() != base.sha256()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plan:\n  unit_size: many\n", "plan.unit_size: Input should be a valid integer"),
        ("plan:\n  unit_sise: 4\n", "plan.unit_sise: unknown key"),
        ("generate:\n  generators:\n    g:\n      kind: profusion\n",
         "generate.generators.g.model: required field is missing"),
        ("plan:\n  unit_size: 0\n", "plan.unit_size: Input should be greater than or equal to 1"),
        ("dialogue:\n  engine: gpt\n", "dialogue.engine: Input should be 'transformers', 'vllm' or 'openai'"),
        ("references:\n  sources:\n    - kind: folder\n",
         "references.sources.0: a 'folder' source needs 'path'"),
        ("dataset: my/data\n", "dataset: name 'my/data' is not a valid name"),
        ("- just\n- a list\n", "must hold a mapping at the top level"),
        ("plan: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_the_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert expected in str(caught.value)


def test_missing_file_and_bad_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expects key=value"):
        load_config(None, ["plan.unit_size"])
    with pytest.raises(ConfigError, match="plan.nonsense: unknown key"):
        load_config(None, ["plan.nonsense=3"])


def test_relative_paths_become_absolute_so_workers_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["storage.root=data", "dialogue.model=./models/llm"])
    assert config.storage.root == str(tmp_path / "data")
    assert config.dialogue.model == str(tmp_path / "models" / "llm")
    assert config.filter.clip_model == "tiny-clip"  # a name, not a path: left alone
    assert load_config(None, ["storage.root=s3://bucket/x"]).storage.root == "s3://bucket/x"


def test_an_empty_storage_root_is_refused_not_taken_as_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="storage.root: .*the storage root is empty"):
        load_config(None, ["storage.root="])
    with pytest.raises(ConfigError, match="storage.root: .*the storage root is empty"):
        load_config(write(tmp_path, "storage:\n  root: '  '\n"))


def test_production_config_names_the_papers_checkpoints():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "production.yaml")
    assert config.references.sd_model == "stabilityai/stable-diffusion-2-base"
    assert (config.filter.clip_model, config.filter.clip_pretrained, config.filter.dino_model) == (
        "ViT-B-32", "openai", "facebook/dino-vits16")
    assert config.filter.thresholds == {"clip_t": 0.3, "dino": 0.6}
    assert config.train.clip_model == "openai/clip-vit-large-patch14-336"
    assert config.train.dino_model == "facebook/dinov2-giant"
    assert config.dialogue.engine == "vllm" and config.dialogue.model == "meta-llama/Llama-2-70b-chat-hf"
    assert config.dialogue.tensor_parallel_size == 4
    assert config.storage.root.startswith("s3://")


def test_a_pool_asks_ray_for_the_memory_it_uses():
    config = load_config(None, ["filter.memory=1073741824"])
    assert config.filter.ray_options()["memory"] == 2**30
    assert "memory" not in load_config(None, ["filter.memory=0"]).filter.ray_options()  # 0 reserves none
    with pytest.raises(ConfigError, match="filter.memory"):
        load_config(None, ["filter.memory=-1"])


def test_the_demos_model_pools_reserve_memory_that_its_ray_holds():
    config = load_config()
    pools = [config.generate.memory, config.filter.memory, config.dialogue.memory, config.eval.memory,
             config.train.memory_per_worker, config.promptnet.memory_per_worker, config.publish.task_memory]
    assert all(pools) and max(pools) <= config.ray.memory <= 12 * 2**30  # half of a 24 GiB machine at most
    assert config.generate.memory == config.filter.memory == config.dialogue.memory  # one shared actor
    assert config.ray.local_cluster() == {"num_cpus": 2, "_memory": config.ray.memory}  # ray.init's arguments
