"""PromptNet loads the encoder ProFusion released (github.com/drboog/ProFusion).

The release is a diffusers 0.15 pipeline folder whose `promptnet/` holds `config.json`
(`"_class_name": "PromptNetModel"`, SD2's UNet config plus PromptNet's own settings) and a
torch-saved state dict `diffusion_pytorch_model.bin`. `ReleaseShaped` below rebuilds that module
tree at tiny sizes from the layout (same attribute names, same diffusers blocks, same kernel
arithmetic) with a forward written from the release's description, so the test checks names,
shapes and what the loaded weights compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from torch import nn

from models.promptnet import PromptNet, image_encoder_path, load_image_encoder, profusion_release_key

# What ProFusion's train.py passes (from SD2's unet config + its overrides), at tiny sizes.
RELEASE_CONFIG = {
    "_class_name": "PromptNetModel",
    "_diffusers_version": "0.15.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [2, 4],  # diffusers 0.15: the number of heads
    "block_out_channels": [16, 32],
    "center_input_sample": False,  # SD2 unet config keys the release keeps as hidden config
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "cross_attention_dim": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "prompt_channel": 24,
    "region_kernel_size": 2,
    "region_proj_channel": 4,
    "res_block_out_channels": [8, 8],
    "resnet_time_scale_shift": "default",
    "sample_size": 16,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "upcast_attention": False,
    "use_clip_vision_embeds": True,
    "use_linear_projection": True,
    "use_res": True,
    "with_noise": True,
}
LATENT = 16  # (16 / 8 / region_kernel_size 2)^2 = 1 token


class ReleaseShaped(nn.Module):
    """ProFusion's PromptNetModel module tree (names, blocks, kernel sizes), for `config`."""

    def __init__(self, c: dict):
        super().__init__()
        channels, res_channels = c["block_out_channels"], c["res_block_out_channels"]
        heads, levels, layers = c["attention_head_dim"], len(c["block_out_channels"]), c["layers_per_block"]
        time_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(c["in_channels"], channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], True, 0)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.promptnet_cond_embedding = nn.Module()
        self.promptnet_cond_embedding.conv_in = nn.Conv2d(c["in_channels"], channels[0], 3, padding=1)
        self.promptnet_cond_embedding.conv_out = nn.Conv2d(channels[0], channels[0], 3, padding=1)
        self.vision_embedding = nn.Linear(1280 if c["use_clip_vision_embeds"] else 1024, c["cross_attention_dim"])
        self.down_blocks = nn.ModuleList()
        self.down_prompt_projections = nn.ModuleList()
        self.residual_projections = nn.ModuleList()
        self.residual_projections_2 = nn.ModuleList()
        region = c["region_proj_channel"]
        size = max(2 ** (levels - 1), 8)
        self.first_prompt_projection = nn.Conv2d(channels[0], region, size, stride=size)

        def residual(cin, cout):
            self.residual_projections.append(nn.Conv2d(cin, cout, 1))
            self.residual_projections_2.append(nn.Conv2d(cout, cout, 1, bias=False))

        residual(channels[0], res_channels[0])
        previous = channels[0]
        for i, kind in enumerate(c["down_block_types"]):
            final = i == levels - 1
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers, in_channels=previous, out_channels=channels[i], temb_channels=time_dim,
                add_downsample=not final, resnet_eps=c["norm_eps"], resnet_act_fn="silu",
                resnet_groups=c["norm_num_groups"], cross_attention_dim=c["cross_attention_dim"],
                num_attention_heads=heads[i], attention_head_dim=channels[i] // heads[i], downsample_padding=1,
                use_linear_projection=c["use_linear_projection"]))
            previous = channels[i]
            if not final:
                size //= 2
            self.down_prompt_projections.append(nn.Conv2d(channels[i], region, size, stride=size))
            for _ in range(layers + (0 if final else 1)):
                residual(channels[i], res_channels[i])
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=channels[-1], temb_channels=time_dim, resnet_eps=c["norm_eps"], resnet_act_fn="silu",
            cross_attention_dim=c["cross_attention_dim"], num_attention_heads=heads[-1],
            resnet_groups=c["norm_num_groups"], use_linear_projection=c["use_linear_projection"])
        self.mid_prompt_projection = nn.Conv2d(channels[-1], region, size, stride=size)
        self.mid_residual_projection = nn.Conv2d(channels[-1], res_channels[-1], 1)
        self.mid_residual_projection_2 = nn.Conv2d(res_channels[-1], res_channels[-1], 1, bias=False)
        k = c["region_kernel_size"]
        self.region_prompt_output = nn.Conv2d((levels + 2) * region, c["prompt_channel"], k, stride=k)

    def forward(self, sample, timestep, encoder_hidden_states, promptnet_cond):
        """The release's prompt: reference latent in `sample`, noisy latent in `promptnet_cond`."""
        emb = self.time_embedding(self.time_proj(timestep.expand(sample.shape[0])))
        cond = self.promptnet_cond_embedding
        sample = self.conv_in(sample) + cond.conv_out(F.silu(cond.conv_in(promptnet_cond)))
        context = self.vision_embedding(encoder_hidden_states)
        projections = [self.first_prompt_projection(sample)]
        for block, projection in zip(self.down_blocks, self.down_prompt_projections):
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            projections.append(projection(sample))
        sample = self.mid_block(sample, emb, encoder_hidden_states=context)
        projections.append(self.mid_prompt_projection(sample))
        prompt = self.region_prompt_output(torch.cat(projections, dim=1))
        return prompt.reshape(prompt.shape[0], prompt.shape[1], -1).permute(0, 2, 1)


