"""Process environment defaults, set before torch, XNNPACK, ONNX Runtime or tiktoken load.

torch's OpenMP pool fights XNNPACK's and ONNX Runtime's threads (2-thread decode 231 -> 81
tok/s), and tiktoken must never reach for the network or a shared cache. Both only take
effect if set before those libraries are imported, hence at package import.
"""

from __future__ import annotations

import os

DEFAULTS = {"OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": ""}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
