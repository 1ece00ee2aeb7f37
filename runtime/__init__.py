"""edgellm runtime: run any artifact (or eager PyTorch) with the shared tokenizer.

Public API: ``load(spec)`` -> Backend, ``load_tokenizer(spec)``, ``generate``,
``SamplingConfig``, ``run_parity``. The CLI is ``python -m runtime``.
"""

from __future__ import annotations

import os

# torch's OpenMP pool fights XNNPACK's and ORT's threads; tiktoken must not try to download.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")

from runtime.backend import Backend, CacheOverflowError, load  # noqa: E402
from runtime.generate import SamplingConfig, generate  # noqa: E402


def load_tokenizer(spec):
    """The shared tokenizer for a recipe name, checkpoint folder, GGUF file or artifact directory."""
    from runtime.tokenizer import load_tokenizer as _load

    return _load(spec)


def run_parity(*args, **kwargs):
    from runtime.parity import run_parity as _run

    return _run(*args, **kwargs)


__all__ = ["Backend", "CacheOverflowError", "load", "load_tokenizer", "generate", "SamplingConfig", "run_parity"]