def save_release(root: Path, state: dict, config: dict = RELEASE_CONFIG) -> Path:
    """The release's pipeline folder, as StableDiffusionPromptNetPipeline.save_pretrained writes it."""
    folder = root / "promptnet"
    folder.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPromptNetPipeline", "_diffusers_version": "0.15.0.dev0",
        "promptnet": ["diffusers", "PromptNetModel"], "openclip": ["transformers", "CLIPModel"]}))
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    return root


@pytest.fixture(scope="module")
def release():
    torch.manual_seed(0)
    module = ReleaseShaped(RELEASE_CONFIG).eval()
    with torch.no_grad():  # no parameter left at a constant init, so a misplaced tensor shows
        for tensor in module.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.2)
    return module


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    noisy = torch.randn(batch, 4, LATENT, LATENT, generator=generator)
    tokens = torch.randn(1, 5, 1280, generator=generator)
    return reference, noisy, torch.tensor(321), tokens


def test_release_checkpoint_loads_tensor_for_tensor_and_computes_the_release_prompt(tmp_path, release):
    state = release.state_dict()
    root = save_release(tmp_path / "profusion", state)
    model = PromptNet.from_pretrained(root)  # the generator's `checkpoint` may name the release folder
    assert model.config.prompt_head == "regions" and model.config.num_tokens == 1
    own = model.state_dict()
    loaded = 0
    for key, tensor in state.items():
        name = profusion_release_key(key)
        if name is None:
            assert "residual_projection" in key
            continue
        assert torch.equal(own[name], tensor), key
        loaded += 1
    assert loaded == len(own)
    assert profusion_release_key("promptnet_cond_embedding.conv_out.weight") == "noisy_in.2.weight"
    assert profusion_release_key("vision_embedding.bias") == "image_proj.bias"

    reference, noisy, t, tokens = inputs()
    with torch.no_grad():
        expected = release(reference.expand(2, -1, -1, -1), t, tokens.expand(2, -1, -1), noisy)
        ours = model(reference, noisy, t, tokens)
    assert ours.shape == (2, 1, 24)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    # the same folder's promptnet/ works too, and our own save of the loaded encoder round-trips
    assert torch.equal(PromptNet.from_pretrained(root / "promptnet").state_dict()["region_prompt_output.weight"],
                       state["region_prompt_output.weight"])
    model.save_pretrained(tmp_path / "ours")
    again = PromptNet.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(reference, noisy, t, tokens), ours)


