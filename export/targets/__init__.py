"""Export targets, one package each (``export/targets/<name>/``), registered by decorator.

A target is a lowering of the one decoder: it declares its flavours (each an ordered list of
source transforms from ``export.transforms`` plus target options, e.g. ExecuTorch's
partitioners) and implements ``lower(job) -> Path``. ``names()`` lists the packages found
here; ``get(name)`` imports one, whose ``@register`` makes it known. Adding a target is
adding a package: nothing else lists them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgellm.plugins import Registry

if TYPE_CHECKING:  # the CLI lists targets before torch loads
    from export.transforms import Transform


@dataclass(frozen=True)
class Flavour:
    name: str
    description: str
    transforms: tuple[Transform, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    kv_dtypes: tuple[str, ...] = ("fp32",)  # KV cache dtypes its graph carries (``KVCacheConfig.dtype``)
    kv_window: bool = False  # carries a sliding-window cache with sinks

    def kv_refusal(self, spec) -> str | None:
        """Why this flavour cannot carry the KV cache ``spec`` (a ``KVCacheConfig``), or None."""
        if spec.dtype not in self.kv_dtypes:
            return f"an {spec.dtype} KV cache (it carries {', '.join(self.kv_dtypes)})"
        if spec.window is not None and not self.kv_window:
            return "a sliding-window KV cache"
        return None


class Target(ABC):
    """Base of every target: a name, its flavours (the first is the default) and ``lower``."""

    name: ClassVar[str]
    flavours: ClassVar[tuple[Flavour, ...]]
    # measured peak export memory per parameter (above the libraries and the largest tensor's
    # quantization temporaries), for the up-front check (``export.pipeline.estimated_peak_bytes``)
    bytes_per_parameter: ClassVar[float] = 12.0
    # bytes per element of the largest tensor held beside that while quantizing and writing it
    transient_bytes_per_element: ClassVar[float] = 8.0
    relative_cost: ClassVar[float] = 1.0  # export time relative to the others: the longest starts first
    # the weight precisions its lowering carries (``QuantConfig``: linears, embedding, head, overrides)
    precisions: ClassVar[frozenset[str]] = frozenset({"int4", "float"})

    def resident_cache_bytes(self, cfg) -> int:
        """Bytes of the KV cache resident while exporting (none unless the program's own state)."""
        return 0

    @property
    def default_flavour(self) -> Flavour:
        return self.flavours[0]

    def flavour(self, name: str | None) -> Flavour:
        if name is None:
            return self.default_flavour
        for f in self.flavours:
            if f.name == name:
                return f
        raise ValueError(f"target {self.name} has no flavour {name!r}; valid: "
                         f"{', '.join(f.name for f in self.flavours)} (default {self.default_flavour.name})")

    @abstractmethod
    def lower(self, job) -> Path:
        """Trace ``job.decoder()``, carry ``job.quant`` bit for bit, write through ``job.writer()``."""


_REGISTRY: Registry[Target] = Registry(__name__, "target", packages_only=True)


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make ``cls`` (one instance) the target named ``cls.name``."""
    _REGISTRY.add(cls.name, cls())
    return cls


def names() -> list[str]:
    return _REGISTRY.names()


def get(name: str) -> Target:
    return _REGISTRY.get(name, f"unknown target {name!r}")
