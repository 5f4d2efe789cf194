"""Typed configuration: YAML in, validated pydantic models out.

Every section is a strict model: an unknown key, a wrong type or a missing required
field is an error that names the key path. `--set a.b=c` overrides are applied to the
raw mapping before validation, so they are checked the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from factory.framework.layout import check_name
from filters.rules import PAPER_THRESHOLDS

# The environment of processes that load models: no library progress bars, no deprecation chatter
# (Ray forwards every worker's output to the driver, which prints one line per stage of its own).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}

class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    # every float finite: NaN passes no `ge`/`le` bound by itself and is not valid JSON in a manifest
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic takes True as 1 and False as 0, and YAML reads yes/no/on/off as booleans:
        `dino: off` would be a threshold of 0."""
        if contains_bool(value) and numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean (YAML reads yes/no/on/off/true/false as one) where a number belongs")
        return value


def numbers_only(annotation: Any) -> bool:
    """Whether a field's type holds ints or floats (in containers too) and nothing a boolean could be."""
    leaves = leaf_types(annotation)
    open_ended = any(leaf in (bool, Any, object) or (isinstance(leaf, type) and issubclass(leaf, BaseModel))
                     for leaf in leaves)
    return bool(leaves & {int, float}) and not open_ended


def leaf_types(annotation: Any) -> set[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return leaf_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, set, frozenset, dict):
        return {leaf for arg in get_args(annotation) if arg is not Ellipsis for leaf in leaf_types(arg)}
    return {annotation}


def contains_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(contains_bool(item) for item in value.values())
    return isinstance(value, (list, tuple)) and any(contains_bool(item) for item in value)


SECRET_QUERY_NAME = re.compile(r"key|token|secret|pass|pwd|sig|auth|cred|session|jwt|bearer", re.I)
# AWS key ids, Hugging Face, GitHub, OpenAI-style and Slack tokens
SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{20,}"
                          r"|\b(ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}|\bsk-[A-Za-z0-9_-]{20,}"
                          r"|\bxox[abpr]-[A-Za-z0-9-]{10,}")


def credentials_in_url(url: str) -> str | None:
    """What in `url` looks like a credential (a user name or password, a query or fragment parameter
    named like a key, a token-shaped value), or None; never the value itself."""
    parts = urlsplit(url)
    parameters = [name for text in (parts.query, parts.fragment) for item in re.split(r"[&;]", text)
                  for name, _ in parse_qsl(item, keep_blank_values=True)]
    secret_names = sorted({name for name in parameters if SECRET_QUERY_NAME.search(name)})
    if secret_names:
        return f"the parameter(s) {', '.join(secret_names)}"
    authority = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", url).split("/")[0]  # also of `user:pass@host`, `https:u:p@h`
    if parts.username is not None or parts.password is not None or "@" in authority:
        return "a user name or password"
    if SECRET_VALUE.search(url):
        return "a token"
    return None


def no_credentials(url: str | None) -> str | None:
    """A URL goes into manifests, unit footers and logs: it may not carry a credential (the value is
    never repeated in the error)."""
    held = None if url is None else credentials_in_url(url)
    if held:
        raise ValueError(f"a URL with {held}, which would be written into manifests and logs: "
                         "credentials come from the environment")
    return url


