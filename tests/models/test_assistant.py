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


def test_equation_2_on_fixed_tensors():
    """L = L_LM + lambda * MSE(H(s), F(x~)), per sample, from numbers written out here."""
    from models.assistant import AssistantOutput, assistant_loss

    output = AssistantOutput(lm_loss=torch.tensor([1.25, 0.5]),
                             clip_embeds=torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]]))
    targets = torch.tensor([[0.0, 0.0, 0.5], [1.0, -1.0, 1.0]])
    mse = [((1 - 0) ** 2 + (-2 - 0) ** 2 + 0**2) / 3, (1**2 + 1**2 + 2**2) / 3]
    expected = [1.25 + 0.2 * mse[0], 0.5 + 0.2 * mse[1]]
    torch.testing.assert_close(assistant_loss(output, targets, 0.2), torch.tensor(expected))


def test_lm_loss_is_the_mean_negative_log_likelihood_of_the_answer_tokens(assistant):
    """L_LM recomputed token by token from the frozen LLM's own next-token distribution."""
    features = dino_features()
    with torch.no_grad():
        out = assistant(features, USERS, ANSWERS)
        inputs, mask, labels, _ = assistant.embed_sequences(features, USERS, ANSWERS)
        logits = assistant.llm(inputs_embeds=inputs, attention_mask=mask).logits.float()
    for row in range(2):
        answer_ids = assistant.token_ids(assistant.answer_text(USERS[row], ANSWERS[row]))
        first = 5 + len(assistant.token_ids(assistant.prompt_text(USERS[row])))  # image tokens, then the prompt
        log_probs = torch.log_softmax(logits[row], dim=-1)
        nll = [-log_probs[first + n - 1, token] for n, token in enumerate(answer_ids)]  # position p predicts p + 1
        torch.testing.assert_close(out.lm_loss[row], torch.stack(nll).mean(), rtol=1e-4, atol=1e-5)
