"""The Backend contract every runtime implements, its options and capabilities, and ``load(spec)``.

A backend owns one model with a static KV cache and a position counter. ``prefill(ids)``
appends ids at the current position and returns the float32 logits of the last one;
``decode(id)`` appends one; ``forward_all(ids)`` returns every position's logits; ``reset()``
empties the cache; ``rewind(pos)`` forgets the positions from ``pos`` on. Generation, parity and bench are written once against this class and read
what a backend can do from its declared ``Capabilities``, never by probing attributes.

Backends live one module each in ``runtime/backends/`` (named after the artifact target they
run, plus ``eager``) and register with ``@register``; ``load`` imports the one a manifest
names. SPEC is an artifact directory, or ``eager:RECIPE_OR_CHECKPOINT[:int4]`` for eager
PyTorch. Every backend takes one ``BackendOptions``; an option a backend does not take is an
error naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgellm import checks
from edgellm.artifact import dir_size, read_manifest
from edgellm.plugins import Registry
from edgellm.tokenizer import Tokenizer
from runtime import backends


class CacheOverflowError(ValueError):
    """Prompt + generation would write past the static KV cache."""


@dataclass(frozen=True)
class Capabilities:
    # The int8 dynamic activation quantization the runtime applies in front of its int4 linears
    # (a name from edgellm.quantization.ACTIVATION_SCHEMES), or None: parity builds its eager
    # reference with the same arithmetic, so that it measures what the artifact adds.
    activation_scheme: str | None = None
    perturbation: bool = False  # can run perturbed (``perturbed(eps)``): measures parity's noise floor
    full_sequence: bool = True  # one call returns the logits of every position it was given
    threads: bool = False  # honours BackendOptions.threads
    # Every call costs the whole model whatever its length (a streamed reference dequantizes
    # each weight per call): parity measures its noise floor in one teacher-forced pass.
    whole_model_per_call: bool = False


@dataclass(frozen=True)
class BackendOptions:
    """Options any backend may take; each backend lists those it uses in ``accepts``."""

    threads: int | None = None  # intra-op threads of the runtime
    tokenizer: Tokenizer | None = None  # default: the artifact's own tokenizer files
    accuracy_level: int | None = None  # ONNX MatMulNBits compute mode (0/1 exact, 4 int8 activations)
    engine: str = "auto"  # Core ML: "coreml" (macOS) or "interpreter" (the MIL reference interpreter)
    max_seq_len: int | None = None  # eager: cache capacity
    seed: int = 0  # eager: random weights of a recipe without a checkpoint
    n_layers: int | None = None  # eager: truncated depth

    def __post_init__(self):
        if self.threads is not None:
            object.__setattr__(self, "threads", checks.threads(self.threads, "threads"))
        if self.max_seq_len is not None:
            object.__setattr__(self, "max_seq_len", checks.integer(self.max_seq_len, "max_seq_len", 2))
        if self.n_layers is not None:
            object.__setattr__(self, "n_layers", checks.integer(self.n_layers, "n_layers", 1))
        object.__setattr__(self, "seed", checks.integer(self.seed, "seed", 0))

    def given(self) -> set[str]:
        """Names of the options set to something other than their default."""
        return {f.name for f in fields(self) if getattr(self, f.name) != f.default}


class Backend(ABC):
    """Position bookkeeping, input checks and cache-capacity errors shared by all backends.

    Subclasses implement ``_forward(ids, start) -> float32 [len(ids), vocab]`` and ``_reset()``;
    ``_max_chunk`` limits how many tokens one call may take (a dynamic-shape export allows at
    most capacity - 1).
    """

    kind: ClassVar[str]  # the artifact target it runs ("eager" for PyTorch)
    accepts: ClassVar[frozenset[str]] = frozenset({"tokenizer"})
    name: str = "backend"
    tokenizer: Tokenizer
    max_seq_len: int
    vocab_size: int
    pos: int = 0
    # A windowed cache (``KVCacheConfig``): its ring's slot count (positions then grow without bound,
    # the oldest past the sinks leaving the window) and its sinks; None = the plain static cache.
    ring: int | None = None
    sinks: int = 0

    def windowed_from(self, config: dict[str, Any]) -> None:
        """Take the window of a manifest's (or a model's) resolved config."""
        kv = (config or {}).get("kv_cache") or {}
        if kv.get("window") is not None:
            self.ring, self.sinks = int(kv["window"]) - int(kv.get("sinks", 0)), int(kv.get("sinks", 0))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @classmethod
    @abstractmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], tokenizer: Tokenizer,
                      options: BackendOptions) -> "Backend":
        """The backend for a verified artifact (its tokenizer already resolved)."""

    @classmethod
    def inspect_model(cls, path: Path) -> dict[str, Any]:
        """Structural facts about an artifact's model file (``python -m runtime inspect``)."""
        return {"kind": cls.kind, "file": str(path), "size_bytes": dir_size(path)}

    @abstractmethod
    def _forward(self, ids: list[int], start: int) -> np.ndarray: ...

    @abstractmethod
    def _reset(self) -> None: ...

    @property
    def _max_chunk(self) -> int:
        if self.ring is not None:  # edgellm.config.ModelConfig.max_chunk
            return max(1, min(self.max_seq_len - 1, self.ring // 4))
        return self.max_seq_len - 1

    def _check_room(self, n: int) -> None:
        if n <= 0:
            raise ValueError("prefill needs at least one token id")
        if self.ring is None and self.pos + n > self.max_seq_len:
            raise CacheOverflowError(
                f"{self.name}: writing {n} token(s) at position {self.pos} exceeds the KV cache capacity "
                f"{self.max_seq_len}; shorten the prompt/generation or re-export with a larger --max-seq-len")

    def _checked(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        self._check_room(len(ids))
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        return ids

    @staticmethod
    def _rows(x, n: int) -> np.ndarray:
        """``_forward``'s result as float32 [n, vocab]: a view when it already is one (no copy)."""
        if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2:
            return x
        return np.asarray(x, dtype=np.float32).reshape(n, -1)

    def _forward_last(self, ids: list[int], start: int) -> np.ndarray:
        """The float32 [vocab] logits of the last of ``ids`` only: a backend whose model can
        skip the other rows' head (ONNX ``logits_from``) overrides it."""
        return self._rows(self._forward(ids, start), len(ids))[-1]

    def forward_all(self, ids: list[int]) -> np.ndarray:
        """Logits for every one of ``ids`` (appended at the current position), chunked as needed."""
        outs = [self._rows(self._forward(chunk, start), len(chunk)) for chunk, start in self._calls(self._checked(ids))]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)  # one call (every decode step): as it is

    def _calls(self, ids: list[int]):
        """(chunk, start) for each call ``ids`` take, the position moving past a chunk once the
        caller asks for the next one (a call that raises leaves it where it was)."""
        s = 0
        while s < len(ids):
            chunk = ids[s:s + self._chunk_len()]
            yield chunk, self.pos
            self.pos += len(chunk)
            s += len(chunk)

    def _chunk_len(self) -> int:
        """Most tokens the next call at ``pos`` takes: ``_max_chunk``, and in a windowed cache no
        more than the slots left before the ring wraps. Every runtime chunks alike (the native
        runner and the browser engine too): in a window the chunking decides what a query sees
        (a call's later tokens overwrite slots its earlier ones would have read), and a call's
        slots are then contiguous, which a cache written as one slice (Core ML states) needs."""
        if self.ring is None:
            return self._max_chunk
        slot = self.pos if self.pos < self.sinks else self.sinks + (self.pos - self.sinks) % self.ring
        return min(self._max_chunk, self.sinks + self.ring - slot)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """The last id's logits; the other rows are never asked for (a backend may skip them)."""
        for chunk, start in self._calls(self._checked(ids)):
            last = self._forward_last(chunk, start)
        return last

    def decode(self, id: int) -> np.ndarray:
        return self.forward_all([id])[-1]

    def reset(self) -> None:
        self._reset()
        self.pos = 0

    def rewind(self, pos: int) -> None:
        """Forget every position at or after ``pos`` (a rejected speculative draft). Nothing is
        copied: each backend reads only the slots below its position, and the next call
        rewrites them."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"{self.name}: cannot rewind to position {pos} from {self.pos}")
        self.pos = pos


_REGISTRY: Registry[type[Backend]] = Registry(backends.__name__, "backend")


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: ``cls`` runs artifacts whose manifest target is ``cls.kind``."""
    return _REGISTRY.add(cls.kind, cls)


def kinds() -> list[str]:
    return _REGISTRY.names()


def backend_class(kind: str) -> type[Backend]:
    return _REGISTRY.get(kind, f"no backend runs {kind!r} artifacts")


def check_options(cls: type[Backend], options: BackendOptions) -> None:
    extra = sorted(options.given() - cls.accepts)
    if extra:
        raise ValueError(f"the {cls.kind} backend does not take {', '.join(extra)}; "
                         f"it takes: {', '.join(sorted(cls.accepts))}")


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


def spec_class(spec: str) -> type[Backend]:
    """The backend class that would run SPEC (reads the manifest, loads nothing)."""
    kind, what, _ = parse_spec(str(spec))
    return backend_class("eager" if kind == "eager" else str(read_manifest(what, verify=False).get("target")))


def load(spec: str, options: BackendOptions | None = None, **kw) -> Backend:
    """A Backend for SPEC: an artifact directory or ``eager:RECIPE_OR_CHECKPOINT[:int4]``.
    Options come as a ``BackendOptions`` or as its fields by keyword."""
    options = options or BackendOptions(**kw)
    kind, what, int4 = parse_spec(str(spec))
    if kind == "eager":
        cls = backend_class("eager")
        check_options(cls, options)
        return cls.from_spec(what, int4=int4, options=options)
    manifest = read_manifest(what)
    cls = backend_class(str(manifest.get("target")))
    check_options(cls, options)
    directory = Path(what)
    tokenizer = options.tokenizer or Tokenizer.load(directory)
    return cls.from_artifact(directory, manifest, tokenizer, options)
