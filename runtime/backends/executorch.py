"""ExecuTorch ``.pte`` as a Backend, run by the wheel's pybindings (XNNPACK delegate inside).

The program has one method ``forward(tokens[1, T], input_pos[T]) -> logits[1, T, vocab]``
(T up to the manifest's ``dynamic_tokens``: longer calls are chunked) whose KV cache lives in
mutable buffers inside the loaded program, so this class only keeps the position; ``Backend``
refuses writes past the capacity before the program sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.backend import Backend, BackendOptions, Capabilities, register


def pool_size() -> int:
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    return int(_threadpool_get_thread_count())


def set_threads(n: int) -> None:
    """Size XNNPACK's (process-wide) threadpool. Only before loading a program: the XNNPACK
    delegates of a loaded program keep the pool they were built with, and resizing destroys
    it (a later call into that program would touch freed memory)."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if _threadpool_get_thread_count() != n:
        _unsafe_reset_threadpool(n)


def load_program(pte: Path, custom_ops: bool):
    """Register the kernels the program may need, then load it."""
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_4bit)

    if custom_ops:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::update_cache, custom_sdpa)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    return _load_for_executorch(str(pte))


@register
class ExecuTorchBackend(Backend):
    kind = "executorch"
    accepts = frozenset({"tokenizer", "threads"})

    def __init__(self, pte: Path, tokenizer, max_seq_len: int, vocab_size: int, name: str = "executorch",
                 threads: int | None = None, custom_ops: bool = False, activation_scheme: str | None = None,
                 config: dict[str, Any] | None = None, max_tokens: int | None = None):
        self.pte = Path(pte)
        self.max_tokens = max_tokens  # the program's largest T (its manifest's dynamic_tokens)
        self.activation_scheme = activation_scheme
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.windowed_from(config)
        self.name = name
        self.threads = threads
        if threads:
            set_threads(threads)
        self.program = load_program(self.pte, custom_ops)
        self._pool = pool_size()
        self._step_in = (torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long))
        self._step_np = tuple(t.numpy() for t in self._step_in)
        self.pos = 0

    def _forward(self, ids: list[int], start: int) -> np.ndarray:
        if pool_size() != self._pool:
            raise RuntimeError(f"{self.name}: the process-wide XNNPACK threadpool was resized from {self._pool} to "
                               f"{pool_size()} threads after this program was loaded, which invalidates it; load the "
                               f"artifact again (one thread count per process, or load after resizing)")
        if len(ids) == 1:  # a decode step: the preallocated inputs, rewritten through numpy views
            self._step_np[0][0, 0] = ids[0]
            self._step_np[1][0] = start
            tokens, pos = self._step_in
        else:
            tokens = torch.tensor([ids], dtype=torch.long)
            pos = torch.arange(start, start + len(ids), dtype=torch.long)
        # The program's outputs are cloned out of its planned memory (clone_outputs): ours to keep.
        return self.program.forward((tokens, pos))[0][0].numpy()

    @property
    def _max_chunk(self) -> int:
        return min(super()._max_chunk, self.max_tokens or self.max_seq_len)

    def _reset(self) -> None:
        """Nothing to clear: every slot at or after the new position is masked (portable) or not
        read (custom_sdpa reads 0..pos) until it has been rewritten."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(activation_scheme=self.activation_scheme, threads=True)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], tokenizer,
                      options: BackendOptions) -> "ExecuTorchBackend":
        et = manifest.get("executorch", {})
        return cls(directory / manifest["artifact"], tokenizer, int(manifest["max_seq_len"]),
                   int(manifest["vocab_size"]), name=manifest.get("name", "executorch"), threads=options.threads,
                   custom_ops=bool(et.get("custom_ops")), config=manifest.get("config"),
                   max_tokens=int(et["dynamic_tokens"][1]) if et.get("dynamic_tokens") else None,
                   # recorded since int8 weights (8da8w); older manifests: only 8da4w quantizes activations
                   activation_scheme=et.get("activation_scheme",
                                            "int8-token-asym" if et.get("linear_scheme") == "8da4w" else None))
