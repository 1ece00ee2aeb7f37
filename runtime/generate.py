"""One generation loop over any Backend: greedy or sampled, streaming, cache-aware.

Sampling order follows common practice (HF, llama.cpp): repetition penalty on the raw
logits, then temperature, top-k, top-p, then a draw from a seeded generator, so the same
seed gives the same text on every backend whose logits agree.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgellm import checks
from edgellm.memory import peak_rss_mb
from runtime.backend import Backend, CacheOverflowError
from runtime.bench import BenchResult, check_room
from runtime.speculate import SpeculationStats, draft, verify


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int = 0
    eos_ids: list[int] | None = None  # None = the tokenizer's
    stop_at_eos: bool = True

    def __post_init__(self):
        self.max_new_tokens = checks.integer(self.max_new_tokens, "max_new_tokens", 1)
        self.temperature = checks.number(self.temperature, "temperature", 0, fix="0 is greedy")
        self.top_k = checks.integer(self.top_k, "top_k", 0, fix="0 turns it off")
        self.top_p = checks.number(self.top_p, "top_p", 0, 1, lo_open=True, fix="1 turns it off")
        self.repetition_penalty = checks.number(self.repetition_penalty, "repetition_penalty", 0, lo_open=True,
                                                fix="1 turns it off")
        self.seed = checks.integer(self.seed, "seed", 0, 2**32 - 1)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    stopped: str  # "eos" | "length"
    timings: dict = field(default_factory=dict)
    speculation: dict | None = None  # with speculate=k: k, drafted, accepted, forwards, acceptance_rate

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tok_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_s if self.decode_s and n else float("nan")


def _apply_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    if penalty == 1.0 or not seen:
        return logits
    logits = logits.copy()
    idx = np.unique(np.asarray(seen))
    vals = logits[idx]
    logits[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def next_distribution(logits: np.ndarray, cfg: SamplingConfig, seen: list[int]) -> tuple[np.ndarray | None, int]:
    """(probabilities after penalty, temperature, top-k and top-p, or None when greedy; the
    greedy choice, or -1 when sampling)."""
    logits = _apply_repetition_penalty(np.asarray(logits, dtype=np.float64), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return None, int(np.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size:
        kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = cum - probs[order] < cfg.top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs, -1


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, seen: list[int]) -> int:
    """Choose the next token id from float logits [vocab]."""
    probs, choice = next_distribution(logits, cfg, seen)
    return choice if probs is None else int(rng.choice(probs.size, p=probs))


def generate(backend: Backend, prompt: str | list[int], cfg: SamplingConfig | None = None, *,
             on_text: Callable[[str], None] | None = None, chat: bool = False,
             add_bos: bool = False, speculate: int = 0) -> GenerationResult:
    """Generate from ``prompt`` (text or ids). ``on_text`` receives decoded text as it streams.
    ``speculate=k`` drafts up to k tokens a step by prompt lookup and verifies them in one
    forward (``runtime.speculate``): greedy output is token-identical, sampling keeps its
    distribution; the result's ``speculation`` holds the acceptance figures.

    Raises CacheOverflowError before running anything if prompt + max_new_tokens exceed a plain
    cache; a windowed one (``Backend.ring``) goes on past its capacity, speculating only until its
    ring first wraps (a rejected draft must not overwrite a slot the window still reads).
    """
    speculate = checks.integer(speculate, "speculate", 0, 64, fix="0 turns speculation off")
    cfg = cfg or SamplingConfig()
    tok = backend.tokenizer
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages) if chat else tok.encode(prompt)
        if add_bos and tok.bos_id is not None:
            ids = [tok.bos_id] + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    need = len(ids) + cfg.max_new_tokens
    # The last generated token is never fed back, so capacity + 1 total tokens fit.
    if backend.ring is None and (len(ids) > backend.max_seq_len or need - 1 > backend.max_seq_len):
        raise CacheOverflowError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the KV cache "
            f"capacity {backend.max_seq_len}; shorten the prompt, lower --max-new-tokens, or re-export "
            f"with a larger --max-seq-len")
    eos = set(cfg.eos_ids if cfg.eos_ids is not None else (tok.eos_ids if tok is not None else []))
    rng = np.random.default_rng(cfg.seed)
    stream = tok.stream_decoder() if (tok is not None and on_text) else None
    backend.reset()
    t0 = time.perf_counter()
    logits = backend.prefill(ids)
    t1 = time.perf_counter()
    out: list[int] = []
    stopped = "length"
    seen = list(ids)
    stats = SpeculationStats(speculate) if speculate else None

    def emit(t: int) -> bool:
        """Append ``t``; True when generation stops here."""
        nonlocal stopped
        out.append(t)
        seen.append(t)
        if cfg.stop_at_eos and t in eos:
            stopped = "eos"
            return True
        if stream is not None:
            piece = stream.push(t)
            if piece:
                on_text(piece)
        return len(out) >= cfg.max_new_tokens

    forced = None  # the token a rejected draft's verification already chose
    while True:
        nxt = forced if forced is not None else sample_next(logits, cfg, rng, seen)
        forced = None
        if emit(nxt):
            break
        room = min(stats.length, cfg.max_new_tokens - len(out) - 1, backend.max_seq_len - backend.pos - 1) \
            if stats is not None else 0
        drafts = draft(seen, room) if room > 0 else []
        if not drafts:
            logits = backend.decode(nxt)
            continue
        start = backend.pos
        rows = backend.forward_all([nxt] + drafts)  # rows[i]: the distribution after ([nxt] + drafts)[i]
        done, n_ok = False, 0
        for j, d in enumerate(drafts):
            probs, choice = next_distribution(rows[j], cfg, seen)
            accepted, token = verify(probs, choice, d, rng)
            if not accepted:
                backend.rewind(start + 1 + j)  # nxt and the j accepted drafts stay in the cache
                forced = token
                break
            n_ok += 1
            if emit(d):
                done = True
                break
        else:
            logits = rows[len(drafts)]
        stats.update(len(drafts), n_ok)
        if done:
            break
    t2 = time.perf_counter()
    if stream is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
    body = [t for t in out if t not in eos] if cfg.stop_at_eos else out
    text = tok.decode(body) if tok is not None else ""
    return GenerationResult(ids, out, text, t1 - t0, t2 - t1, stopped,
                            speculation=stats.to_dict() if stats is not None else None)


def measure_generation(backend: Backend, ids: list[int], decode_tokens: int, runs: int = 3, speculate: int = 0,
                       name: str | None = None, warmup: int = 1) -> BenchResult:
    """``bench`` through this loop (greedy, eos ignored), for speculation: median prefill and
    effective decode tok/s (generated tokens after the first over the decode time) over ``runs``
    after ``warmup``, with the acceptance rate of the last run."""
    check_room(backend, len(ids), decode_tokens)
    cfg = SamplingConfig(max_new_tokens=decode_tokens + 1, stop_at_eos=False)
    prefill, decode, res = [], [], None
    for r in range(warmup + runs):
        res = generate(backend, ids, cfg, speculate=speculate)
        if r >= warmup:
            prefill.append(res.prefill_s)
            decode.append(res.decode_s)
    n = len(ids)
    rate = res.speculation["acceptance_rate"] if res.speculation else None
    return BenchResult(name or backend.name, n, decode_tokens, statistics.median(n / s for s in prefill),
                       statistics.median(s * 1000 for s in prefill), statistics.median(decode_tokens / s for s in decode),
                       peak_rss_mb(), runs, speculate, rate)
