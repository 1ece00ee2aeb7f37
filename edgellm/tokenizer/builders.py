"""Convert source tokenizers (XGen, GGUF-embedded BPE, HF tokenizer.json) into ``Tokenizer``.

Each builder is exact or refuses. tiktoken merges the adjacent pair whose *concatenation* has
the lowest rank, HF/llama.cpp BPE merges the pair with the lowest *merge index*; the two agree
when every merged token's id increases with its merge index (rank order == merge order), every
multi-byte token is produced by exactly one merge, and every token's own bytes BPE back to it
(tiktoken emits a whole pre-token that is in the vocabulary directly). The builders check
these properties and refuse vocabularies that break them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgellm import gguf_file
from edgellm.assets import fetch
from edgellm.tokenizer.core import CHATML, Tokenizer, read_tiktoken_ranks

# ---- pre-tokenizer patterns (all accepted by tiktoken's fancy-regex and valid JS with /u) ----

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Sequence[Digits(individual_digits=True), ByteLevel] == llama.cpp's {"\p{N}", gpt2} splits:
# every digit is its own piece, and GPT-2's regex runs on the text between digits, so a digit
# acts as end-of-text for GPT-2's "(?!\S)" and the " ?\p{N}+" branch can no longer fire.
DIGITS_GPT2_PAT = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# llama3 / qwen2 as llama.cpp writes them: "(?i:'s|...)" spelled with classes for JS.
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_PAT = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's tokenizer.ggml.pre names (src/llama-vocab.cpp) -> one equivalent regex.
GGUF_PRE_PATTERNS: dict[str, str] = {
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "gigachat",
                     "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "jina-v2-code"], GPT2_PAT),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], DIGITS_GPT2_PAT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "chatglm-bpe"],
                    LLAMA3_PAT),
    **dict.fromkeys(["qwen2", "stablelm2", "hunyuan"], QWEN2_PAT),
}
# Sequences of several llama.cpp splits (with isolated gaps) that we have not reduced to one
# verified regex; refuse rather than tokenize differently.
_UNSUPPORTED_PRE = {"default", "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "poro-chat",
                    "bloom", "gpt3-finnish", "viking", "tekken", "chameleon"}
# llama.cpp pre types whose tokenizer.json sets ignore_merges (a whole pre-token in the vocab wins).
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "tekken"}


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: raw byte -> the printable stand-in char (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in char -> the raw byte."""
    return {c: b for b, c in byte_encoder().items()}


def _unbyte(token: str) -> bytes:
    dec = byte_decoder()
    try:
        return bytes(dec[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} has character {e.args[0]!r} outside the byte-level alphabet; "
                         f"only byte-level BPE vocabularies (GPT-2 style) can be converted") from None


# ---- XGen ----

XGEN_FIM_TOKENS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
                   "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
                   "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
                   "<commit_after>", "<reponame>"]
XGEN_EMBEDDING_ROWS = 51200
GPT2_ENDOFTEXT = 50256


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's 50,256 ranks from the sha256-verified asset (no tiktoken download)."""
    ranks = read_tiktoken_ranks(fetch("gpt2.tiktoken"))
    if len(ranks) != 50256 or sorted(ranks.values()) != list(range(50256)):
        raise ValueError("gpt2.tiktoken does not hold ranks 0..50255; the asset is not GPT-2's")
    return ranks


def build_xgen() -> Tokenizer:
    """XGen-7B: GPT-2 + mergeable runs of 31..2 spaces and 9..2 tabs from 50257, then FIM specials.

    GPT-2 has no multi-space/tab tokens, so the rank file is 0..50294 with only 50256 (a special)
    missing; the check below keeps it that way if the base ranks ever change.
    """
    ranks = gpt2_ranks()
    idx = GPT2_ENDOFTEXT + 1
    if any(b" " * n in ranks or b"\t" * n in ranks for n in range(2, 32)):
        raise ValueError("GPT-2 ranks already hold a whitespace run; XGen's additions would leave holes")
    for n in range(31, 1, -1):
        ranks[b" " * n] = idx
        idx += 1
    for n in range(9, 1, -1):
        ranks[b"\t" * n] = idx
        idx += 1
    specials = {"<|endoftext|>": GPT2_ENDOFTEXT}
    for t in XGEN_FIM_TOKENS:
        specials[t] = idx
        idx += 1
    return Tokenizer(ranks, GPT2_PAT, specials, bos_id=GPT2_ENDOFTEXT, eos_ids=[GPT2_ENDOFTEXT],
                     pad_id=None, chat_template=None, embedding_rows=XGEN_EMBEDDING_ROWS, source="xgen")


# ---- shared BPE conversion ----