def secret_settings(node: Any, where: str = "") -> list[str]:
    """The dotted keys of `node` (a config snapshot) whose string value holds a token-shaped secret."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in secret_settings(value, f"{where}.{name}".lstrip("."))]
    if isinstance(node, list):
        return [key for index, value in enumerate(node) for key in secret_settings(value, f"{where}.{index}")]
    return [where] if isinstance(node, str) and SECRET_VALUE.search(node) else []


# A URL kept in the config (so in manifests and unit footers): no credentials in it.
PlainUrl = Annotated[str, AfterValidator(no_credentials)]
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_name(name: str | None) -> str | None:
    if name is not None and (not ENV_NAME.fullmatch(name) or SECRET_VALUE.search(name)):
        raise ValueError("is not the name of an environment variable (name the variable that holds the key, "
                         "never the key itself)")
    return name


# A name that becomes part of a storage key: the one rule of factory.framework.layout.check_name.
Name = Annotated[str, AfterValidator(check_name)]
# Seeds go to numpy, torch and vLLM; every one of them takes [0, 2**32).
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# A filter threshold: a cosine similarity, so finite and in [-1, 1].
Threshold = Annotated[float, Field(ge=-1.0, le=1.0)]
# Custom Ray resources (per actor or worker): Ray refuses negative amounts.
RayResources = dict[str, Annotated[float, Field(ge=0)]]


# --- storage -------------------------------------------------------------------------


class StorageConfig(Section):
    root: PlainUrl = "./factory-data"

    @field_validator("root")
    @classmethod
    def _absolute_local_root(cls, root: str) -> str:
        if not root.strip():  # an unset variable in `--set storage.root=$ROOT`: not the job's working folder
            raise ValueError("the storage root is empty: name a folder or an s3://bucket/prefix")
        # Ray workers (Ray Train especially) run in other folders: a local root must be absolute
        return root if "://" in root else os.path.abspath(os.path.expanduser(root))

    endpoint_url: PlainUrl | None = None
    region: str | None = None
    multipart_threshold_mb: int = Field(64, ge=5)
    multipart_chunk_mb: int = Field(16, ge=5)
    max_attempts: int = Field(8, ge=1, description="botocore retry budget per S3 call")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)


def memory_field(what: str) -> Any:
    """Bytes of RAM Ray reserves per actor, task or worker (Ray's `memory` resource): what one uses at
    its peak, so Ray never places more on a node than its memory holds. 0 reserves none."""
    return Field(0, ge=0, description=f"bytes of RAM Ray reserves per {what}, its peak use; 0 reserves none")


# --- stages --------------------------------------------------------------------------


class ActorPool(Section):
    """How a model stage is spread over the cluster (Ray Data actor pool)."""

    concurrency: int = Field(1, ge=1, description="number of actors")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a card")
    num_cpus: float = Field(1.0, gt=0)
    resources: RayResources = Field(
        default_factory=dict,
        description="custom Ray resources per actor, e.g. {a100_40g: 1}: pins the pool to a node type of cluster.yaml",
    )
    memory: int = memory_field("actor")
    batch_size: int = Field(16, ge=1, description="candidates per model forward pass")

    def ray_options(self) -> dict[str, Any]:
        """What each actor of the pool asks Ray for."""
        options: dict[str, Any] = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        if self.memory:
            options["memory"] = self.memory
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class ReferenceSource(Section):
    """One place references come from. `path`: a folder, `s3://bucket/prefix`, or tar shards
    (a glob and/or `{000..009}` braces). With `subject` unset the subject comes from the
    first subfolder (folder, s3) or the sample's .json/.cls/.txt (webdataset), else 'person'
    for the human domain."""

    kind: Literal["folder", "s3", "webdataset", "generated"]
    path: str | None = None
    subject: str | None = Field(None, description="subject class, e.g. 'dog' or 'person'")
    domain: Literal["human", "object"] = "object"
    prompts: list[str] = Field(
        default_factory=list, description="kind=generated: class names, each drawn with references.sd_prompt"
    )
    per_prompt: int = Field(1, ge=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _needs_input(self) -> ReferenceSource:
        if self.kind == "generated" and not self.prompts:
            raise ValueError("a 'generated' source needs a non-empty 'prompts' list")
        if self.kind != "generated" and not self.path:
            raise ValueError(f"a '{self.kind}' source needs 'path'")
        if self.kind == "s3" and not self.path.startswith("s3://"):
            raise ValueError("an 's3' source needs a path like 's3://bucket/prefix'")
        return self


class ReferencesConfig(ActorPool):
    """Reference ingest. The ActorPool fields size the Stable Diffusion pool for generated
    references: with num_gpus > 0, concurrency > 1 or resources it runs as Ray actors, else on the driver."""

    set: Name = "demo"
    sources: list[ReferenceSource] = Field(default_factory=list)
    max_pixels: int = Field(40_000_000, ge=1, description="refuse larger images before decoding")
    max_file_mb: float = Field(64, gt=0, description="refuse larger files before decoding")
    min_side: int = Field(32, ge=1)
    min_pixel_std: float = Field(2.0, ge=0, description="flatter images are 'degenerate_image'")
    store_size: int = Field(512, ge=8, description="longest side of the stored reference")
    jpeg_quality: int = Field(95, ge=50, le=100)
    part_size: int = Field(256, ge=1, description="references per part file")
    io_threads: int = Field(8, ge=1, description="threads reading and decoding images")
    sd_model: str = Field(
        "stabilityai/stable-diffusion-2-base", description="Stable Diffusion pipeline for generated references"
    )
    sd_prompt: str = Field("a photo of a {subject}", description="prompt for generated references")
    sd_steps: int = Field(30, ge=1)
    sd_size: int = Field(512, ge=8)
    sd_guidance_scale: float = Field(7.5, ge=0)

    @model_validator(mode="after")
    def _one_subject_slot(self) -> ReferencesConfig:
        if self.sd_prompt.count("{subject}") != 1:
            raise ValueError("'sd_prompt' must contain '{subject}' exactly once")
        if self.sd_size % 8:
            raise ValueError("'sd_size' must be a multiple of 8 (the VAE's downsampling)")
        return self

    def drawn_on_actors(self) -> bool:
        """Whether generated references are drawn by a Ray actor pool (else on the driver)."""
        return self.num_gpus > 0 or self.concurrency > 1 or bool(self.resources)


class PlanConfig(Section):
    instructions: str | None = Field(None, description="instruction bank YAML; default: the shipped bank")
    jobs_per_reference: int | None = Field(4, ge=1)
    total_jobs: int | None = Field(None, ge=1)
    unit_size: int = Field(16, ge=1, description="jobs per work unit")
    generator: str = "profusion"
    seed: Seed = 0
    executor: Literal["local", "ray"] = Field(
        "local", description="local: plan and SID-round partitions drawn one after another in this process; "
                             "ray: a Ray task each (SID's retrieval on the filter's actor pool)")

    @model_validator(mode="after")
    def _one_count(self) -> PlanConfig:
        if self.total_jobs is not None:
            self.__dict__["jobs_per_reference"] = None
        if self.jobs_per_reference is None and self.total_jobs is None:
            raise ValueError("set either 'jobs_per_reference' or 'total_jobs'")
        return self


class GeneratorSpec(Section):
    """A named generator: `kind` picks the implementation, the rest is its settings."""

    kind: Literal["profusion", "cafe", "ip_adapter"]
    model: str = Field(..., description="base pipeline path or hub id")
    checkpoint: str | None = Field(None, description="extra weights (PromptNet, trained G)")
    image_size: int = Field(512, ge=8)
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="implementation-specific")


class GenerateConfig(ActorPool):
    generators: dict[str, GeneratorSpec] = Field(default_factory=dict)
    batch_size: int = Field(4, ge=1, description="jobs a generator samples together; a generator's "
                                                 "options.batch_size wins")
    jpeg_quality: int = Field(95, ge=50, le=100)


FILTER_THRESHOLDS = PAPER_THRESHOLDS  # the paper's filter (section 3.2); the rules are filters.rules


class FilterConfig(ActorPool):
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag or checkpoint path; null: random weights (benchmarks)"
    )
    clip_model_config: str | None = Field(
        None, description="open_clip model config JSON (file or folder) to register, for a model not built in"
    )
    clip_quick_gelu: bool | None = Field(
        None,
        description="null: follow the pretrained tag (OpenAI weights need QuickGELU); "
        "true for a local OpenAI checkpoint",
    )
    dino_model: str = "facebook/dino-vits16"
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: dict(FILTER_THRESHOLDS),
        description="rule -> minimum score (>=); unset rules keep the default",
    )
    max_pixels: int = Field(40_000_000, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _known_rules(self) -> FilterConfig:
        unknown = set(self.thresholds) - set(FILTER_THRESHOLDS)
        if unknown:
            raise ValueError(f"unknown threshold rule(s) {sorted(unknown)}; rules are {sorted(FILTER_THRESHOLDS)}")
        self.__dict__["thresholds"] = {**FILTER_THRESHOLDS, **self.thresholds}
        return self


class DialogueConfig(ActorPool):
    """The chat LLM that drafts (user, assistant) text for accepted candidates (paper 3.2).

    Defaults are the paper's setup: Llama-2-70B-chat on vLLM, tensor-parallel over 4 GPUs of
    one node (one actor holds the whole TP group, so `num_gpus >= tensor_parallel_size`).
    """

    engine: Literal["transformers", "vllm", "openai"] = "vllm"
    model: str = Field(
        "meta-llama/Llama-2-70b-chat-hf", description="hub id or local path (served model name for openai)"
    )
    prompt_file: str | None = Field(
        None, description="prompt YAML (system, user, styles), a path or builtin:PACKAGE/FILE.yaml (shipped in a "
                          "package); default: stages/dialogue_prompt.yaml"
    )
    styles: dict[str, float] = Field(
        default_factory=lambda: {"command": 0.4, "question": 0.3, "ambiguous": 0.3},
        description="share of each user-text style; each needs a description in the prompt file",
    )
    max_attempts: int = Field(3, ge=1, description="tries per sample, each with a new seed")
    constrained: bool = Field(True, description="JSON-schema constrained decoding")
    temperature: float = Field(0.8, ge=0, le=2, description="vLLM and OpenAI-style servers take [0, 2]")
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=8)
    seed: Seed = 0
    min_user_chars: int = Field(3, ge=2)
    max_user_chars: int = Field(400, ge=2)
    min_assistant_chars: int = Field(10, ge=2)
    max_assistant_chars: int = Field(1200, ge=2)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    num_gpus: float = Field(4.0, ge=0, description="GPUs per actor; default: tensor_parallel_size for vllm, else 0")
    batch_size: int = Field(64, ge=1, description="prompts per engine call")
    # vllm
    tensor_parallel_size: int = Field(4, ge=1)
    max_model_len: int | None = Field(None, ge=64, description="vllm context length; default: the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    # openai (any OpenAI-compatible /v1/chat/completions server, e.g. `vllm serve`)
    endpoint_url: PlainUrl | None = Field(None, description="base URL, e.g. http://llm:8000/v1 (no credentials)")
    api_key_env: Annotated[str | None, AfterValidator(env_name)] = Field(
        "OPENAI_API_KEY", description="env var holding the API key (never the key itself)")
    request_timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(16, ge=1, description="requests in flight per actor")
    max_retries: int = Field(4, ge=0, description="retries on 429, 5xx, timeouts and connection errors")
    retry_backoff_s: float = Field(1.0, ge=0, description="first backoff; doubles per retry")
    structured_output: Literal["response_format", "structured_outputs", "guided_json", "none"] = Field(
        "response_format", description="request field that carries the JSON schema"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_gpus(cls, data: Any) -> Any:
        """Unset num_gpus: the whole TP group for vllm, none for the other engines."""
        if isinstance(data, dict) and "num_gpus" not in data:
            vllm = data.get("engine", "vllm") == "vllm"
            data = {**data, "num_gpus": data.get("tensor_parallel_size", 4) if vllm else 0}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DialogueConfig:
        if not self.styles or any(share < 0 for share in self.styles.values()) or sum(self.styles.values()) <= 0:
            raise ValueError("'styles' needs non-negative shares with a positive sum")
        if self.min_user_chars > self.max_user_chars or self.min_assistant_chars > self.max_assistant_chars:
            raise ValueError("a min_*_chars bound is above its max_*_chars")
        if self.engine == "openai" and not self.endpoint_url:
            raise ValueError("engine 'openai' needs 'endpoint_url'")
        if self.engine == "vllm" and self.num_gpus < self.tensor_parallel_size:
            raise ValueError("engine 'vllm' needs num_gpus >= tensor_parallel_size (one actor holds the TP group)")
        return self


class PublishConfig(Section):
    version: Name | None = Field(None, description="version name; default: the run id")
    shard_max_bytes: int = Field(256 * 2**20, ge=1024)
    shard_max_samples: int = Field(10_000, ge=1)
    allow_partial: bool = Field(
        False, description="publish a run whose plan has units without output (--allow-partial)")
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray workers build and upload shards; local: this process, one shard at a time")
    task_memory: int = memory_field("publish task")
    license: str = Field("other", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$",
                         description="the dataset card's license field (a Hugging Face license id)")


class TrainWorkers(Section):
    """Where a Ray Train run's workers go: how many, on GPUs or not, what each asks the cluster for,
    and how many restarts (each resumes from the run's last save)."""

    num_workers: int = Field(8, ge=1, description="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = True
    resources_per_worker: RayResources = Field(
        default_factory=dict, description="custom Ray resources per worker, e.g. {a100_80g: 1}: a node type"
    )
    memory_per_worker: int = memory_field("worker")
    max_failures: int = Field(3, ge=0, description="Ray Train restarts; each resumes from the run's last save")


class TrainConfig(TrainWorkers):
    """Training G or the assistant heads on a published version (paper sections 3.1, 4.1)."""

    version: Name | None = Field(
        None, description="dataset version to train on; default: the newest that is not a SID round's (its union is)")
    model: Literal["generator", "assistant"] = "generator"
    base_model: str = Field("stabilityai/stable-diffusion-2-base", description="SD folder with unet/, vae/, scheduler/")
    clip_model: str = Field("openai/clip-vit-large-patch14-336", description="F: CLIP image embedding")
    dino_model: str = Field("facebook/dinov2-giant", description="E: DINOv2 patch features")
    llm_model: str = Field("meta-llama/Llama-2-13b-chat-hf", description="the assistant's frozen chat LLM")
    init_from: str | None = Field(None, description="start from this saved G / assistant folder instead of new layers")
    generator_lr: float = Field(2e-5, gt=0)
    generator_batch_size: int = Field(64, ge=1, description="global batch, split over workers")
    generator_trainable: Literal["all", "new_layers"] = Field(
        "all", description="all: UNet and new layers; new_layers: projections and DINO key/value only"
    )
    condition_dropout: float = Field(0.1, ge=0, le=1, description="drop CLIP and DINO independently, for CFG")
    image_size: int | None = Field(None, ge=8, description="training resolution; default: the UNet's native size")
    assistant_lr: float = Field(2e-3, gt=0)
    assistant_batch_size: int = Field(128, ge=1, description="global batch, split over workers")
    clip_loss_weight: float = Field(0.2, ge=0, description="lambda of equation 2")
    max_text_tokens: int = Field(256, ge=8, description="prompt and answer are each cut to this many tokens")
    epochs: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in all")
    weight_decay: float = Field(0.01, ge=0)
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    keep_steps: int = Field(2, ge=0, description="checkpoints a run keeps, newest first: an older step folder "
                            "(a G step with its optimizer state is ~10 GB) is deleted once a newer one is complete; "
                            "0: keep every one")
    resume: bool = Field(True, description="continue from checkpoints/<model>/<run-id>/latest.json when present")
    seed: Seed = 0
    log_sample_keys: bool = Field(False, description="write the keys each worker trained on, per epoch")


class SidConfig(Section):
    """Self-improvement via distillation: x~ = G(E(x), a*F(w) + (1-a)*F(x)), filtered, drafted, published."""

    rounds: int = Field(1, ge=1)
    parent: Name | None = Field(None, description="version G was trained on; default: the newest bootstrap or union")
    generator: str = Field("cafe", description="name under generate.generators (kind cafe)")
    checkpoint: str | None = Field(None, description="G checkpoint folder; default: the newest trained one")
    jobs_per_reference: int = Field(2, ge=1)
    max_references: int | None = Field(None, ge=1)
    unit_size: int = Field(16, ge=1)
    seed: Seed = 0
    alphas: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7], min_length=1)
    alpha_mode: Literal["random", "sweep"] = Field("random", description="sweep: every job at every alpha")
    w_source: Literal["retrieve", "generate"] = "retrieve"
    pool: Name | None = Field(None, description="image pool name; default: built from the parent's target images")
    w_top_k: int = Field(8, ge=1, description="retrieved w: a seeded pick among the k nearest eligible pool images")
    rarity_power: float = Field(1.0, ge=0, description="weight instructions by (1 + category count in parent)^-power")
    finetune: bool = Field(True, description="fine-tune G on the union to start the next round")
    finetune_assistant: bool = Field(
        False, description="fine-tune the assistant heads on the union too (paper 4.1; needs train.llm_model)"
    )
    assistant_checkpoint: str | None = Field(
        None, description="assistant folder the first round starts from; default: the newest trained one"
    )

    @model_validator(mode="after")
    def _alphas_in_unit_interval(self) -> SidConfig:
        bad = [alpha for alpha in self.alphas if not 0.0 <= alpha <= 1.0]
        if bad:
            raise ValueError(f"alphas must lie in [0, 1], got {bad}")
        return self


# eval seeds: eval.seed + IMAGES_PER_PROMPT * (PROMPTS_PER_PAIR * pair + prompt) + image, none repeated
PROMPTS_PER_PAIR = 100
IMAGES_PER_PROMPT = 1000


class EvalPair(Section):
    """A DreamBench-style subject: one reference image and the prompts to draw it in."""

    reference: str = Field(..., description="image file, or a key under the storage root")
    subject: str = Field(..., description="class word put into the prompts' {subject}")
    prompts: list[str] = Field(..., min_length=1, max_length=PROMPTS_PER_PAIR, description="each prompt of a pair "
                               "has its own seeds: eval.seed + 1000 * (100 * pair + prompt) + image")


class EvalConfig(Section):
    """DreamBench-style DINO, CLIP-I and CLIP-T of a generator checkpoint."""

    checkpoint: str | None = Field(
        None, description="G folder (local or s3://) or storage key; default: the newest under checkpoints/generator/"
    )
    semantic: Literal["assistant", "clip_text"] = Field(
        "assistant", description="how a prompt becomes G's CLIP condition: H(s) of the assistant, or CLIP text"
    )
    assistant_checkpoint: str | None = Field(
        None, description="assistant folder or storage key; default: the newest under checkpoints/assistant/"
    )
    pairs: list[EvalPair] = Field(default_factory=list)
    pairs_file: str | None = Field(None, description="YAML list of pairs (reference, subject, prompts)")
    reference_set: Name | None = Field(
        None,
        description="also evaluate on this stored reference set, each reference with `prompts`' list for its class",
    )
    prompts: str = Field("dreambench", description="prompt lists for reference_set: a shipped name or a YAML file")
    references_per_subject: int | None = Field(None, ge=1, description="first n references of each subject, by id")
    prompts_per_subject: int | None = Field(None, ge=1, description="n prompts spread evenly over the list")
    name: Name | None = Field(
        None, description="the eval set's name in results; default: <prompts>-<set>"
    )
    images_per_pair: int = Field(4, ge=1, le=IMAGES_PER_PROMPT, description="per prompt (at most 1000: see EvalPair)")
    image_size: int = Field(512, ge=8)
    steps: int = Field(50, ge=1)
    clip_guidance_scale: float = Field(7.5, ge=0)
    dino_guidance_scale: float = Field(2.0, ge=0)
    max_new_tokens: int = Field(128, ge=1, description="assistant answer length")
    clip_model: str | None = Field(None, description="CLIP-I / CLIP-T scorer; default: filter.clip_model")
    clip_pretrained: str | None = Field(None, description="default: filter.clip_pretrained")
    clip_model_config: str | None = Field(None, description="default: filter.clip_model_config")
    dino_model: str | None = Field(None, description="DINO scorer; default: filter.dino_model")
    use_gpu: bool = Field(True, description="one GPU per eval actor (Ray waits for, or scales up, a node that has one)")
    seed: Seed = 0
    concurrency: int = Field(
        1, ge=1, description="eval actors, each holding G and the scorers (one GPU each with use_gpu)")
    memory: int = memory_field("actor")
    resources: RayResources = Field(
        default_factory=dict,
        description="custom Ray resources per eval actor, e.g. {a100_40g: 1}: pins the pool to a node type")

    def ray_options(self) -> dict[str, Any]:
        """What each eval actor asks Ray for."""
        options: dict[str, Any] = {"num_gpus": 1.0 if self.use_gpu else 0.0}
        if self.memory:
            options["memory"] = self.memory
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class PromptNetConfig(TrainWorkers):
    """`--stage promptnet`: pre-train ProFusion's PromptNet on a reference set, on Ray Train
    (defaults: ProFusion's train.py, SD2-base, lr 2e-5, batch 8, 80k steps)."""

    require_trained: bool = Field(
        True, description="generate / all refuse to draw with a profusion generator that names no PromptNet "
        "checkpoint (train one with --stage promptnet); false draws from an untrained one (benchmarks)"
    )
    reference_set: Name | None = Field(None, description="default: references.set")
    generator: str = Field("profusion", description="the generate.generators entry (kind profusion) it is for: "
                                                    "its model, image_size and options.image_encoder")
    init_from: str | None = Field(None, description="PromptNet checkpoint to start from; default: the UNet's down path")
    image_encoder: str | None = Field(
        None, description="CLIP vision tower PromptNet reads; default: the generator's options.image_encoder"
    )
    output: str | None = Field(
        None, description="local folder or s3:// prefix; default: <storage root>/checkpoints/promptnet/<run-id>"
    )
    steps: int = Field(80_000, ge=1, description="optimizer steps")
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, ge=1, description="global batch, split over workers")
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    image_size: int | None = Field(None, ge=8, description="default: the generator's image_size")
    prompt: str = Field("a photo of {subject}", description="the S* prompt of the denoising loss")
    min_crop: float = Field(0.7, gt=0, le=1, description="smallest crop side of the augmented views")
    log_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(1000, ge=1, description="steps between progress saves (runs/<run-id>/promptnet/)")
    resume: bool = Field(True, description="continue from the run's latest progress save when there is one")
    seed: Seed = 0


