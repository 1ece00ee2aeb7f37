"""The one parity harness: any backend against a reference backend, on the same ids.

Teacher-forced (both see the same tokens): per step max |Δlogit|, that relative to
max |reference logit|, top-1 agreement and KL(reference ‖ candidate). Free-running: the
common prefix of greedy generations. And perplexity of each on a text. Agreement figures
mean something only on trained weights; on random weights read the |Δlogit| columns.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backend import Backend

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class StepStats:
    max_abs: np.ndarray
    rel: np.ndarray
    top1: np.ndarray
    kl: np.ndarray

    @property
    def top1_rate(self) -> float:
        return float(self.top1.mean()) if self.top1.size else float("nan")

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if self.kl.size else float("nan")

    @property
    def max_rel(self) -> float:
        return float(self.rel.max()) if self.rel.size else float("nan")

    @property
    def max_abs_all(self) -> float:
        return float(self.max_abs.max()) if self.max_abs.size else float("nan")

    def extend(self, other: "StepStats") -> "StepStats":
        return StepStats(*(np.concatenate([a, b]) for a, b in
                           ((self.max_abs, other.max_abs), (self.rel, other.rel),
                            (self.top1, other.top1), (self.kl, other.kl))))


def compare_logits(cand: np.ndarray, ref: np.ndarray) -> StepStats:
    """Per-row statistics for logits [steps, vocab] (reference first in the KL)."""
    cand, ref = np.atleast_2d(cand).astype(np.float64), np.atleast_2d(ref).astype(np.float64)
    diff = np.abs(cand - ref).max(axis=-1)
    scale = np.abs(ref).max(axis=-1)
    lr, lc = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    return StepStats(diff, diff / np.maximum(scale, 1e-30), cand.argmax(-1) == ref.argmax(-1), np.maximum(kl, 0.0))


def all_logits(backend: Backend, ids: list[int], prompt_len: int) -> np.ndarray:
    """Prefill ``ids[:prompt_len]`` then feed the rest one token at a time (teacher-forced)."""
    backend.reset()
    rows = [backend.prefill(ids[:prompt_len])]
    for t in ids[prompt_len:-1]:
        rows.append(backend.decode(t))
    return np.stack(rows)


def teacher_forced(candidate: Backend, reference: Backend, ids: list[int], prompt_len: int | None = None) -> StepStats:
    """Both backends see ``ids``; compare the logits after the prompt and after every later token."""
    prompt_len = prompt_len or max(1, len(ids) // 2)
    return compare_logits(all_logits(candidate, ids, prompt_len), all_logits(reference, ids, prompt_len))


def noise_floor(reference: Backend, ids: list[int], prompt_len: int, ref_logits: np.ndarray | None = None,
                eps: float = 1e-7) -> StepStats | None:
    """The reference against itself with its embeddings perturbed by a relative ``eps`` (float
    rounding), teacher-forced on ``ids``; None if the reference cannot be perturbed (not eager).

    With int8 dynamic activations (8da4w, MatMulNBits accuracy_level 4) a trained model is
    chaotic: any implementation that differs by one rounding somewhere ends up this far from
    the reference, so agreement figures are judged against this floor (see README).

    A reference whose every call costs the whole model (a streamed 7B: each step dequantizes
    every weight) is perturbed in one teacher-forced pass instead of step by step, when the ids
    fit one call: the batched arithmetic is one more rounding-sized change, which is what the
    floor measures, and the 7B floor costs one call a prompt instead of one a step."""
    caps = reference.capabilities
    if not caps.perturbation:
        return None
    if ref_logits is None:
        ref_logits = all_logits(reference, ids, prompt_len)
    with reference.perturbed(eps):
        reference.reset()
        if caps.whole_model_per_call and caps.full_sequence and len(ids) - 1 <= reference._chunk_len():
            moved = reference.forward_all(ids[:-1])[prompt_len - 1:]
        else:
            moved = all_logits(reference, ids, prompt_len)
    return compare_logits(moved, ref_logits)


def greedy_run(backend: Backend, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """``n`` greedy tokens and the logits [n, vocab] each was chosen from. These are the calls
    ``all_logits(backend, prompt_ids + tokens, len(prompt_ids))`` makes, so the rows are its
    rows: parity keeps them as the reference's teacher-forced logits instead of a second pass."""
    backend.reset()
    logits = backend.prefill(prompt_ids)
    out, rows = [], []
    for i in range(n):
        rows.append(logits)
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = backend.decode(out[-1])
    return out, np.stack(rows) if rows else np.zeros((0, backend.vocab_size), np.float32)


def greedy_tokens(backend: Backend, prompt_ids: list[int], n: int) -> list[int]:
    return greedy_run(backend, prompt_ids, n)[0]


def greedy_agreement(forced_logits: np.ndarray, ref_tokens: list[int]) -> int:
    """The greedy common prefix, read off a candidate teacher-forced on the reference's greedy
    tokens: while the candidate's own greedy choices equal them it is fed the same tokens through
    the same calls, so its logits are these rows and its choice at step i is their argmax."""
    for i, t in enumerate(ref_tokens):
        if int(np.argmax(forced_logits[i])) != t:
            return i
    return len(ref_tokens)


def greedy_prefix(candidate: Backend, reference: Backend, prompt_ids: list[int], n: int):
    """(common prefix length, candidate tokens, reference tokens) of free-running greedy decoding."""
    c, r = greedy_tokens(candidate, prompt_ids, n), greedy_tokens(reference, prompt_ids, n)
    common = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    return common, c, r


