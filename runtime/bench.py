"""Speed of any Backend, measured the same way for every target and peer.

Prefill tok/s on a fixed-length prompt, time to first token, decode tok/s over N greedy
steps, and the process's peak RSS. Prompts are token ids (a fixed pseudo-random sequence
from the tokenizer's plain vocabulary) so every backend sees the same work.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    """Peak RSS of this process. Linux: VmHWM, which belongs to the process's own address space;
    ru_maxrss also counts the pages of the parent it was forked from (a bench parent holding
    torch and a model makes every child look as large as itself)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


# Runs a script or ``-m module`` in a fresh interpreter and prints its peak RSS at exit.
# (Self-contained: importing the runtime here would count its own imports in the child's peak.)
_PEAK_WRAPPER = """
import atexit, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024.0
atexit.register(lambda: print('PEAK_RSS_MB', _peak(), flush=True))
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


def run_measured(args: list[str], cwd=None, env=None, python: str = sys.executable):
    """(CompletedProcess, wall seconds, peak RSS MB) of ``python ARGS`` (a script, -m module or -c code)."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = dict(env or os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t = time.time()
    p = subprocess.run([python, "-c", _PEAK_WRAPPER, *args], capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.time() - t
    peak = next((float(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("PEAK_RSS_MB ")),
                float("nan"))
    return p, wall, peak


def bench_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, min(vocab, 30000), size=n)]


def measure(backend: Backend, prompt_tokens: int = 64, decode_tokens: int = 128, runs: int = 3,
            name: str | None = None) -> BenchResult:
    """Median over ``runs`` (after one warm-up) of prefill and decode speed."""
    if prompt_tokens + decode_tokens > backend.max_seq_len:
        decode_tokens = max(1, backend.max_seq_len - prompt_tokens)
    vocab = backend.vocab_size
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
    return BenchResult(name or backend.name, prompt_tokens, decode_tokens,
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