class RayConfig(Section):
    address: PlainUrl | None = Field(None, description="cluster address; default: $RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="for a local cluster only")
    memory: int | None = Field(
        None, ge=1, description="for a local cluster only: Ray's memory resource in bytes; default: Ray's share of "
        "what is free when it starts, which varies on a shared machine")

    def local_cluster(self) -> dict[str, Any]:
        """ray.init's sizes for a local cluster: CPUs, and the memory resource (`_memory`) when set."""
        sizes: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.memory:
            sizes["_memory"] = self.memory
        return sizes


class FactoryConfig(Section):
    dataset: Name = "demo"
    run_id: Name = "demo"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    references: ReferencesConfig = Field(default_factory=ReferencesConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    dialogue: DialogueConfig = Field(default_factory=DialogueConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sid: SidConfig = Field(default_factory=SidConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promptnet: PromptNetConfig = Field(default_factory=PromptNetConfig)

    @model_validator(mode="after")
    def _no_secret_values(self) -> FactoryConfig:
        secret = secret_settings(self.snapshot())
        if secret:
            raise ValueError(f"{', '.join(secret)} holds what looks like a key or token, which would be written "
                             "into manifests and logs: credentials come from the environment")
        return self

    def snapshot(self) -> dict[str, Any]:
        """The resolved config as plain JSON data (what goes into manifests)."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return config_sha256(self.snapshot())


# --- a trained PromptNet ----------------------------------------------------------------


def how_to_train_promptnet(config: FactoryConfig, generator: str) -> str:
    return ("Train one first:\n  python -m factory.run --stage promptnet --config <this config>\n"
            f"It writes promptnet.output (default <storage root>/checkpoints/promptnet/{config.run_id}); then set "
            f"generate.generators.{generator}.checkpoint to that folder (promptnet.require_trained: false "
            "draws from an untrained PromptNet instead).")


def untrained_promptnet(config: FactoryConfig) -> str | None:
    """Why this config's bootstrap would draw from an untrained PromptNet (no checkpoint named), or None."""
    name = config.plan.generator
    spec = config.generate.generators.get(name)
    if not config.promptnet.require_trained or spec is None or spec.kind != "profusion" or spec.checkpoint:
        return None
    return (f"generate.generators.{name} names no PromptNet checkpoint, so the bootstrap would draw from an "
            "untrained PromptNet. " + how_to_train_promptnet(config, name))


def missing_promptnet_hint(config: FactoryConfig, problems: list[str]) -> str:
    """How to train the PromptNet when one of `problems` is the bootstrap generator's missing checkpoint."""
    name = config.plan.generator
    spec = config.generate.generators.get(name)
    key = f"generate.generators.{name}.checkpoint"
    if spec is None or spec.kind != "profusion" or not any(key in problem for problem in problems):
        return ""
    return f"\n{key} is the bootstrap's PromptNet. " + how_to_train_promptnet(config, name)


# --- loading -------------------------------------------------------------------------


def config_sha256(snapshot: dict[str, Any]) -> str:
    canonical = json.dumps(snapshot, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def demo_config_path() -> Path:
    return Path(str(resources.files("factory") / "demo" / "demo.yaml"))


# values that aliases may add to a YAML document: far above any config or bank, far below a
# "billion laughs" (lists of nine aliases, nine deep: about a billion values, which would hang every reader)
YAML_ALIAS_LIMIT = 1_000_000


class UnsafeYaml(yaml.YAMLError):
    """YAML refused before anything reads it: aliases that expand it past `YAML_ALIAS_LIMIT`
    values, an alias to itself, or nesting too deep to read."""


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing what would hang or crash whoever walks the result (`UnsafeYaml`)."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UnsafeYaml("it is nested too deeply") from None
    except ValueError as err:  # a scalar Python cannot build: an int past sys.get_int_max_str_digits, 2026-13-45
        raise UnsafeYaml(str(err).split(";")[0]) from None
    added = alias_expansion(data)
    if added > YAML_ALIAS_LIMIT:
        raise UnsafeYaml(f"its aliases expand it by {added:,} values (at most {YAML_ALIAS_LIMIT:,})")
    return data


def alias_expansion(data: Any) -> int:
    """How many more values `data` holds when every shared list or mapping is counted each time it
    appears (what walking it costs) than when counted once (what the file spells). Iterative, so a
    deep document cannot overflow the stack; an alias to itself is `UnsafeYaml`."""
    def children(node: Any) -> list[Any] | None:
        if isinstance(node, dict):
            return [*node.keys(), *node.values()]
        return node if isinstance(node, list) else None

    expanded: dict[int, int] = {}  # id of a finished list or mapping -> values under it, aliases expanded
    entered: set[int] = set()
    spelled = 1
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, finished = stack.pop()
        below = children(node)
        if below is None:
            continue
        if finished:
            expanded[id(node)] = 1 + sum(expanded.get(id(child), 1) for child in below)
            continue
        if id(node) in expanded:
            continue
        if id(node) in entered:
            raise UnsafeYaml("an alias refers to the list or mapping that holds it")
        entered.add(id(node))
        spelled += len(below)
        stack.append((node, True))
        stack.extend((child, False) for child in below)
    return expanded.get(id(data), 1) - spelled


def read_yaml_file(source: Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The YAML in `source`; a missing, unreadable, malformed or unsafe file is `error`, naming it as `what`."""
    try:
        return load_yaml(source.read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {source}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {source} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except UnsafeYaml as err:
        raise error(f"{what} {source} is refused: {err}") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {source} is not valid YAML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FactoryConfig:
    """Load a YAML config (the embedded demo when `path` is None) and apply `k=v` overrides."""
    source = Path(path) if path else demo_config_path()
    raw = read_yaml_file(source, "config file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {source} must hold a mapping at the top level")
    for override in overrides or []:
        apply_override(raw, override)
    return validate_config(resolve_relative_paths(raw), origin=str(source))


NAME_KEYS = frozenset({"dataset", "run_id", "version", "parent", "pool", "set", "reference_set", "name"})


def resolve_relative_paths(node: Any) -> Any:
    """Make every `./` or `../` path absolute (against the current folder), so the config
    means the same in Ray workers, which run in folders of their own. Names (`NAME_KEYS`) are
    never paths: they are left as written, so the name rule refuses them as the user wrote them."""
    if isinstance(node, dict):
        return {key: value if key in NAME_KEYS else resolve_relative_paths(value) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_relative_paths(value) for value in node]
    if isinstance(node, str) and node.startswith(("./", "../")):
        return os.path.abspath(node)
    return node


def validate_config(raw: dict[str, Any], origin: str = "config") -> FactoryConfig:
    try:
        return FactoryConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid {origin}:\n" + describe_errors(err)) from None


def describe_errors(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required field is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            if "input" in problem and problem["type"] not in ("value_error",):
                message += f" (got {shown(problem['input'])})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def shown(value: Any) -> str:
    try:
        return shorten(repr(value))
    except ValueError:  # a hex int too long to write in decimal
        return "a number too long to print"


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`1`, `true`, `[a, b]`)."""
    if "=" not in override:
        raise ConfigError(f"--set expects key=value, got {override!r}")
    dotted, value_text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set has an empty key segment in {dotted!r}")
    try:
        value = load_yaml(value_text) if value_text else ""
    except UnsafeYaml as err:
        raise ConfigError(f"--set {dotted.strip()}: the value is refused: {err}") from None
    except yaml.YAMLError:
        value = value_text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value
