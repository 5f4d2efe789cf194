"""Named generators from config: `kind` picks the implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.cafe import CafeGenerator
from models.ip_adapter import IPAdapterGenerator
from models.profusion import ProFusionGenerator

if TYPE_CHECKING:
    from factory.framework.config import GeneratorSpec, StorageConfig
    from models.base import Generator

IMPLEMENTATIONS = {"profusion": ProFusionGenerator, "cafe": CafeGenerator, "ip_adapter": IPAdapterGenerator}


def build_generator(name: str, spec: GeneratorSpec, device: str = "cpu", storage: StorageConfig | None = None
                    ) -> Generator:
    """The generator `spec` names; `storage` (the run's storage section) fetches `s3://` models."""
    cls = IMPLEMENTATIONS.get(spec.kind)
    if cls is None:
        raise NotImplementedError(f"generator kind {spec.kind!r} is not implemented (known: {sorted(IMPLEMENTATIONS)})")
    return cls(name=name, spec=spec, device=device, storage=storage)
