"""The assistant heads over a tiny frozen Llama: sequence layout, equation 2, what trains,
and save/load of the new layers only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def assistant_folder(tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_assistant

    return build_tiny_cafe_assistant(tmp_path_factory.mktemp("cafe-assistant"))


@pytest.fixture
def assistant(assistant_folder):
    from models.assistant import CafeAssistant

    return CafeAssistant.from_pretrained(assistant_folder)


USERS = ["Can you put my dog on the beach?", "Draw this cat as a pirate."]
ANSWERS = ["Here is your dog on a sunny beach.", "I drew the cat as a pirate on a ship."]


def dino_features(batch: int = 2, dim: int = 32) -> torch.Tensor:
    return torch.randn(batch, 5, dim, generator=torch.Generator().manual_seed(batch))


def test_forward_gives_a_loss_per_sample_and_a_clip_embedding(assistant):
    out = assistant(dino_features(), USERS, ANSWERS)
    assert out.lm_loss.shape == (2,) and torch.isfinite(out.lm_loss).all()
    assert out.clip_embeds.shape == (2, assistant.config["clip_dim"])


def test_sequence_is_image_then_prompt_then_answer_then_signal_token(assistant):
    inputs, mask, labels, signal_at = assistant.embed_sequences(dino_features(), USERS, ANSWERS)
    for row in range(2):
        answer_ids = assistant.token_ids(assistant.answer_text(USERS[row], ANSWERS[row]))
        prompt_ids = assistant.token_ids(assistant.prompt_text(USERS[row]))
        length = int(mask[row].sum())
        assert length == 5 + len(prompt_ids) + len(answer_ids) + 1
        assert labels[row][labels[row] != -100].tolist() == answer_ids  # the LM loss covers the answer only
        assert int(signal_at[row]) == length - 1
        torch.testing.assert_close(inputs[row, length - 1], assistant.signal_token.detach())
        image_tokens = assistant.vision_proj(dino_features()[row])
        torch.testing.assert_close(inputs[row, :5], image_tokens)


def test_loss_is_lm_plus_lambda_mse(assistant):
    targets = torch.randn(2, assistant.config["clip_dim"])
    out = assistant(dino_features(), USERS, ANSWERS)
    expected = out.lm_loss + 0.2 * ((out.clip_embeds - targets) ** 2).mean(dim=1)
    torch.testing.assert_close(assistant.loss(dino_features(), USERS, ANSWERS, targets, 0.2), expected)


def test_only_the_new_layers_train(assistant):
    targets = torch.randn(2, assistant.config["clip_dim"])
    assistant.loss(dino_features(), USERS, ANSWERS, targets).mean().backward()
    trainable = {n for n, p in assistant.named_parameters() if p.requires_grad}
    assert trainable == {"vision_proj.weight", "vision_proj.bias", "signal_token", "clip_head.weight", "clip_head.bias"}
    assert all(p.grad is None for p in assistant.llm.parameters())
    assert all(assistant.get_parameter(n).grad is not None for n in trainable)
    assert not assistant.train().llm.training  # the frozen LLM stays in eval mode


def test_save_and_load_keep_only_the_new_layers(assistant, tmp_path):
    from safetensors.torch import load_file

    from models.assistant import CafeAssistant

    with torch.no_grad():
        assistant.clip_head.bias.add_(1.0)
    assistant.save_pretrained(tmp_path / "heads")
    saved = load_file(str(tmp_path / "heads" / "assistant.safetensors"))
    assert set(saved) == set(assistant.new_layers())
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["assistant.safetensors", "assistant_config.json"]
    again = CafeAssistant.from_pretrained(tmp_path / "heads")
    with torch.no_grad():
        torch.testing.assert_close(
            assistant(dino_features(), USERS, ANSWERS).clip_embeds, again(dino_features(), USERS, ANSWERS).clip_embeds
        )
    with pytest.raises(ValueError):
        again.load_new_layers({"vision_proj.weight": saved["vision_proj.weight"]})


def test_respond_answers_and_predicts_h_of_s(assistant):
    text, embedding = assistant.respond(dino_features(1), USERS[0], max_new_tokens=4)
    assert isinstance(text, str)
    assert embedding.shape == (assistant.config["clip_dim"],) and torch.isfinite(embedding).all()
    assert Path(assistant.config["llm_model"]).is_dir()
