"""The Backend protocol every runtime implements, and ``load(spec)`` that picks one.

A backend owns one model with a static KV cache and a position counter. ``prefill(ids)``
appends ids at the current position and returns the float32 logits of the last one;
``decode(id)`` appends one; ``reset()`` empties the cache. Generation, parity and bench are
written once against this protocol. SPEC is an artifact directory, or
``eager:RECIPE_OR_CHECKPOINT[:int4]`` for eager PyTorch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Artifact target -> "module:Class" of its backend (a new target adds one line here).
BACKENDS = {
    "executorch": "runtime.executorch_backend:ExecuTorchBackend",
    "onnx": "runtime.onnx_backend:OnnxBackend",
    "coreml": "runtime.coreml_backend:CoreMLBackend",
}


class CacheOverflowError(ValueError):
    """Prompt + generation would write past the static KV cache."""


@runtime_checkable
class Backend(Protocol):
    name: str
    tokenizer: Any
    max_seq_len: int

    def prefill(self, ids: list[int]) -> np.ndarray: ...

    def decode(self, id: int) -> np.ndarray: ...

    def reset(self) -> None: ...


class CachedBackend:
    """Position bookkeeping and cache-capacity errors shared by all backends.

    Subclasses implement ``_forward(ids, start) -> float32 [len(ids), vocab]`` (logits of every
    position, or at least the last row) and ``_reset()``; ``_max_chunk`` limits how many
    tokens one call may take (a dynamic-shape export allows at most capacity - 1).
    """

    name = "backend"
    tokenizer: Any = None
    max_seq_len: int = 0
    pos: int = 0
    # The int8 dynamic activation quantization this runtime applies in front of its int4
    # linears (a name from export.quantize.ACTIVATION_SCHEMES), or None: parity builds its
    # eager reference with the same arithmetic so that it measures what the artifact adds.
    activation_quantization: str | None = None

    def _forward(self, ids: list[int], start: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def _max_chunk(self) -> int:
        return self.max_seq_len - 1

    def _check_room(self, n: int) -> None:
        if n <= 0:
            raise ValueError("prefill needs at least one token id")
        if self.pos + n > self.max_seq_len:
            raise CacheOverflowError(
                f"{self.name}: writing {n} token(s) at position {self.pos} exceeds the KV cache capacity "
                f"{self.max_seq_len}; shorten the prompt/generation or re-export with a larger --max-seq-len")

    def forward_all(self, ids: list[int]) -> np.ndarray:
        """Logits for every one of ``ids`` (appended at the current position), chunked as needed."""
        ids = [int(i) for i in ids]
        self._check_room(len(ids))
        vocab_rows = self._vocab_rows()
        for i in ids:
            if not 0 <= i < vocab_rows:
                raise ValueError(f"token id {i} is outside the model's vocabulary [0, {vocab_rows})")
        outs = []
        for s in range(0, len(ids), self._max_chunk):
            chunk = ids[s:s + self._max_chunk]
            outs.append(np.asarray(self._forward(chunk, self.pos), dtype=np.float32).reshape(len(chunk), -1))
            self.pos += len(chunk)
        return np.concatenate(outs, axis=0)

    def _vocab_rows(self) -> int:
        return getattr(self, "vocab_size", 1 << 62)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.forward_all(ids)[-1]

    def decode(self, id: int) -> np.ndarray:
        return self.forward_all([id])[-1]

    def reset(self) -> None:
        self._reset()
        self.pos = 0


def parse_spec(spec: str) -> tuple[str, str | None, bool]:
    """``eager:NAME[:int4]`` -> ("eager", NAME, int4?); a path -> ("artifact", path, False)."""
    if spec.startswith("eager:") or spec == "eager":
        rest = spec[len("eager:"):] if spec != "eager" else ""
        int4 = False
        if rest.endswith(":int4"):
            rest, int4 = rest[: -len(":int4")], True
        elif rest.endswith(":fp32") or rest.endswith(":none"):
            rest = rest.rsplit(":", 1)[0]
        return "eager", rest or None, int4
    return "artifact", spec, False


def load(spec: str, **options) -> Backend:
    """A Backend for SPEC: an artifact directory or ``eager:RECIPE_OR_CHECKPOINT[:int4]``."""
    kind, what, int4 = parse_spec(str(spec))
    if kind == "eager":
        from runtime.eager_backend import EagerBackend

        return EagerBackend.from_spec(what, int4=int4, **options)
    from runtime.artifact import read_manifest

    manifest = read_manifest(what)
    target = manifest.get("target")
    if target not in BACKENDS:
        raise ValueError(f"{what}: unknown artifact target {target!r}; known: {', '.join(BACKENDS)}")
    mod_name, cls_name = BACKENDS[target].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise ValueError(f"the {target} backend is not available in this edgellm build") from None
        raise
    return getattr(mod, cls_name).from_artifact(Path(what), manifest, **options)