def _pair_bpe(word: list[bytes], merge_rank: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Reference HF/llama.cpp BPE on one pre-token (lowest merge index first, leftmost on ties)."""
    while len(word) > 1:
        best, at = None, -1
        for i in range(len(word) - 1):
            r = merge_rank.get((word[i], word[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        word[at:at + 2] = [word[at] + word[at + 1]]
    return word


def bpe_to_ranks(vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]], *,
                 ignore_merges: bool, where: str) -> tuple[dict[bytes, int], list[int]]:
    """Check a byte-level BPE is expressible as tiktoken ranks; return (ranks, dropped_ids).

    ``vocab`` holds the mergeable (non-special) tokens as raw bytes -> id. Bytes missing from the
    vocabulary get placeholder ids after the largest id (returned as dropped_ids).
    """
    merge_rank: dict[tuple[bytes, bytes], int] = {}
    produced: dict[bytes, int] = {}
    last_id = -1
    for i, (a, b) in enumerate(merges):
        t = a + b
        for part in (a, b, t):
            if part not in vocab:
                raise ValueError(f"{where}: merge #{i} {a!r} + {b!r} uses {part!r}, which is not in the "
                                 f"vocabulary; the tokenizer is inconsistent")
        if t in produced:
            raise ValueError(f"{where}: token {t!r} is produced by merges #{produced[t]} and #{i}; tiktoken "
                             f"ranks cannot express two merge priorities for one token")
        if (a, b) in merge_rank:
            continue  # a repeated merge never fires the second time
        if vocab[t] <= last_id:
            raise ValueError(f"{where}: merge #{i} yields id {vocab[t]} after an earlier merge yielded "
                             f"{last_id}; tiktoken needs token ids in merge order (rank == id)")
        last_id = vocab[t]
        merge_rank[(a, b)] = i
        produced[t] = i
    for t, i in vocab.items():
        if len(t) > 1 and t not in produced:
            raise ValueError(f"{where}: token {i} {t!r} is not reachable by any merge; tiktoken could "
                             f"produce it where the source BPE never does, so it cannot be converted")
    if not ignore_merges:
        # tiktoken returns a pre-token found whole in the vocabulary without running merges.
        for t, i in vocab.items():
            if len(t) > 1 and _pair_bpe([bytes([c]) for c in t], merge_rank) != [t]:
                raise ValueError(f"{where}: token {i} {t!r} is not what BPE makes of its own bytes; "
                                 f"tiktoken would emit it whole, so the conversion would not be exact")
    ranks = dict(vocab)
    nxt = max(list(vocab.values()) + [-1]) + 1
    dropped = []
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = nxt
            dropped.append(nxt)
            nxt += 1
    return ranks, dropped


# ---- GGUF ----

def chat_template_from_jinja(jinja: str | None) -> dict[str, Any] | None:
    """Recognize a ChatML Jinja template (and a literal default system turn); else None."""
    if not jinja or "<|im_start|>" not in jinja or "<|im_end|>" not in jinja:
        return None
    import re
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", jinja, re.S)
    default_system = m.group(1) if (m and "{{" not in m.group(1) and "messages[0]['role'] != 'system'" in jinja) else None
    return {**CHATML, "default_system": default_system}


def build_from_gguf(path: str | Path) -> Tokenizer:
    """A GGUF's embedded byte-level BPE (tokenizer.ggml.model == gpt2) -> Tokenizer."""
    path = Path(path)
    kv = gguf_file.read_fields(path)
    where = path.name
    model = kv.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') can be "
                         f"converted to tiktoken (sentencepiece 'llama' vocabularies are not supported)")
    pre = kv.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_PATTERNS:
        hint = ("it is a sequence of llama.cpp splits not yet reduced to one regex"
                if pre in _UNSUPPORTED_PRE else "it is unknown")
        raise ValueError(f"{where}: pre-tokenizer {pre!r} is not supported ({hint}); known: "
                         f"{', '.join(sorted(GGUF_PRE_PATTERNS))}")
    tokens: list[str] = kv["tokenizer.ggml.tokens"]
    types: list[int] = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges_raw: list[str] = kv.get("tokenizer.ggml.merges") or []
    vocab: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    always: list[str] = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 1:
            b = _unbyte(t)
            if b in vocab:
                raise ValueError(f"{where}: tokens {vocab[b]} and {i} are both {t!r}; duplicate tokens "
                                 f"cannot be converted")
            vocab[b] = i
        elif ty in (2, 3, 4, 5):  # unknown, control, user-defined, unused: matched as whole text
            if t in specials:
                raise ValueError(f"{where}: special token {t!r} appears twice (ids {specials[t]} and {i})")
            specials[t] = i
            if ty == 4:
                always.append(t)
        else:
            raise ValueError(f"{where}: token {i} {t!r} has token_type {ty} (byte tokens belong to "
                             f"sentencepiece vocabularies); only byte-level BPE is supported")
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: merge {m!r} is not 'left right'")
        merges.append((_unbyte(parts[0]), _unbyte(parts[1])))
    ranks, dropped = bpe_to_ranks(vocab, merges, ignore_merges=pre in _IGNORE_MERGES_PRE, where=where)
    eos = kv.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if kv.get(k) is not None and kv[k] not in eos_ids:
            eos_ids.append(kv[k])
    return Tokenizer(ranks, GGUF_PRE_PATTERNS[pre], specials, bos_id=kv.get("tokenizer.ggml.bos_token_id"),
                     eos_ids=eos_ids, pad_id=kv.get("tokenizer.ggml.padding_token_id"),
                     chat_template=chat_template_from_jinja(kv.get("tokenizer.chat_template")),
                     embedding_rows=len(tokens), source=f"gguf:{path.name}", always_special=always,
                     dropped_ids=dropped)


