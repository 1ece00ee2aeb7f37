"""Calibration text for the calibration-based quantization methods (``method: gptq``).

The text is Lee's background news corpus (``lee_background.cor``, plain English news, one
document a line), taken from the gensim 4.4.0 wheel (``edgellm.assets``). It is never the
evaluation text: perplexity is measured on the US constitution (``us-constitution.txt``), and
``check_disjoint`` asserts that no calibration line (nor any long word run) occurs in it.

The first ``n`` tokens of the corpus are used (documents joined by newlines, tokenized with the
model's own tokenizer, no special tokens), so the calibration is deterministic.
"""

from __future__ import annotations

import re

import torch

from edgellm.assets import ASSETS, fetch

CALIBRATION_ASSET = "lee_background.cor"
EVALUATION_ASSETS = ("us-constitution.txt",)
_SHINGLE = 8  # a run of this many words shared by both texts counts as overlap


def calibration_text() -> str:
    return fetch(CALIBRATION_ASSET).read_text(encoding="utf-8", errors="replace")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(text: str, k: int = _SHINGLE) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def overlap(a: str, b: str, k: int = _SHINGLE) -> set[tuple[str, ...]]:
    """Word k-grams (lower-cased, punctuation dropped) that occur in both texts."""
    return _shingles(a, k) & _shingles(b, k)


def check_disjoint(calibration: str, evaluation: str, k: int = _SHINGLE) -> None:
    """Raise ValueError if the two texts share any run of ``k`` words."""
    shared = overlap(calibration, evaluation, k)
    if shared:
        sample = " ".join(sorted(shared)[0])
        raise ValueError(f"the calibration text shares {len(shared)} {k}-word runs with the evaluation text "
                         f"(e.g. {sample!r}); calibrate on a different text")


def evaluation_texts() -> dict[str, str]:
    return {n: fetch(n).read_text(encoding="utf-8", errors="replace") for n in EVALUATION_ASSETS}


def calibration_tokens(encode, n: int, check: bool = True) -> torch.Tensor:
    """int64 [n]: the first ``n`` tokens of the calibration corpus under ``encode(text) -> ids``.
    With ``check``, first asserts the corpus is disjoint from every evaluation text."""
    text = calibration_text()
    if check:
        for name, ev in evaluation_texts().items():
            try:
                check_disjoint(text, ev)
            except ValueError as e:
                raise ValueError(f"{CALIBRATION_ASSET} vs {name}: {e}") from None
    # Tokenize a prefix large enough for n tokens (~4 characters a token; grown if short).
    chars = max(4096, n * 8)
    while True:
        ids = list(encode(text[:chars]))
        if len(ids) >= n + 1 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n:
        raise ValueError(f"the calibration corpus has only {len(ids)} tokens, fewer than the {n} asked for "
                         f"(quantization.calibration_tokens)")
    return torch.tensor(ids[:n], dtype=torch.long)


def source() -> dict:
    """What a manifest records about the calibration text."""
    a = ASSETS[CALIBRATION_ASSET]
    return {"asset": a.name, "package": a.package, "sha256": a.sha256}
