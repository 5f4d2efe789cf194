"""Named generators from config: `kind` picks the implementation, imported lazily."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from factory.config import GeneratorSpec, StorageConfig
    from models.base import Generator

IMPLEMENTATIONS = {
    "profusion": "models.profusion:ProFusionGenerator",
    "cafe": "models.cafe:CafeGenerator",
    "ip_adapter": "models.ip_adapter:IPAdapterGenerator",
}


def build_generator(name: str, spec: GeneratorSpec, device: str = "cpu", storage: StorageConfig | None = None
                    ) -> Generator:
    """The generator `spec` names; `storage` (the run's storage section) fetches `s3://` models."""
    target = IMPLEMENTATIONS.get(spec.kind)
    if target is None:
        raise NotImplementedError(f"generator kind {spec.kind!r} is not implemented (known: {sorted(IMPLEMENTATIONS)})")
    module_name, class_name = target.split(":")
    cls = getattr(import_module(module_name), class_name)
    return cls(name=name, spec=spec, device=device, storage=storage)
