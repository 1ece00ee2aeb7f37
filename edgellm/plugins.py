"""Registries filled by the modules of a package: a target, a backend or an architecture is
known by being a module there that registers itself, never by a list somewhere else."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries keyed by the name of the module (or subpackage) of ``package`` that registers them."""

    def __init__(self, package: str, what: str, packages_only: bool = False):
        self.package, self.what, self.packages_only = package, what, packages_only
        self.entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        self.entries[name] = entry
        return entry

    def names(self) -> list[str]:
        path = importlib.import_module(self.package).__path__
        return sorted(m.name for m in pkgutil.iter_modules(path) if m.ispkg or not self.packages_only)

    def get(self, name: str, unknown: str) -> T:
        """The entry of module ``name`` (imported on first use); ``unknown`` is the error's start."""
        if name not in self.names():
            raise ValueError(f"{unknown}; valid: {', '.join(self.names())}")
        importlib.import_module(f"{self.package}.{name}")
        if name not in self.entries:
            raise RuntimeError(f"{self.package}.{name} registers no {self.what} (missing @register)")
        return self.entries[name]

    def all(self) -> dict[str, T]:
        """Every entry (imports every module of the package)."""
        for name in self.names():
            importlib.import_module(f"{self.package}.{name}")
        return self.entries
