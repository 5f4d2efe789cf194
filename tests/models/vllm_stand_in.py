"""A stand-in for the parts of vLLM that models/llm_vllm.py calls, with the signatures copied from
vLLM 0.29.0's source (the version the `vllm` extra pins): `LLM.__init__` and `LLM.chat` from
vllm/entrypoints/llm.py, `SamplingParams` and `StructuredOutputsParams` from vllm/sampling_params.py,
and the fields of `EngineArgs` (vllm/engine/arg_utils.py), where `LLM(**kwargs)` sends what its own
signature does not name. Defaults are vLLM's, types are left out. A keyword vLLM 0.29.0 does not
take raises TypeError here as it does there. When the pin moves, copy these again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERSION = "0.29.0"  # the vLLM release these signatures are copied from

ENGINE_ARGS = frozenset({
    "model", "enable_return_routed_experts", "return_sampling_mask", "model_weights", "served_model_name",
    "tokenizer", "hf_config_path", "runner", "convert", "skip_tokenizer_init", "enable_prompt_embeds",
    "tokenizer_mode", "trust_remote_code", "allowed_local_media_path", "allowed_media_domains", "download_dir",
    "safetensors_load_strategy", "safetensors_prefetch_num_threads", "safetensors_prefetch_block_size",
    "load_format", "config_format", "dtype", "kv_cache_dtype", "seed", "max_model_len", "cudagraph_capture_sizes",
    "max_cudagraph_capture_size", "ir_op_priority", "distributed_executor_backend", "pipeline_parallel_size",
    "master_addr", "master_port", "nnodes", "node_rank", "distributed_timeout_seconds",
    "cpu_distributed_timeout_seconds", "numa_bind", "numa_bind_nodes", "numa_bind_cpus", "device_ids",
    "tensor_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size", "dcp_comm_backend",
    "dcp_q_replicate", "dcp_kv_cache_interleave_size", "cp_kv_cache_interleave_size", "data_parallel_size",
    "data_parallel_rank", "data_parallel_start_rank", "data_parallel_size_local", "data_parallel_address",
    "data_parallel_rpc_port", "data_parallel_hybrid_lb", "data_parallel_external_lb",
    "data_parallel_multi_port_external_lb", "data_parallel_backend", "enable_expert_parallel",
    "enable_batch_sharded_sampling", "enable_ep_weight_filter", "moe_backend", "linear_backend", "all2all_backend",
    "enable_elastic_ep", "enable_dbo", "ubatch_size", "dbo_decode_token_threshold", "dbo_prefill_token_threshold",
    "disable_nccl_for_dp_synchronization", "eplb_config", "enable_eplb", "expert_placement_strategy",
    "max_parallel_loading_workers", "block_size", "enable_prefix_caching", "prefix_caching_hash_algo",
    "prefix_cache_retention_interval", "disable_sliding_window", "disable_cascade_attn", "offload_backend",
    "cpu_offload_gb", "cpu_offload_params", "offload_group_size", "offload_num_in_group", "offload_prefetch_step",
    "offload_params", "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_batched_tokens",
    "max_num_scheduled_tokens", "long_prefill_token_threshold", "max_num_seqs", "max_num_queued_reqs",
    "max_num_queued_tokens", "max_logprobs", "logprobs_mode", "use_fp64_gumbel", "enable_trace_replay",
    "disable_log_stats", "aggregate_engine_logging", "revision", "code_revision", "hf_token", "hf_overrides",
    "model_class_overrides", "tokenizer_revision", "quantization", "quantization_config",
    "allow_deprecated_quantization", "enforce_eager", "disable_custom_all_reduce", "language_model_only",
    "limit_mm_per_prompt", "enable_mm_embeds", "interleave_mm_strings", "media_io_kwargs", "mm_processor_kwargs",
    "mm_processor_cache_gb", "mm_processor_cache_type", "mm_hasher_algorithm", "mm_shm_cache_max_object_size_mb",
    "mm_encoder_only", "mm_encoder_tp_mode", "mm_encoder_attn_backend", "mm_encoder_attn_dtype",
    "mm_encoder_fp8_scale_path", "mm_encoder_fp8_scale_save_path", "mm_encoder_fp8_scale_save_margin",
    "io_processor_plugin", "renderer_num_workers", "skip_mm_profiling", "video_pruning_rate",
    "video_pruning_method", "mm_tensor_ipc", "mm_processor_device", "mm_ipc_gpu_memory_gb",
    "mm_device_do_normalize", "enable_lora", "max_loras", "max_lora_rank", "default_mm_loras",
    "fully_sharded_loras", "max_cpu_loras", "lora_dtype", "lora_target_modules", "enable_tower_connector_lora",
    "specialize_active_lora", "enable_mixed_moe_lora_format", "enable_moe_shared_loras", "ray_workers_use_nsight",
    "num_gpu_blocks_override", "model_loader_extra_config", "ignore_patterns", "enable_chunked_prefill",
    "disable_chunked_mm_input", "scheduler_reserve_full_isl", "prefill_schedule_interval", "watermark",
    "disable_hybrid_kv_cache_manager", "structured_outputs_config", "reasoning_parser", "reasoning_parser_plugin",
    "speculative_config", "spec_method", "spec_model", "spec_tokens", "diffusion_config",
    "show_hidden_metrics_for_version", "otlp_traces_endpoint", "collect_detailed_traces",
    "per_request_spec_decode_metrics", "kv_cache_metrics", "kv_cache_metrics_sample", "cudagraph_metrics",
    "enable_layerwise_nvtx_tracing", "enable_mfu_metrics", "enable_logging_iteration_details", "jit_monitor_mode",
    "jit_monitor_verbose", "enable_mm_processor_stats", "scheduling_policy", "scheduler_cls", "pooler_config",
    "compilation_config", "attention_config", "mamba_config", "kernel_config", "enable_flashinfer_autotune",
    "enable_bf16x3_router_gemm", "worker_cls", "worker_extension_cls", "profiler_config", "kv_transfer_config",
    "kv_events_config", "ec_transfer_config", "ec_manager_config", "reasoning_config", "generation_config",
    "enable_sleep_mode", "enable_cumem_allocator", "override_generation_config", "model_impl", "attention_backend",
    "kv_cache_dtype_skip_layers", "mamba_cache_dtype", "mamba_ssm_cache_dtype", "mamba_block_size",
    "prefix_match_unit", "mamba_cache_mode", "replayssm_buffer_len", "use_replayssm", "mamba_backend",
    "mamba_ssu_algorithm", "enable_mamba_cache_stochastic_rounding", "mamba_cache_philox_rounds",
    "additional_config", "use_tqdm_on_load", "pt_load_map_location", "logits_processors", "async_scheduling",
    "stream_interval", "kv_sharing_fast_prefill", "optimization_level", "performance_mode",
    "fault_tolerance_config", "enable_fault_tolerance", "kv_offloading_size", "kv_offloading_backend",
    "tokens_only", "shutdown_timeout", "weight_transfer_config", "fail_on_environ_validation",
    "gdn_prefill_backend", "kda_prefill_backend"
})


@dataclass
class CompletionOutput:
    text: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


@dataclass
class StructuredOutputsParams:  # a dataclass in vLLM 0.29.0, not keyword-only
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


@dataclass(kw_only=True)
class SamplingParams:  # a msgspec.Struct in vLLM 0.29.0; its public fields, in order
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: Any = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: Any = None
    stream_interval: int | None = None
    skip_clone: bool = False
    output_text_buffer_length: int = 0
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    repetition_detection: Any = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: list[int] | None = None


@dataclass
class Recorded:
    """What the adapter handed the stand-in."""

    init: dict[str, Any] = field(default_factory=dict)
    chats: list[tuple[list, list]] = field(default_factory=list)


class LLM:
    recorded = Recorded()

    def __init__(
        self,
        model,
        *,
        runner="auto",
        convert="auto",
        tokenizer=None,
        tokenizer_mode="auto",
        skip_tokenizer_init=False,
        trust_remote_code=False,
        allowed_local_media_path="",
        allowed_media_domains=None,
        tensor_parallel_size=1,
        dtype="auto",
        quantization=None,
        revision=None,
        tokenizer_revision=None,
        chat_template=None,
        seed=0,
        gpu_memory_utilization=0.92,
        cpu_offload_gb=0,
        offload_group_size=0,
        offload_num_in_group=1,
        offload_prefetch_step=1,
        offload_params=None,
        enforce_eager=False,
        enable_return_routed_experts=False,
        return_sampling_mask=False,
        disable_custom_all_reduce=False,
        hf_token=None,
        hf_overrides=None,
        mm_processor_kwargs=None,
        pooler_config=None,
        structured_outputs_config=None,
        profiler_config=None,
        attention_config=None,
        kv_cache_memory_bytes=None,
        compilation_config=None,
        quantization_config=None,
        logits_processors=None,
        spec_method=None,
        spec_model=None,
        spec_tokens=None,
        **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - ENGINE_ARGS)
        if unknown:  # vLLM passes **kwargs on to EngineArgs(...), which refuses them
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        named = dict(locals())
        for own in ("self", "kwargs", "unknown"):
            named.pop(own)
        LLM.recorded.init = {**named, **kwargs}

    def chat(
        self,
        messages,
        sampling_params=None,
        use_tqdm=True,
        lora_request=None,
        chat_template=None,
        chat_template_content_format="auto",
        add_generation_prompt=True,
        continue_final_message=False,
        tools=None,
        chat_template_kwargs=None,
        tokenization_kwargs=None,
        mm_processor_kwargs=None,
    ) -> list[RequestOutput]:
        LLM.recorded.chats.append((messages, sampling_params))
        return [RequestOutput([CompletionOutput(f"text {n}")]) for n in range(len(messages))]
