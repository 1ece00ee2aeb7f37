"""edgellm runtime: run any artifact (or eager PyTorch) with the shared tokenizer.

Public API: ``load(spec)`` -> Backend, ``load_tokenizer(spec)``, ``generate``,
``SamplingConfig``, ``run_parity``. The CLI is ``python -m runtime``.
"""

from __future__ import annotations

import edgellm  # noqa: F401  (environment defaults before torch, XNNPACK or ORT load)
from edgellm.tokenizer import load_tokenizer
from runtime.backend import Backend, BackendOptions, CacheOverflowError, Capabilities, load
from runtime.generate import SamplingConfig, generate
from runtime.parity import run_parity

__all__ = ["Backend", "BackendOptions", "Capabilities", "CacheOverflowError", "load", "load_tokenizer", "generate",
           "SamplingConfig", "run_parity"]
