"""One generation loop over any Backend: greedy or sampled, streaming, cache-aware.

Sampling order follows common practice (HF, llama.cpp): repetition penalty on the raw
logits, then temperature, top-k, top-p, then a draw from a seeded generator, so the same
seed gives the same text on every backend whose logits agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgellm import checks
from runtime.backend import Backend, CacheOverflowError


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


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, seen: list[int]) -> int:
    """Choose the next token id from float logits [vocab]."""
    logits = _apply_repetition_penalty(np.asarray(logits, dtype=np.float64), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(np.argmax(logits))
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
    return int(rng.choice(probs.size, p=probs))


def generate(backend: Backend, prompt: str | list[int], cfg: SamplingConfig | None = None, *,
             on_text: Callable[[str], None] | None = None, chat: bool = False,
             add_bos: bool = False) -> GenerationResult:
    """Generate from ``prompt`` (text or ids). ``on_text`` receives decoded text as it streams.

    Raises CacheOverflowError before running anything if prompt + max_new_tokens exceed the cache.
    """
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
    if len(ids) > backend.max_seq_len or need - 1 > backend.max_seq_len:
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
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, rng, seen)
        out.append(nxt)
        seen.append(nxt)
        if cfg.stop_at_eos and nxt in eos:
            stopped = "eos"
            break
        if stream is not None:
            piece = stream.push(nxt)
            if piece:
                on_text(piece)
        if i + 1 < cfg.max_new_tokens:
            logits = backend.decode(nxt)
    t2 = time.perf_counter()
    if stream is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
    body = [t for t in out if t not in eos] if cfg.stop_at_eos else out
    text = tok.decode(body) if tok is not None else ""
    return GenerationResult(ids, out, text, t1 - t0, t2 - t1, stopped)
