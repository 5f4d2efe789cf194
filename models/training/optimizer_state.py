"""Optimizer state: the full, name-keyed form of torch.distributed.checkpoint (the same for a
plain module, DDP and FSDP), stored as safetensors (tensors) plus JSON (param groups)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from factory.framework import layout
from factory.framework.storage import Storage


def full_state_options(**extra):
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def get_optimizer_state(model, optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=full_state_options())


def set_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def write_optimizer_state(state: dict[str, Any], folder: Path) -> None:
    tensors = {
        f"{name}::{slot}": value.detach().cpu().contiguous()
        for name, slots in state["state"].items()
        for slot, value in slots.items()
    }
    save_file(tensors, str(folder / layout.OPTIMIZER_TENSORS))
    (folder / layout.OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": state["param_groups"]}, indent=2))


def read_optimizer_state(storage: Storage, folder: str) -> dict[str, Any]:
    tensors = load_safetensors(storage.read_bytes(layout.checkpoint_file(folder, layout.OPTIMIZER_TENSORS)))
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, slot = flat.rsplit("::", 1)
        state.setdefault(name, {})[slot] = value
    groups = json.loads(storage.read_bytes(layout.checkpoint_file(folder, layout.OPTIMIZER_GROUPS)))["param_groups"]
    return {"state": state, "param_groups": groups}
