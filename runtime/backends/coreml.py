"""Core ML artifacts as a Backend: Core ML itself on macOS, the MIL reference interpreter elsewhere.

The package takes ``tokens int32[1, T]`` and ``input_pos int32[T]`` (T in 1 … capacity-1) and
returns fp16 logits for every position; the KV cache lives in Core ML states, created by
``make_state`` and replaced by a fresh one on ``reset``. On Linux no Apple runtime exists, so
``runtime.mil_interpreter`` executes the same saved program in numpy (slow, exact).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backend import Backend, BackendOptions, register
from runtime.inspect import inspect_coreml
from runtime.mil_interpreter import MILInterpreter

ENGINES = ("auto", "coreml", "interpreter")


@register
class CoreMLBackend(Backend):
    kind = "coreml"
    accepts = frozenset({"tokenizer", "engine"})

    def __init__(self, package: Path, manifest: dict[str, Any], tokenizer=None, engine: str = "auto",
                 compute_units: str = "ALL"):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        if engine == "auto":
            engine = "coreml" if sys.platform == "darwin" else "interpreter"
        if engine == "coreml" and sys.platform != "darwin":
            raise ValueError("the Core ML runtime exists only on macOS; use engine='interpreter' on this platform")
        self.engine = engine
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.max_seq_len = int(manifest["max_seq_len"])
        self.vocab_size = int(manifest["vocab_size"])
        self.windowed_from(manifest.get("config"))
        self.name = f"coreml[{engine}]:{manifest.get('name', package.parent.name)}"
        self.pos = 0
        if engine == "coreml":
            import coremltools as ct

            self._model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))
            self._state = self._model.make_state()
        else:
            self._interp = MILInterpreter(package)

    @classmethod
    def inspect_model(cls, path: Path) -> dict[str, Any]:
        return inspect_coreml(path)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], tokenizer,
                      options: BackendOptions) -> "CoreMLBackend":
        """``manifest`` comes from ``edgellm.artifact.read_manifest`` (hashes already verified)."""
        package = directory / manifest["artifact"]
        if not package.is_dir():
            raise ValueError(f"{directory}: {manifest['artifact']} is missing; re-export with python -m export --target coreml")
        return cls(package, manifest, tokenizer=tokenizer, engine=options.engine)

    def _forward(self, ids: list[int], start: int) -> np.ndarray:
        feed = {"tokens": np.asarray([ids], dtype=np.int32),
                "input_pos": np.arange(start, start + len(ids), dtype=np.int32)}
        if self.engine == "coreml":
            out = self._model.predict(feed, state=self._state)
        else:
            out = self._interp.predict(feed)
        return np.asarray(out["logits"], dtype=np.float32)[0]

    def _reset(self) -> None:
        if self.engine == "coreml":
            self._state = self._model.make_state()
        else:
            self._interp.reset()
