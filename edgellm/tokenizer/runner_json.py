"""The shared tokenizer rewritten as an HF ``tokenizer.json`` (byte-level BPE with merges).

ExecuTorch's ``TextLLMRunner`` reads a tiktoken rank file only with Llama-3's pre-tokenizer
pattern and special tokens baked in, so our ``tokenizer.tiktoken`` would be split with the
wrong regex (e.g. digit runs) and lose the model's own specials (``<|im_start|>`` = 1, ...).
Its HF loader takes the pattern, the specials and the merges from the file. This module
derives that file from the one shared ``Tokenizer`` (ranks -> merges exactly as tiktoken would
apply them), so it is a second serialization of the same tokenizer, not a second tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.tokenizer.core import Tokenizer
from edgellm.tokenizer.builders import byte_encoder

FILE = "tokenizer.json"


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def _merges_for(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge(s) that make ``token`` at priority ``rank``, as tiktoken forms it.

    Normally one merge of two lower-ranked tokens. Tokens appended to a vocabulary (XGen's runs
    of spaces and tabs, ranks 50257+, longest first) have no such split; tiktoken still forms
    them by merging any two adjacent tokens that concatenate to them, at the token's own rank,
    so every two-token split gets a merge at that priority."""
    parts = _split_by_lower_ranks(token, ranks, rank)
    if len(parts) == 2:
        return [(parts[0], parts[1])]
    splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    if not splits:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be formed by merging two tokens; "
                         f"this rank file cannot be expressed as BPE merges")
    return splits


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """tokenizer.json content equivalent to ``tok.encode(text, allow_special=True)``."""
    enc = byte_encoder()
    ranks = {b: r for b, r in tok.mergeable_ranks.items() if r not in tok.dropped_ids}

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[s(token)] = rank
        if len(token) > 1:
            merges += [f"{s(a)} {s(b)}" for a, b in _merges_for(token, rank, ranks)]
    for t, i in tok.special_tokens.items():  # HF keeps added tokens in the model vocab too
        vocab[t] = i
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }


def write(tok: Tokenizer, directory: str | Path) -> Path:
    path = Path(directory) / FILE
    path.write_text(json.dumps(hf_tokenizer_json(tok), ensure_ascii=False), encoding="utf-8")
    return path
