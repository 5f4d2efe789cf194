"""The `transformers` engine: AutoModelForCausalLM + the tokenizer's chat template, batched,
with JSON-schema constrained decoding through llguidance (one of the grammar backends vLLM's
structured outputs use), so even a tiny random model emits schema-valid JSON.

A manual decode loop (KV cache, left padding) rather than `model.generate`, for two reasons:
every prompt samples from its own seeded `torch.Generator` (a retry with a new seed is a new
draw, the same seed is the same draw), and each prompt's llguidance matcher masks its logits
and consumes its sampled token at every step.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factory.framework.models_cache import local_model, model_ref
from models.base import half_dtype
from models.llm import BatchEngine, Conversation, EngineError, sampling_settings

if TYPE_CHECKING:
    from factory.framework.config import DialogueConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TransformersEngine(BatchEngine):
    name = "transformers"

    def __init__(self, config: DialogueConfig, device: str | None = None, storage: Any = None):
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = local_model(config.model, storage, "dialogue.model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.chat_template is None:
            raise EngineError(f"tokenizer of {config.model!r} has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self._dtype()).to(self.device).eval()
        self.eos_ids = self._eos_ids()
        if self.tokenizer.pad_token_id is None:  # Llama-2 ships no pad token; padded slots are masked anyway
            self.tokenizer.pad_token_id = self.eos_ids[0]
        self.pad_id = self.tokenizer.pad_token_id
        self._ll_tokenizer = None
        self._grammars: dict[str, str] = {}

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": model_ref(self.config.model), **sampling_settings(self.config)}

    def _generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None
    ) -> list[str | None]:
        prompts = [
            self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            for chat in conversations
        ]
        matchers = self._matchers(json_schema, len(prompts)) if json_schema is not None else None
        token_ids = self._decode_loop(prompts, seeds, matchers)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]

    # --- decoding --------------------------------------------------------------------

    @torch.inference_mode()
    def _decode_loop(self, prompts: list[str], seeds: list[int], matchers: list | None) -> list[list[int]]:
        batch = self.tokenizer(
            prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        past = None
        for _ in range(self.config.max_new_tokens):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            if past is not None:
                position_ids = position_ids[:, -1:]
            result = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past, use_cache=True,
            )
            past = result.past_key_values
            logits = result.logits[:, -1, :].float().cpu()
            if matchers is not None:
                self._mask_logits(logits, matchers, done)
            next_ids = self._sample(logits, generators, done)
            for row, token in enumerate(next_ids):
                if done[row]:
                    continue
                if token in self.eos_ids:
                    done[row] = True
                    continue
                outputs[row].append(token)
                if matchers is not None and not matchers[row].consume_token(token):
                    done[row] = True  # cannot happen under the mask; stop rather than emit garbage
            if all(done):
                break
            feed = [self.pad_id if done[row] else token for row, token in enumerate(next_ids)]
            input_ids = torch.tensor(feed, device=self.device).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        return outputs

    def _sample(self, logits: torch.Tensor, generators: list[torch.Generator], done: list[bool]) -> list[int]:
        if self.config.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        probs = top_p_filter(probs, self.config.top_p)
        picks = []
        for row, generator in enumerate(generators):
            if done[row] or not torch.isfinite(probs[row]).all() or probs[row].sum() <= 0:
                picks.append(self.pad_id)
                continue
            picks.append(int(torch.multinomial(probs[row], 1, generator=generator)))
        return picks

    # --- constrained decoding (llguidance) ---------------------------------------------

    def _matchers(self, json_schema: dict[str, Any], count: int) -> list:
        import llguidance  # only for constrained decoding

        grammar = self._grammar(json_schema)
        matchers = [llguidance.LLMatcher(self._llguidance_tokenizer(), grammar) for _ in range(count)]
        if matchers[0].is_error():
            raise EngineError(f"llguidance rejected the JSON schema: {matchers[0].get_error()}")
        return matchers

    def _grammar(self, json_schema: dict[str, Any]) -> str:
        import llguidance  # only for constrained decoding

        key = json.dumps(json_schema, sort_keys=True)
        if key not in self._grammars:
            # compact JSON: a weak model cannot wander off into endless whitespace
            self._grammars[key] = llguidance.LLMatcher.grammar_from_json_schema(
                json_schema, overrides={"whitespace_flexible": False}
            )
        return self._grammars[key]

    def _llguidance_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf  # only for constrained decoding

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.eos_ids[0])
        return self._ll_tokenizer

    def _mask_logits(self, logits: torch.Tensor, matchers: list, done: list[bool]) -> None:
        import llguidance.torch  # only for constrained decoding

        vocab = self._llguidance_tokenizer().vocab_size
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), vocab)
        for row, matcher in enumerate(matchers):
            if not done[row]:
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        allowed = unpack_bitmask(bitmask, logits.shape[-1])
        logits.masked_fill_(~allowed, float("-inf"))

    # --- setup -------------------------------------------------------------------------

    def _dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return DTYPES[self.config.dtype]
        return half_dtype(self.device, torch.bfloat16)

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.insert(0, self.tokenizer.eos_token_id)
        if not ids:
            raise EngineError(f"model {self.config.model!r} defines no end-of-sequence token")
        return ids


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed int32 mask (bit j of word i = token 32*i+j) -> bool [batch, vocab].

    Done here with plain tensor ops: llguidance's own helper is `torch.compile`d, which needs a
    compiler toolchain and a long warm-up on CPU. Tokens past the mask's width are disallowed.
    """
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros((bits.shape[0], vocab_size - bits.shape[1]), dtype=torch.bool)
    return torch.cat([bits, pad], dim=1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (nucleus sampling)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
