"""Speed of any Backend, measured the same way for every target and peer.

Prefill tok/s on a fixed-length prompt, time to first token, decode tok/s over N greedy
steps, and the process's peak RSS. Prompts are token ids (a fixed pseudo-random sequence
from the tokenizer's plain vocabulary) so every backend sees the same work.

There is one per-token timing loop, ``measure_calls`` (prefill and decode given as callables, so
a peer runtime that is not a Backend is timed by the same code; ``measure`` is it on a Backend;
speculation, which decodes several tokens a call, is timed through ``generate`` by
``runtime.generate.measure_generation`` into the same ``BenchResult``), and
one peak-RSS reading, ``peak_rss_mb`` (``run_measured`` reports it for a child process). This
module imports only the standard library, numpy and ``edgellm.memory`` (standard library only)
at load time, so a peer's own virtualenv can load this file by path
(``importlib.util.spec_from_file_location``, registered in ``sys.modules`` for its dataclass,
with the repository root on ``sys.path``) without torch or the rest of edgellm.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgellm.memory import peak_rss_mb

if TYPE_CHECKING:  # not imported at run time: see the module docstring
    from runtime.backend import Backend


@dataclass
class BenchResult:
    name: str
    prompt_tokens: int
    decode_tokens: int
    prefill_tok_s: float
    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float
    runs: int
    speculate: int = 0  # prompt-lookup drafts per step (0: plain decoding); decode_tok_s is then effective
    acceptance_rate: float | None = None  # drafts accepted / drafted, with speculate

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "BenchResult":
        """From ``to_dict()`` output (keys it does not know are ignored, missing optional ones default)."""
        given = {**d, **overrides}
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


# Runs a script, ``-m module`` or ``-c code`` in a fresh interpreter and prints its peak RSS at
# exit. Self-contained (importing the runtime here would count its own imports in the child's
# peak): ``run_measured`` prepends the source of ``peak_rss_mb`` itself, the one definition.
_PEAK_WRAPPER = """
import atexit, runpy
atexit.register(lambda: print('PEAK_RSS_MB', peak_rss_mb(), flush=True))
args = sys.argv[1:]
if args[0] == '-c':
    sys.argv = ['-c', *args[2:]]
    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
elif args[0] == '-m':
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name='__main__', alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name='__main__')
"""


def _peak_wrapper() -> str:
    import inspect

    return "import resource, sys\n" + inspect.getsource(peak_rss_mb) + _PEAK_WRAPPER


def run_measured(args: list[str], cwd=None, env=None, python: str = sys.executable):
    """(CompletedProcess, wall seconds, peak RSS MB) of ``python ARGS`` (a script, -m module or -c code)."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = dict(env or os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t = time.time()
    p = subprocess.run([python, "-c", _peak_wrapper(), *args], capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.time() - t
    peak = next((float(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("PEAK_RSS_MB ")),
                float("nan"))
    return p, wall, peak


def read_bandwidth_gbs(threads: int = 1, megabytes: int = 1024, repeats: int = 5) -> float:
    """The machine's sustained read bandwidth (GB/s) at ``threads``: the best of ``repeats``
    vectorized sums over a buffer far larger than the caches (torch's, which reads at the memory
    bus's speed where numpy's pairwise sum is compute-bound at ~7 GB/s here). A decode step
    reads every weight once, so artifact bytes / this bounds its speed. Imports torch when called."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            float(a.sum())
            best = max(best, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def bench_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, min(vocab, 30000), size=n)]


def measure_calls(prefill: Callable[[list[int]], Any], decode: Callable[[Any], Any], ids: list[int],
                  decode_tokens: int, runs: int = 3, name: str = "runtime", reset: Callable[[], Any] | None = None,
                  warmup: int = 1) -> BenchResult:
    """The timing loop: after ``warmup`` untimed runs, the median over ``runs`` of the prefill of
    ``ids`` (``prefill(ids)``, which returns what the first ``decode`` takes, e.g. the greedy next
    token) and of ``decode_tokens`` chained ``decode`` steps (each returns the next one's input).
    ``reset()`` runs before every run, untimed. For a Backend use ``measure``; this is for
    anything else (a peer runtime's own API, a raw program)."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    prefill_s, decode_s = [], []
    for r in range(warmup + runs):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        x = prefill(ids)
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            x = decode(x)
        t2 = time.perf_counter()
        if r >= warmup:
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    n = len(ids)
    return BenchResult(name, n, decode_tokens,
                       statistics.median(n / s for s in prefill_s), statistics.median(s * 1000 for s in prefill_s),
                       statistics.median(decode_tokens / s for s in decode_s) if decode_tokens else float("nan"),
                       peak_rss_mb(), runs)


def check_room(backend: Backend, prompt_tokens: int, decode_tokens: int) -> None:
    """A bench run fits the backend's cache (never silently clamped)."""
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError(f"bench needs at least one prompt and one decode token, got {prompt_tokens} and {decode_tokens}")
    if backend.ring is None and prompt_tokens + decode_tokens > backend.max_seq_len:  # a window has no end
        raise ValueError(f"{prompt_tokens} prompt + {decode_tokens} decode tokens exceed {backend.name}'s KV cache "
                         f"of {backend.max_seq_len}; lower --prompt-tokens/--decode-tokens")


def measure(backend: Backend, prompt_tokens: int = 64, decode_tokens: int = 128, runs: int = 3,
            name: str | None = None, warmup: int = 1) -> BenchResult:
    """Median over ``runs`` (after ``warmup`` untimed ones) of prefill and greedy decode speed."""
    check_room(backend, prompt_tokens, decode_tokens)
    ids = bench_prompt(prompt_tokens, backend.vocab_size)
    return measure_calls(lambda prompt: int(np.argmax(backend.prefill(prompt))),
                         lambda tok: int(np.argmax(backend.decode(tok))),
                         ids, decode_tokens, runs, name or backend.name, reset=backend.reset, warmup=warmup)


def table(results: list[BenchResult], title: str = "bench", extra: dict[str, list[str]] | None = None):
    """A rich table of ``results``; ``extra`` adds columns (name -> one cell per result) after the first."""
    from rich.table import Table

    extra = extra or {}
    t = Table(title=title)
    for col in ("backend", *extra, "prompt", "prefill tok/s", "TTFT ms", "decode tok/s", "peak RSS MB"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for i, r in enumerate(results):
        t.add_row(r.name, *(str(cells[i]) for cells in extra.values()), str(r.prompt_tokens),
                  f"{r.prefill_tok_s:.1f}", f"{r.ttft_ms:.1f}", f"{r.decode_tok_s:.1f}", f"{r.peak_rss_mb:.0f}")
    return t
