"""The one tokenizer every edgellm artifact carries: byte-level BPE run by tiktoken.

Every supported source (XGen's tiktoken ranks, a GGUF's embedded BPE, an HF tokenizer.json)
is converted once by ``edgellm.tokenizer.builders`` into the same two files, so the runtime
never needs transformers/sentencepiece and JS/Swift/Kotlin ports only need tiktoken's format:

- ``tokenizer.tiktoken``: ``base64(token bytes) rank`` per line (ranks = ids; gaps only where
  an id is a special token or the source itself has a hole, e.g. XGen re-ranks GPT-2's space runs).
- ``tokenizer.meta.json``: pattern, specials, bos/eos/pad, chat template (data, not Jinja),
  embedding rows, plus two optional lists: ``always_special`` (added tokens that are matched
  even when specials are not allowed, as HF "non-special added tokens" / GGUF user-defined
  tokens are) and ``dropped_ids`` (placeholders for bytes the model vocabulary lacks; encode()
  drops them, exactly as llama.cpp and HF tokenizers drop such bytes).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import tiktoken  # edgellm's package import has set TIKTOKEN_CACHE_DIR (see edgellm.env)

from edgellm.errors import EdgeLLMError

FORMAT_VERSION = 1
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.meta.json"

# ---- chat templates (data; rendered with str.replace of "{content}") ----

CHATML: dict[str, Any] = {
    "header": "",
    "default_system": None,
    "system": "<|im_start|>system\n{content}<|im_end|>\n",
    "user": "<|im_start|>user\n{content}<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n",
    "generation_prompt": "<|im_start|>assistant\n",
}
_TEMPLATE_KEYS = ("header", "default_system", "system", "user", "assistant", "generation_prompt")


def render_chat_parts(template: dict[str, Any], messages: Iterable[dict[str, str]],
                      add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """Render messages as (text, from_template) pieces; message contents are not template."""
    unknown = sorted(set(template) - set(_TEMPLATE_KEYS))
    if unknown:
        raise ValueError(f"unknown chat_template field {unknown[0]!r}; valid: {', '.join(_TEMPLATE_KEYS)}")
    messages = list(messages)
    out: list[tuple[str, bool]] = [(template.get("header") or "", True)]

    def turn(fmt: str, content: str, content_is_template: bool = False):
        before, _, after = fmt.partition("{content}")
        out.extend([(before, True), (content, content_is_template), (after, True)])

    system = next((m for m in messages if m.get("role") == "system"), None)
    sys_text = system["content"] if system is not None else template.get("default_system")
    if sys_text is not None:
        if not template.get("system"):
            raise ValueError("this chat template has no system turn; drop the system message "
                             "or add a 'system' entry to the template")
        turn(template["system"], sys_text, content_is_template=system is None)
    for m in messages:
        role = m.get("role")
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}; use system, user or assistant")
        turn(template[role], m["content"])
    if add_generation_prompt:
        out.append((template["generation_prompt"], True))
    return [(t, tpl) for t, tpl in out if t]


def render_chat(template: dict[str, Any], messages: Iterable[dict[str, str]],
                add_generation_prompt: bool = True) -> str:
    """Render messages with a data chat template (see module docstring for the shape)."""
    return "".join(t for t, _ in render_chat_parts(template, messages, add_generation_prompt))


# ---- streaming decode ----

class StreamDecoder:
    """Turns ids into text as they arrive, holding back bytes of a character split across tokens.

    Uses Python's incremental UTF-8 decoder, so the concatenated output equals
    ``decode(all_ids)`` exactly (invalid bytes become U+FFFD there too, split ones never do).
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.piece(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# ---- the tokenizer ----

class Tokenizer:
    """tiktoken-backed byte-level BPE plus the metadata a runtime needs (bos/eos/chat/rows)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str,
                 special_tokens: dict[str, int] | None = None, *, bos_id: int | None = None,
                 eos_ids: Iterable[int] = (), pad_id: int | None = None,
                 chat_template: dict[str, Any] | None = None, embedding_rows: int | None = None,
                 source: str = "", always_special: Iterable[str] = (),
                 dropped_ids: Iterable[int] = ()):
        special_tokens = dict(special_tokens or {})
        clash = set(special_tokens.values()) & set(mergeable_ranks.values())
        if clash:
            raise ValueError(f"special token id {min(clash)} is also a mergeable rank; "
                             f"give special tokens ids outside the BPE ranks")
        self.mergeable_ranks = mergeable_ranks
        self.pat_str = pat_str
        self.special_tokens = special_tokens
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.embedding_rows = embedding_rows
        self.source = source
        self.always_special = frozenset(always_special)
        missing = self.always_special - set(special_tokens)
        if missing:
            raise ValueError(f"always_special token {sorted(missing)[0]!r} is not a special token")
        self.dropped_ids = frozenset(dropped_ids)
        self._enc = tiktoken.Encoding(f"edgellm:{source or 'bpe'}", pat_str=pat_str,
                                      mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        real = [i for i in mergeable_ranks.values() if i not in self.dropped_ids]
        self.n_vocab = max(real + list(special_tokens.values()), default=-1) + 1
        self.padding_rows: int | None = None

    # -- encoding --
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Encode text; special-token text is plain text unless ``allow_special``."""
        if allow_special:
            ids = self._enc.encode(text, allowed_special="all", disallowed_special=())
        elif self.always_special:
            ids = self._enc.encode(text, allowed_special=set(self.always_special), disallowed_special=())
        else:
            ids = self._enc.encode_ordinary(text)
        if self.dropped_ids:
            ids = [i for i in ids if i not in self.dropped_ids]
        return ids

    def encode_chat(self, messages: Iterable[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat prompt. Special tokens are recognized only in the template's
        own text: a user who types ``<|im_start|>`` gets those characters, not a new turn."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.source!r} has no chat template; set chat_template in the recipe")
        specials = sorted(self.special_tokens, key=len, reverse=True)
        split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")") if specials else None
        ids: list[int] = []
        plain: list[str] = []

        def flush():
            if plain:
                ids.extend(self.encode("".join(plain)))
                plain.clear()

        for text, from_template in render_chat_parts(self.chat_template, messages, add_generation_prompt):
            if not from_template or split is None:
                plain.append(text)
                continue
            for i, piece in enumerate(split.split(text)):
                if i % 2:
                    flush()
                    ids.append(self.special_tokens[piece])
                elif piece:
                    plain.append(piece)
        flush()
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.piece(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(int(token_id))
        except KeyError:
            raise ValueError(f"token id {token_id} is not in this tokenizer (n_vocab {self.n_vocab}); "
                             f"the ids come from a different model's tokenizer") from None

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def describe(self, text: str, allow_special: bool = False) -> list[tuple[int, str]]:
        """(id, readable piece) pairs for ``python -m runtime tokenize``; split UTF-8 shows as \\xNN."""
        return [(i, self.piece(i).decode("utf-8", errors="backslashreplace"))
                for i in self.encode(text, allow_special=allow_special)]

    def apply_chat_template(self, messages: Iterable[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.source!r} has no chat template; "
                             f"set chat_template in the recipe")
        return render_chat(self.chat_template, messages, add_generation_prompt)

    def check_vocab(self, embedding_rows: int) -> int:
        """Fail if an id would index past the embedding; return (and record) the padding rows."""
        if self.n_vocab > embedding_rows:
            raise ValueError(f"tokenizer has ids up to {self.n_vocab - 1} (n_vocab {self.n_vocab}) but the "
                             f"model embedding has only {embedding_rows} rows; use the tokenizer that "
                             f"belongs to this checkpoint")
        self.embedding_rows = embedding_rows
        self.padding_rows = embedding_rows - self.n_vocab
        return self.padding_rows

    # -- persistence --
    def meta(self) -> dict[str, Any]:
        m = {
            "format_version": FORMAT_VERSION,
            "pat_str": self.pat_str,
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "pad_id": self.pad_id,
            "chat_template": self.chat_template,
            "embedding_rows": self.embedding_rows,
            "source": self.source,
        }
        if self.always_special:
            m["always_special"] = sorted(self.always_special)
        if self.dropped_ids:
            m["dropped_ids"] = sorted(self.dropped_ids)
        return m

    def save(self, directory: str | Path) -> list[Path]:
        """Write tokenizer.tiktoken + tokenizer.meta.json atomically; return their paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ranks = "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n"
                        for b, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        meta = json.dumps(self.meta(), indent=2, ensure_ascii=False) + "\n"
        out = []
        for name, text in ((RANKS_FILE, ranks), (META_FILE, meta)):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            os.replace(tmp, d / name)
            out.append(d / name)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        for name in (META_FILE, RANKS_FILE):
            if not (d / name).is_file():
                raise EdgeLLMError(f"{d} has no tokenizer ({name} is missing); re-export the artifact")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
            if meta.get("format_version") != FORMAT_VERSION:
                raise EdgeLLMError(f"{d / META_FILE} has format_version {meta.get('format_version')!r}, "
                                   f"this edgellm reads {FORMAT_VERSION}; re-export the artifact")
            return cls(read_tiktoken_ranks(d / RANKS_FILE), meta["pat_str"], meta["special_tokens"],
                       bos_id=meta["bos_id"], eos_ids=meta["eos_ids"], pad_id=meta["pad_id"],
                       chat_template=meta["chat_template"], embedding_rows=meta["embedding_rows"],
                       source=meta.get("source", ""), always_special=meta.get("always_special", ()),
                       dropped_ids=meta.get("dropped_ids", ()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise EdgeLLMError(f"the tokenizer in {d} is corrupt ({type(e).__name__}: {e}); re-export the "
                               f"artifact") from None

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, n_vocab={self.n_vocab}, "
                f"specials={len(self.special_tokens)}, embedding_rows={self.embedding_rows})")


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a .tiktoken rank file locally (tiktoken's own loader wants a cache/URL)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n} is not 'base64 rank'; the rank file is corrupt") from None
    return ranks