# ---- HF tokenizer.json ----

def _hf_pattern(pre: dict | None, where: str) -> str:
    """Map a byte-level pre_tokenizer to one regex; refuse anything else."""
    def is_bl(p, use_regex):
        if p.get("type") != "ByteLevel":
            return False
        if p.get("add_prefix_space"):
            raise ValueError(f"{where}: ByteLevel add_prefix_space=true cannot be expressed as a tiktoken "
                             f"pattern; it is not supported")
        return p.get("use_regex", True) == use_regex

    if pre is None:
        raise ValueError(f"{where}: no pre_tokenizer; only byte-level BPE (ByteLevel pre-tokenizer) is supported")
    if pre.get("type") == "ByteLevel" and is_bl(pre, True):
        return GPT2_PAT
    if pre.get("type") == "Sequence":
        seq = pre.get("pretokenizers", [])
        if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits") and is_bl(seq[1], True):
            return DIGITS_GPT2_PAT
        if (len(seq) == 2 and seq[0].get("type") == "Split" and is_bl(seq[1], False)
                and seq[0].get("behavior") == "Isolated" and not seq[0].get("invert")
                and "Regex" in seq[0].get("pattern", {})):
            pat = seq[0]["pattern"]["Regex"]
            return pat.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", _CONTRACTIONS_CI)
    kinds = pre.get("type") if pre.get("type") != "Sequence" else [p.get("type") for p in pre.get("pretokenizers", [])]
    raise ValueError(f"{where}: pre_tokenizer {kinds} is not a byte-level BPE layout we can express exactly "
                     f"(supported: ByteLevel, Digits+ByteLevel, Split(regex, isolated)+ByteLevel)")


def build_from_hf_json(path: str | Path) -> Tokenizer:
    """An HF tokenizer.json with a byte-level BPE model -> Tokenizer (bos/eos from tokenizer_config.json)."""
    path = Path(path)
    where = str(path)
    j = json.loads(path.read_text(encoding="utf-8"))
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: model type {model.get('type')!r} is not BPE; only byte-level BPE is supported")
    if model.get("byte_fallback"):
        raise ValueError(f"{where}: byte_fallback BPE is sentencepiece-style, not byte-level; not supported")
    if j.get("normalizer") is not None:
        raise ValueError(f"{where}: normalizer {j['normalizer'].get('type')!r} cannot be expressed in tiktoken; "
                         f"only tokenizers without a normalizer are supported")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: continuing_subword_prefix/end_of_word_suffix are not byte-level BPE")
    pat = _hf_pattern(j.get("pre_tokenizer"), where)
    added = j.get("added_tokens") or []
    specials: dict[str, int] = {}
    always: list[str] = []
    for a in added:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise ValueError(f"{where}: added token {a['content']!r} uses lstrip/rstrip/single_word, "
                             f"which tiktoken cannot express")
        specials[a["content"]] = a["id"]
        if not a.get("special"):
            always.append(a["content"])
    added_ids = set(specials.values())
    vocab: dict[bytes, int] = {}
    for t, i in model["vocab"].items():
        if i in added_ids:
            continue
        vocab[_unbyte(t)] = i
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((_unbyte(a), _unbyte(b)))
    ranks, dropped = bpe_to_ranks(vocab, merges, ignore_merges=bool(model.get("ignore_merges")), where=where)
    bos_id, eos_ids, pad_id = _hf_special_ids(path.parent, {**specials, **model["vocab"]})
    n_tokens = max(list(model["vocab"].values()) + list(added_ids)) + 1
    return Tokenizer(ranks, pat, specials, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
                     chat_template=None, embedding_rows=n_tokens, source=f"hf:{path.parent.name}",
                     always_special=always, dropped_ids=dropped)


def _hf_special_ids(folder: Path, ids: dict[str, int]) -> tuple[int | None, list[int], int | None]:
    """bos/eos/pad from tokenizer_config.json and generation_config.json when present."""
    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return ids.get(v) if isinstance(v, str) else None

    bos = pad = None
    eos: list[int] = []
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text(encoding="utf-8"))
        bos, pad = tok_id(c.get("bos_token")), tok_id(c.get("pad_token"))
        e = tok_id(c.get("eos_token"))
        eos = [e] if e is not None else []
    gen = folder / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text(encoding="utf-8"))
        ge = g.get("eos_token_id")
        for e in (ge if isinstance(ge, list) else [ge] if ge is not None else []):
            if e not in eos:
                eos.append(e)
        if bos is None:
            bos = g.get("bos_token_id")
    return bos, eos, pad