def test_release_image_encoder_is_its_openclip_folder(tmp_path, release):
    from transformers import CLIPConfig, CLIPModel

    root = save_release(tmp_path / "profusion", release.state_dict())
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8)
    CLIPModel(config).save_pretrained(root / "openclip")
    assert image_encoder_path(root) == root / "openclip"
    assert image_encoder_path(root / "promptnet") == root / "openclip"
    encoder = load_image_encoder(image_encoder_path(root))
    assert encoder.config.hidden_size == 16


def test_release_checkpoint_with_an_unknown_key_or_shape_is_refused_by_name(tmp_path, release):
    state = release.state_dict()

    extra = {**state, "ebm_head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unknown key 'ebm_head.weight'"):
        PromptNet.from_profusion_release(extra, RELEASE_CONFIG)

    wrong = {**state, "region_prompt_output.weight": torch.zeros(24, 16, 3, 3)}
    with pytest.raises(ValueError, match=r"'region_prompt_output.weight' has shape \(24, 16, 3, 3\), "
                                         r"ours \('region_prompt_output.weight'\) has \(24, 16, 2, 2\)"):
        PromptNet.from_profusion_release(save_release(tmp_path / "wrong", wrong))

    missing = {k: v for k, v in state.items() if k != "promptnet_cond_embedding.conv_in.bias"}
    with pytest.raises(ValueError, match=r"lacks 'noisy_in.0.bias'"):
        PromptNet.from_profusion_release(missing, RELEASE_CONFIG)

    with pytest.raises(ValueError, match=r"with_noise=False"):
        PromptNet.from_profusion_release(state, {**RELEASE_CONFIG, "with_noise": False})
    with pytest.raises(ValueError, match=r"needs the release's config"):
        PromptNet.from_profusion_release(state)
    with pytest.raises(ValueError, match=r"not a ProFusion PromptNet folder"):
        PromptNet.from_profusion_release(tmp_path)


@pytest.mark.parametrize("position_embedding", [True, False])
def test_s_star_takes_the_position_embedding_only_where_ours_did(tmp_path, position_embedding):
    """ProFusion's pipeline writes S* over the whole input embedding (token + position); ours adds
    the position embedding to S*. The release loader marks its PromptNet so."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from factory.tiny.sd import build_tiny_clip_tokenizer
    from models.promptnet import PlaceholderPrompts

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(tmp_path / "tokenizer")  # a real CLIPTokenizer, tiny BPE vocabulary
    tokenizer.model_max_length = 8  # the encoder's positions
    # sized before the placeholder is added: its id is out of the table, so it must never reach the lookup
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    prompts = PlaceholderPrompts(tokenizer, encoder, position_embedding=position_embedding)
    prompt = prompts.render("a photo of {subject} here")
    # <|startoftext|> a photo of S* here <|endoftext|> <pad>: the start token puts S* at position 4
    ids = prompts.token_ids([prompt])
    assert ids.shape == (1, 8) and (ids == prompts.placeholder_id).nonzero().tolist() == [[0, 4]]
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 6] == tokenizer.eos_token_id
    s_star = torch.randn(1, 1, 16)
    text_model = getattr(encoder, "text_model", encoder)  # transformers 5 dropped the inner module
    seen = {}
    hook = text_model.encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(x=kwargs.get("inputs_embeds", args[0] if args else None)),
        with_kwargs=True)
    with torch.no_grad():
        prompts.encode([prompt], s_star)
    hook.remove()
    at_slot = seen["x"][0, 4]
    position = text_model.embeddings.position_embedding.weight[4]
    torch.testing.assert_close(at_slot, s_star[0, 0] + position if position_embedding else s_star[0, 0])
    assert not PromptNet.from_profusion_release(
        ReleaseShaped(RELEASE_CONFIG).state_dict(), RELEASE_CONFIG).config.s_star_position_embedding
