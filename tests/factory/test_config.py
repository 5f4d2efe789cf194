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


def laughs(depth: int, width: int = 9) -> str:
    """A "billion laughs": lists of `width` aliases to the list before, `depth` deep (width**depth strings)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]" for n in range(1, depth)]
    return "\n".join(lines) + "\n"


def one_line_laughs(depth: int) -> str:
    """The same in one flow sequence, as a `--set` value could hold it."""
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, depth)]
    return "[" + ", ".join(levels) + "]"


def test_yaml_whose_aliases_would_expand_past_the_limit_is_refused_before_anything_walks_it(tmp_path):
    from factory.framework.config import YAML_ALIAS_LIMIT, UnsafeYaml, load_yaml

    with pytest.raises(UnsafeYaml, match=r"its aliases expand it by [\d,]+ values \(at most 1,000,000\)"):
        load_yaml(laughs(9) + "plan: {seed: *l8}\n")  # about 430 million strings once expanded
    assert 9**6 < YAML_ALIAS_LIMIT < 9**7
    assert len(load_yaml(laughs(6))["l5"]) == 9  # 9**6 (531,441) once expanded: under the limit
    with pytest.raises(UnsafeYaml, match="aliases expand"):
        load_yaml(laughs(7))
    with pytest.raises(ConfigError, match=r"config file .*config.yaml is refused: its aliases expand it by"):
        load_config(write(tmp_path, laughs(9)))
    with pytest.raises(ConfigError, match=r"--set plan.seed: the value is refused: its aliases expand"):
        load_config(None, [f"plan.seed={one_line_laughs(8)}"])


def test_yaml_anchors_a_config_may_use_are_kept_and_a_self_reference_or_deep_nesting_refused(tmp_path):
    from factory.framework.config import UnsafeYaml, load_yaml

    shared = load_yaml("base: &base {steps: 4, size: 64}\na: *base\nb: {<<: *base, size: 128}\n")
    assert shared["a"] == {"steps": 4, "size": 64} and shared["b"] == {"steps": 4, "size": 128}
    with pytest.raises(UnsafeYaml, match="refers to the list or mapping that holds it"):
        load_yaml("a: &a [1, *a]\n")
    with pytest.raises(UnsafeYaml, match="nested too deeply"):
        load_yaml("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"config file .* is refused: it is nested too deeply"):
        load_config(write(tmp_path, "plan: {seed: " + "[" * 5000 + "]" * 5000 + "}\n"))


def test_an_instruction_bank_of_laughs_is_a_bank_error_naming_the_file(tmp_path):
    from factory.dataset.instructions import BankError, load_bank

    bank = tmp_path / "bank.yaml"
    bank.write_text(laughs(9) + "instructions: {human: [], object: *l8}\n")
    with pytest.raises(BankError, match=r"bank.yaml .*refused: its aliases expand it by"):
        load_bank(bank)


def test_a_number_too_long_for_python_is_named_with_its_file_or_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*config.yaml is refused: Exceeds the limit \(4300 digits\)"):
        load_config(write(tmp_path, "plan: {seed: " + "9" * 5000 + "}\n"))
    with pytest.raises(ConfigError, match=r"plan.seed: .*\(got a number too long to print\)"):
        load_config(None, ["plan.seed=0x" + "f" * 5000])  # YAML reads hex past the limit; only printing it fails


@pytest.mark.parametrize("override, file_text, key", [
    ("filter.thresholds.dino=off", None, "filter.thresholds"),  # YAML's off: a threshold of 0 passes every image
    (None, "filter:\n  thresholds: {clip_t: yes}\n", "filter.thresholds"),
    ("plan.seed=true", None, "plan.seed"),
    ("sid.alphas=[0.5, on]", None, "sid.alphas"),
    ("dialogue.batch_size=yes", None, "dialogue.batch_size"),
])
def test_a_yaml_boolean_where_a_number_belongs_is_refused(tmp_path, override, file_text, key):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, file_text) if file_text else None, [override] if override else [])
    assert f"{key}: a boolean (YAML reads yes/no/on/off/true/false as one) where a number belongs" in str(caught.value)


def test_booleans_stay_where_they_belong():
    config = load_config(None, ["dialogue.constrained=false", "filter.clip_quick_gelu=true",
                                "generate.generators.profusion.options.finetune_steps=1"])
    assert config.dialogue.constrained is False and config.filter.clip_quick_gelu is True


SECRET = "s3cr3t-0123456789"


@pytest.mark.parametrize("settings, key, held", [
    (["dialogue.engine=openai", f"dialogue.endpoint_url=https://svc:{SECRET}@llm.internal/v1"],
     "dialogue.endpoint_url", "a user name or password"),
    (["dialogue.engine=openai", f"dialogue.endpoint_url=https://llm.internal/v1?api-version=2&api_key={SECRET}"],
     "dialogue.endpoint_url", "the parameter(s) api_key"),
    ([f"storage.endpoint_url=http://minio:{SECRET}@127.0.0.1:9000"], "storage.endpoint_url", "a user name or password"),
    ([f"storage.root=s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/prefix"], "storage.root", "a user name or password"),
    ([f"ray.address=http://admin:{SECRET}@head:8265"], "ray.address", "a user name or password"),
    ([f"storage.endpoint_url=http://127.0.0.1:9/?pwd={SECRET}"], "storage.endpoint_url", "the parameter(s) pwd"),
    (["dialogue.engine=openai", f"dialogue.endpoint_url=https://llm/v1#access_token={SECRET}"],
     "dialogue.endpoint_url", "the parameter(s) access_token"),
    (["dialogue.engine=openai", f"dialogue.endpoint_url=https://llm/v1?a=1;token={SECRET}"],
     "dialogue.endpoint_url", "the parameter(s) token"),
    (["dialogue.engine=openai", f"dialogue.endpoint_url=svc:{SECRET}@llm:8000/v1"],
     "dialogue.endpoint_url", "a user name or password"),
    (["dialogue.engine=openai", f"dialogue.endpoint_url=https:svc:{SECRET}@llm/v1"],
     "dialogue.endpoint_url", "a user name or password"),
])
def test_a_url_with_credentials_is_refused_without_repeating_them(settings, key, held):
    """URLs in the config go into every manifest, unit footer and refusal message."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, settings)
    assert f"{key}: a URL with {held}, which would be written into manifests and logs" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_plain_query_and_an_env_var_name_are_taken_but_a_key_in_api_key_env_is_refused_unrepeated():
    config = load_config(None, ["dialogue.engine=openai", "dialogue.endpoint_url=https://llm/v1?api-version=2",
                                "dialogue.api_key_env=LLM_KEY_2"])
    assert config.dialogue.api_key_env == "LLM_KEY_2"
    for key in [f"sk-proj-{SECRET}", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123"]:
        with pytest.raises(ConfigError) as caught:
            load_config(None, [f"dialogue.api_key_env={key}"])
        assert "dialogue.api_key_env: is not the name of an environment variable" in str(caught.value)
        assert key not in str(caught.value)
    local = load_config(None, ["storage.root=/srv/data@night/factory", "ray.address=ray://head:10001"])
    assert (local.storage.root, local.ray.address) == ("/srv/data@night/factory", "ray://head:10001")


def test_a_token_in_any_setting_is_refused_naming_the_setting_not_the_token():
    token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123"
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"references.sources=[{{kind: folder, path: /data/{token}}}]"])
    assert "references.sources.0.path holds what looks like a key or token" in str(caught.value)
    assert token not in str(caught.value)