def perplexity(backend: Backend, ids: list[int]) -> float:
    """exp(mean NLL) of ``ids[1:]`` given the previous tokens, in one cache window (a windowed
    cache streams all of them through its window)."""
    ids = list(ids) if backend.ring is not None else list(ids)[: backend.max_seq_len]
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    backend.reset()
    logits = backend.forward_all(ids[:-1])
    lp = _log_softmax(logits)
    nll = -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


@dataclass
class ParityRow:
    candidate: str
    steps: int
    max_abs: float
    max_rel: float
    top1: float
    mean_kl: float
    greedy_common: int
    greedy_n: int
    ppl_candidate: float | None = None
    ppl_reference: float | None = None
    seconds: float = 0.0
    per_step_rel: list[float] = field(default_factory=list)
    reference: str = ""
    floor_top1: float | None = None  # the reference vs itself under float-rounding perturbation
    floor_kl: float | None = None

    @property
    def ppl_ratio(self) -> float | None:
        if self.ppl_candidate is None or self.ppl_reference is None:
            return None
        return self.ppl_candidate / self.ppl_reference


@dataclass
class ParityReport:
    reference: str
    rows: list[ParityRow]
    prompts: list[str]
    text_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for r, row in zip(d["rows"], self.rows):
            r["ppl_ratio"] = row.ppl_ratio
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    def table(self):
        from rich.table import Table

        t = Table(title=f"parity vs {self.reference}")
        for col in ("candidate", "reference", "steps", "max|Δ|", "max|Δ|/max|ref|", "top-1", "mean KL",
                    "floor top-1/KL", "greedy prefix", "ppl cand", "ppl ref", "ratio", "s"):
            t.add_column(col, justify="right" if col != "candidate" else "left")
        for r in self.rows:
            f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
            t.add_row(r.candidate, r.reference, str(r.steps), f(r.max_abs, ".3g"), f(r.max_rel, ".3g"),
                      f"{100 * r.top1:.1f}%", f(r.mean_kl, ".2e"),
                      "-" if r.floor_top1 is None else f"{100 * r.floor_top1:.1f}% / {r.floor_kl:.1e}",
                      f"{r.greedy_common}/{r.greedy_n}",
                      f(r.ppl_candidate, ".3f"), f(r.ppl_reference, ".3f"), f(r.ppl_ratio, ".4f"), f"{r.seconds:.1f}")
        return t

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for r in self.rows:
            ax.semilogy(np.maximum(np.asarray(r.per_step_rel), 1e-12), label=r.candidate)
        ax.set_xlabel("teacher-forced step")
        ax.set_ylabel("max|Δlogit| / max|ref logit|")
        ax.set_title(f"per-step divergence vs {self.reference}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def run_parity(candidates: dict[str, Backend], reference: Backend, *, prompts=DEFAULT_PROMPTS,
               steps: int = 32, text: str | None = None, text_tokens: int = 512,
               with_noise_floor: bool = False, progress=None) -> ParityReport:
    """Compare each candidate with ``reference``: teacher-forced on each prompt + its reference
    greedy continuation (``steps`` tokens), free-running greedy, and perplexity on ``text``;
    optionally the reference's own noise floor on the same teacher-forced steps."""
    if steps < 1:
        raise ValueError(f"parity needs at least one teacher-forced step, got steps={steps}")
    tok = reference.tokenizer
    prompt_ids = [tok.encode(p) for p in prompts]
    forced = []  # (ids, prompt_len, reference logits, reference greedy tokens): computed once
    for ids in prompt_ids:
        cont, ref_logits = greedy_run(reference, ids, steps)  # its logits are the teacher-forced ones
        forced.append((ids + cont, len(ids), ref_logits, cont))
    floor = None
    if with_noise_floor:
        if progress:
            progress(f"parity: noise floor of {reference.name}")
        for full, plen, ref_logits, _ in forced:
            s = noise_floor(reference, full, plen, ref_logits)
            if s is None:
                break
            floor = s if floor is None else floor.extend(s)
    text_ids = None
    ppl_ref = None
    if text:
        text_ids = tok.encode(text)[: min(text_tokens, reference.max_seq_len)]
        ppl_ref = perplexity(reference, text_ids)
    rows = []
    for name, cand in candidates.items():
        if progress:
            progress(f"parity: {name}")
        t = time.time()
        stats = None
        common = total = 0
        for ids, plen, ref_logits, ref_greedy in forced:
            logits = all_logits(cand, ids, plen)
            s = compare_logits(logits, ref_logits)
            stats = s if stats is None else stats.extend(s)
            common, total = common + greedy_agreement(logits, ref_greedy), total + steps
        ppl_c = perplexity(cand, text_ids) if text_ids else None
        rows.append(ParityRow(name, len(stats.rel), stats.max_abs_all, stats.max_rel, stats.top1_rate,
                              stats.mean_kl, common, total, ppl_c, ppl_ref, time.time() - t,
                              [float(x) for x in stats.rel], reference.name,
                              floor.top1_rate if floor else None, floor.mean_kl if floor else None))
    return ParityReport(reference.name, rows, list(prompts),
                        len(text_ids) if text_ids else None)


def merge_reports(reports: list[ParityReport], order: list[str] | None = None) -> ParityReport:
    """One report from runs against different references (each row keeps its own)."""
    rows = [r for rep in reports for r in rep.rows]
    if order:
        rows.sort(key=lambda r: order.index(r.candidate) if r.candidate in order else len(order))
    refs = list(dict.fromkeys(rep.reference for rep in reports))
    first = reports[0]
    return ParityReport(" / ".join(refs), rows, first.prompts, first.text_tokens)
