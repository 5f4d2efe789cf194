"""Random-weight models of the real library classes, built from published configurations.

The configurations live in `bench/published_models.json` (data, nothing downloaded). Speed does
not depend on the weights, so a model built here costs what the released one costs. Build on
the meta device (`with torch.device("meta"):`) to count parameters without allocating them.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

SPECS_FILE = Path(__file__).with_name("published_models.json")


@cache
def specs() -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in json.loads(SPECS_FILE.read_text()).items() if not name.startswith("_")}


def model_config(name: str, tiny: bool = False) -> dict[str, Any]:
    """The published configuration, or (tiny) the test suite's shrunken one of the same shape."""
    spec = specs()[name]
    config = copy.deepcopy(spec["config"])
    if tiny:
        config.update(copy.deepcopy(spec["tiny"]))
    return config


def build(name: str, tiny: bool = False):
    """The model `name` of its library's own class, with random weights."""
    spec = specs()[name]
    config = model_config(name, tiny)
    builder = {"diffusers": build_diffusers, "transformers": build_transformers, "open_clip": build_open_clip}
    return builder[spec["library"]](spec["class"], config)


def filled(construct: Callable[[], Any], seed: int = 0):
    """`construct()` without the library's initialisers: parameters are declared on the meta
    device (buffers stay real), then allocated and filled with noise scaled by 1/sqrt(fan-in)
    (biases 0, other vectors 1). The initialisers are most of a paper-size build's time on a
    CPU (DINOv2-giant's ~45 s on 2 cores, against ~11 s); speed does not depend on the values,
    and these keep activations finite."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        # a constructor that copies weights in (PromptNet.from_unet) copies into meta: a no-op, then filled
        warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model, which is a no-op")
        model = construct()
    fill_noise(model, seed)
    return model


def fill_noise(model, seed: int = 0, block_size: int = 1 << 20) -> None:
    """Allocate every meta parameter of `model` on the CPU, filled from one block of normal noise
    (tiled, each parameter from its own offset) at memory-copy speed."""
    import torch

    block = torch.randn(2 * block_size, generator=torch.Generator().manual_seed(seed))
    for index, module in enumerate(model.modules()):
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            values = torch.empty(param.shape, dtype=param.dtype)
            if param.dim() == 1:
                values.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                flat, offset = values.view(-1), (index * 7919) % block_size
                for start in range(0, flat.numel(), block_size):
                    chunk = min(block_size, flat.numel() - start)
                    flat[start:start + chunk] = block[offset:offset + chunk]
                values.mul_(param[0].numel() ** -0.5)
            module._parameters[name] = torch.nn.Parameter(values, requires_grad=param.requires_grad)


def build_diffusers(class_name: str, config: dict[str, Any]):
    import diffusers

    return getattr(diffusers, class_name)(**config)


TRANSFORMERS_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPVisionModel": "CLIPVisionConfig",
                        "CLIPVisionModelWithProjection": "CLIPVisionConfig", "ViTModel": "ViTConfig",
                        "Dinov2Model": "Dinov2Config", "LlamaForCausalLM": "LlamaConfig"}


def build_transformers(class_name: str, config: dict[str, Any]):
    import transformers

    settings = getattr(transformers, TRANSFORMERS_CONFIGS[class_name])(**config)
    model_class = getattr(transformers, class_name)
    if class_name == "ViTModel":
        return model_class(settings, add_pooling_layer=False)  # as filters.dino loads DINO
    return model_class(settings)


def build_open_clip(class_name: str, config: dict[str, Any]):
    import open_clip

    settings = dict(config)
    quick_gelu = settings.pop("quick_gelu", False)
    return getattr(open_clip, class_name)(**settings, quick_gelu=quick_gelu)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def open_clip_config_file(folder: Path, name: str, tiny: bool = False) -> tuple[str, Path]:
    """Write the configuration as an open_clip model config JSON; (model name, file) to register."""
    config = model_config(name, tiny)
    model_name = f"published-{name}{'-tiny' if tiny else ''}"
    path = Path(folder) / f"{model_name}.json"
    path.write_text(json.dumps(config))
    return model_name, path
