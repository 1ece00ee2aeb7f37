"""Speed of any Backend, measured the same way for every target and peer.

Prefill tok/s on a fixed-length prompt, time to first token, decode tok/s over N greedy
steps, and the process's peak RSS. Prompts are token ids (a fixed pseudo-random sequence
from the tokenizer's plain vocabulary) so every backend sees the same work.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

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

    def to_dict(self):
        return asdict(self)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, min(vocab, 30000), size=n)]


def measure(backend: Backend, prompt_tokens: int = 64, decode_tokens: int = 128, runs: int = 3,
            name: str | None = None) -> BenchResult:
    """Median over ``runs`` (after one warm-up) of prefill and decode speed."""
    if prompt_tokens + decode_tokens > backend.max_seq_len:
        decode_tokens = max(1, backend.max_seq_len - prompt_tokens)
    vocab = getattr(backend, "vocab_size", 32000)
    ids = bench_prompt(prompt_tokens, vocab)
    prefill, decode, ttft = [], [], []
    for r in range(runs + 1):
        backend.reset()
        t0 = time.perf_counter()
        logits = backend.prefill(ids)
        nxt = int(np.argmax(logits))
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = int(np.argmax(backend.decode(nxt)))
        t2 = time.perf_counter()
        if r == 0:
            continue  # warm-up
        prefill.append(prompt_tokens / (t1 - t0))
        ttft.append((t1 - t0) * 1000)
        decode.append(decode_tokens / (t2 - t1))
    return BenchResult(name or getattr(backend, "name", "backend"), prompt_tokens, decode_tokens,
                       statistics.median(prefill), statistics.median(ttft), statistics.median(decode),
                       peak_rss_mb(), runs)


def table(results: list[BenchResult], title: str = "bench"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("backend", "prompt", "prefill tok/s", "TTFT ms", "decode tok/s", "peak RSS MB"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for r in results:
        t.add_row(r.name, str(r.prompt_tokens), f"{r.prefill_tok_s:.1f}", f"{r.ttft_ms:.1f}",
                  f"{r.decode_tok_s:.1f}", f"{r.peak_rss_mb:.0f}")
    return t
