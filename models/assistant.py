"""The CAFE assistant heads (paper sections 3.1 and 4.1) on a frozen chat LLM.

Input sequence, LLaVA-style: `[V(E(x)) | chat prompt with the user text y | answer y~ | s]`,
where `V` is a linear projection of the DINOv2 patch features into the LLM's input space and
`s` a learnable token appended after the text. The LLM's last hidden state at `s` goes
through a linear head `H` to a CLIP image embedding. Loss (equation 2):
`L_LM(y~) + lambda * MSE(H(s), F(x~))`, lambda = 0.2. Only `V`, `s` and `H` train; only
they are saved (safetensors, with a JSON config naming the LLM and the encoders).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer

from factory.framework.models_cache import local_model
from models.cafe import encoder_dims

CONFIG_FILE = "assistant_config.json"
WEIGHTS_FILE = "assistant.safetensors"
IGNORE = -100
FALLBACK_PROMPT = "USER: {user}\nASSISTANT:"


class AssistantOutput(NamedTuple):
    lm_loss: torch.Tensor  # (batch,) mean token loss over each answer
    clip_embeds: torch.Tensor  # (batch, clip width): H(s)


class CafeAssistant(nn.Module):
    """Frozen causal LM + vision projection `V` + learnable token `s` + CLIP head `H`."""

    def __init__(self, llm: nn.Module, tokenizer: Any, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.llm = llm
        self.tokenizer = tokenizer
        hidden = llm.get_input_embeddings().embedding_dim
        self.vision_proj = nn.Linear(config["dino_dim"], hidden)
        std = float(llm.get_input_embeddings().weight.detach().float().std())
        self.signal_token = nn.Parameter(torch.randn(hidden) * std)
        self.clip_head = nn.Linear(hidden, config["clip_dim"])
        self.llm.requires_grad_(False)
        self.llm.eval()

    # --- building and saving ----------------------------------------------------------

    @classmethod
    def from_parts(
        cls, llm_model: str, clip_model: str, dino_model: str, max_text_tokens: int = 256, dtype=torch.float32,
        storage: Any = None,
    ) -> CafeAssistant:
        """New heads over the LLM at `llm_model`, sized for the two encoders (references recorded as
        given; `storage` fetches S3 ones, `factory.framework.models_cache`)."""
        clip_dim, dino_dim = encoder_dims(clip_model, dino_model, storage)
        config = {
            "llm_model": llm_model,
            "clip_model": clip_model,
            "dino_model": dino_model,
            "clip_dim": clip_dim,
            "dino_dim": dino_dim,
            "max_text_tokens": max_text_tokens,
        }
        return cls(*load_llm(llm_model, dtype, storage), config)

    @classmethod
    def from_pretrained(cls, path: str | Path, llm_model: str | None = None, dtype=torch.float32,
                        storage: Any = None) -> CafeAssistant:
        """Heads saved by `save_pretrained`, over their recorded LLM (or `llm_model`)."""
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        if llm_model:
            config["llm_model"] = llm_model
        model = cls(*load_llm(config["llm_model"], dtype, storage), config)
        model.load_new_layers(load_file(str(path / WEIGHTS_FILE)))
        return model

    def take_settings(self, clip_model: str, dino_model: str, max_text_tokens: int, storage: Any = None) -> None:
        """A fine-tune from a saved folder trains with the configured encoders and text limit, and records
        them; encoders of other widths than the saved heads were built for are refused."""
        dims = encoder_dims(clip_model, dino_model, storage)
        if dims != (self.config["clip_dim"], self.config["dino_dim"]):
            raise ValueError(f"the saved assistant's heads take CLIP {self.config['clip_dim']} and DINO "
                             f"{self.config['dino_dim']} wide features; {clip_model} and {dino_model} give {dims}")
        self.config.update(clip_model=clip_model, dino_model=dino_model, max_text_tokens=max_text_tokens)

    def new_layers(self) -> dict[str, torch.Tensor]:
        """The trainable state: `vision_proj.*`, `signal_token`, `clip_head.*`."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("llm.")}

    def load_new_layers(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.new_layers())
        if set(tensors) != expected:
            raise ValueError(f"assistant weights hold {sorted(tensors)}, expected {sorted(expected)}")
        with torch.no_grad():
            for name, param in self.new_layers().items():
                param.copy_(tensors[name])

    def save_pretrained(self, path: str | Path, new_layers: dict[str, torch.Tensor] | None = None) -> None:
        """Config JSON + the new layers as safetensors (`new_layers`: already gathered ones)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        layers = new_layers if new_layers is not None else self.new_layers()
        if set(layers) != set(self.new_layers()):
            raise ValueError(f"cannot save layers {sorted(layers)}: the new layers are {sorted(self.new_layers())}")
        tensors = {name: p.detach().float().cpu().contiguous() for name, p in layers.items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.new_layers().values())

    def train(self, mode: bool = True) -> CafeAssistant:
        super().train(mode)
        self.llm.eval()  # frozen: keep dropout and the like off
        return self

    # --- text --------------------------------------------------------------------------

    def prompt_text(self, user: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        return FALLBACK_PROMPT.format(user=user)

    def answer_text(self, user: str, answer: str) -> str:
        """The text that follows the prompt for this answer (the template's closing tokens included)."""
        if getattr(self.tokenizer, "chat_template", None):
            full = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
            )
            prompt = self.prompt_text(user)
            if full.startswith(prompt):
                return full[len(prompt) :]
        return " " + answer.strip() + (self.tokenizer.eos_token or "")

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- forward -----------------------------------------------------------------------

    def embed_sequences(
        self, dino_features: torch.Tensor, users: Sequence[str], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded `inputs_embeds`, attention mask, LM labels and the position of `s`."""
        embed = self.llm.get_input_embeddings()
        limit = int(self.config.get("max_text_tokens", 256))
        device = embed.weight.device
        image_tokens = self.vision_proj(dino_features.to(device))
        rows, labels = [], []
        for index, (user, answer) in enumerate(zip(users, answers, strict=True)):
            prompt_ids = self.token_ids(self.prompt_text(user))[-limit:]
            answer_ids = self.token_ids(self.answer_text(user, answer))[:limit]
            text_ids = torch.tensor(prompt_ids + answer_ids, device=device, dtype=torch.long)
            text = embed(text_ids).to(image_tokens.dtype)
            rows.append(torch.cat([image_tokens[index], text, self.signal_token[None].to(text.dtype)]))
            ignored = [IGNORE] * (image_tokens.shape[1] + len(prompt_ids))
            labels.append(torch.tensor(ignored + answer_ids + [IGNORE], device=device))
        return _pad(rows, labels)

    def forward(self, dino_features: torch.Tensor, users: Sequence[str], answers: Sequence[str]) -> AssistantOutput:
        inputs, mask, labels, signal_at = self.embed_sequences(dino_features, users, answers)
        hidden = self.llm.base_model(inputs_embeds=inputs.to(self.llm.dtype), attention_mask=mask).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden).float()
        token_loss = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
        )
        counts = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
        lm_loss = token_loss.sum(dim=1) / counts
        signal = hidden[torch.arange(hidden.shape[0], device=hidden.device), signal_at]
        return AssistantOutput(lm_loss=lm_loss, clip_embeds=self.clip_head(signal.to(self.clip_head.weight.dtype)))

    def loss(
        self,
        dino_features: torch.Tensor,
        users: Sequence[str],
        answers: Sequence[str],
        clip_targets: torch.Tensor,
        clip_weight: float = 0.2,
    ) -> torch.Tensor:
        """Equation 2 per sample: LM loss on the answer + lambda * MSE(H(s), F(x~))."""
        return assistant_loss(self(dino_features, users, answers), clip_targets, clip_weight)

    @torch.no_grad()
    def respond(self, dino_features: torch.Tensor, user: str, max_new_tokens: int = 128) -> tuple[str, torch.Tensor]:
        """Greedy answer to `user` about the image, and H(s) after it: (text, (clip width,))."""
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        image_tokens = self.vision_proj(dino_features.to(device).reshape(1, *dino_features.shape[-2:]))
        prompt = embed(torch.tensor(self.token_ids(self.prompt_text(user)), device=device)).to(image_tokens.dtype)
        inputs = torch.cat([image_tokens[0], prompt])[None].to(self.llm.dtype)
        generated = self.llm.generate(
            inputs_embeds=inputs,
            attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        answer = self.tokenizer.decode(generated[0], skip_special_tokens=True).strip()
        out = self(dino_features.reshape(1, *dino_features.shape[-2:]), [user], [answer])
        return answer, out.clip_embeds[0]


def assistant_loss(output: AssistantOutput, clip_targets: torch.Tensor, clip_weight: float) -> torch.Tensor:
    """Equation 2 per sample from the model's output (usable through a DDP/FSDP wrapper)."""
    predicted = output.clip_embeds.float()
    mse = F.mse_loss(predicted, clip_targets.to(predicted.device).float(), reduction="none").mean(dim=1)
    return output.lm_loss + clip_weight * mse


def load_llm(path: str, dtype=torch.float32, storage: Any = None) -> tuple[nn.Module, Any]:
    path = local_model(path, storage, "llm_model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return llm, tokenizer


def _pad(rows: list[torch.Tensor], labels: list[torch.Tensor]):
    inputs = pad_sequence(rows, batch_first=True)
    padded_labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE)
    lengths = torch.tensor([len(row) for row in rows], device=inputs.device)
    mask = (torch.arange(inputs.shape[1], device=inputs.device)[None] < lengths[:, None]).long()
    return inputs, mask, padded_labels, lengths - 1
