"""Named generators from config: `kind` picks the implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from factory.framework.config import describe_errors
from models.cafe import CafeGenerator, CafeOptions
from models.ip_adapter import IPAdapterGenerator, IPAdapterOptions
from models.profusion import ProFusionGenerator, ProFusionOptions

if TYPE_CHECKING:
    from factory.framework.config import GeneratorSpec, StorageConfig
    from models.base import Generator

IMPLEMENTATIONS = {"profusion": ProFusionGenerator, "cafe": CafeGenerator, "ip_adapter": IPAdapterGenerator}
OPTIONS = {"profusion": ProFusionOptions, "cafe": CafeOptions, "ip_adapter": IPAdapterOptions}


def options_problems(generators: dict[str, GeneratorSpec]) -> list[str]:
    """`key: problem` for each generator option its implementation refuses (a misspelt key, a bad
    value), so a run fails at its start rather than when an actor (or a days-long training) reads them."""
    problems = []
    for name, spec in generators.items():
        try:
            OPTIONS[spec.kind].model_validate(spec.options)
        except ValidationError as err:
            problems += [f"  generate.generators.{name}.options.{line.strip()}"
                         for line in describe_errors(err).splitlines()]
    return problems


def build_generator(name: str, spec: GeneratorSpec, device: str = "cpu", storage: StorageConfig | None = None
                    ) -> Generator:
    """The generator `spec` names; `storage` (the run's storage section) fetches `s3://` models."""
    cls = IMPLEMENTATIONS.get(spec.kind)
    if cls is None:
        raise NotImplementedError(f"generator kind {spec.kind!r} is not implemented (known: {sorted(IMPLEMENTATIONS)})")
    return cls(name=name, spec=spec, device=device, storage=storage)
