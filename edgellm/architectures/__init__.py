"""Architecture families: how a checkpoint format names and shapes the decoder's tensors.

Each family is one module in this package that registers an ``Architecture`` with the
``register`` decorator: which HF ``model_type`` values and GGUF ``general.architecture``
values it reads, how their config keys become a ``ModelConfig``, and how their tensor names
(and llama.cpp's Q/K row permutation) map onto the decoder's HF-LLaMA names. Adding a family
is adding a module; nothing else lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from edgellm.config import ModelConfig
from edgellm.errors import CheckpointError
from edgellm.plugins import Registry


ArchitectureError = CheckpointError  # a checkpoint of a family edgellm does not read


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any], int | None], ModelConfig]
    hf_tensor_name: Callable[[str], str | None]  # checkpoint name -> decoder name (None = not a weight)
    hf_config: Callable[[ModelConfig, str], dict[str, Any]] | None = None  # config -> config.json of a model_type
    hf_checkpoint_name: Callable[[str], str] | None = None  # decoder name -> checkpoint name
    config_from_gguf: Callable[[Any, int | None], ModelConfig] | None = None
    gguf_tensor_name: Callable[[str], str | None] | None = None
    # (decoder name, tensor, config) -> tensor: format-specific layout fixes (e.g. Q/K permutation)
    gguf_tensor_fix: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] | None = None
    notes: dict[str, str] = field(default_factory=dict)


_REGISTRY: Registry[Architecture] = Registry(__name__, "architecture")


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY.entries:
        raise ArchitectureError(f"architecture {arch.name!r} is registered twice")
    return _REGISTRY.add(arch.name, arch)


def _discover() -> dict[str, Architecture]:
    return _REGISTRY.all()


def for_hf(hf: dict[str, Any]) -> Architecture:
    model_type = hf.get("model_type", "llama")
    for arch in _discover().values():
        if model_type in arch.hf_model_types:
            return arch
    known = sorted(t for a in _discover().values() for t in a.hf_model_types)
    raise ArchitectureError(f"unsupported model_type {model_type!r} in config.json; edgellm supports {', '.join(known)}")


def for_model_type(model_type: str) -> Architecture:
    return for_hf({"model_type": model_type})


def for_gguf(gguf_arch: str | None) -> Architecture:
    for arch in _discover().values():
        if gguf_arch in arch.gguf_architectures:
            return arch
    known = sorted(t for a in _discover().values() for t in a.gguf_architectures)
    raise ArchitectureError(f"GGUF architecture {gguf_arch!r} is not supported; edgellm reads {', '.join(known)} GGUFs")


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """``ModelConfig`` from an HF ``config.json`` dict, by its family."""
    return for_hf(hf).config_from_hf(hf, max_seq_len)
