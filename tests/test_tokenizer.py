"""Tokenizer exactness against independent references, round trips, streaming, chat, format."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_corpus import CORPUS  # noqa: E402

from edgellm.tokenizer import builders as tb  # noqa: E402
from edgellm.assets import fetch  # noqa: E402
from helpers import SMOLLM2_CHAT, XGEN_INST, XVERSE_CHAT  # noqa: E402
from edgellm.tokenizer import load_tokenizer  # noqa: E402
from edgellm.tokenizer.core import CHATML, render_chat  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
RT = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CMP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL_LOOKALIKES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<fim_prefix>", "<reponame>"]
any_text = st.text(max_size=200)
mixed_text = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(CORPUS), st.sampled_from(SPECIAL_LOOKALIKES),
                                st.sampled_from([" ", "  ", "\t", "\n", "1", " 12", "  3"])),
                      max_size=8).map("".join)


# ---------------- fixtures ----------------

@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    (d / "smollm2.gguf").symlink_to(fetch("smollm2-135m-instruct.gguf"))
    return d / "smollm2.gguf"


@pytest.fixture(scope="module")
def gguf_tok(gguf_path):
    return tb.build_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def xgen():
    return tb.build_xgen()


@pytest.fixture(scope="module")
def gpt2_ref():
    import tiktoken
    return tiktoken.Encoding("gpt2-ref", pat_str=tb.GPT2_PAT, mergeable_ranks=tb.gpt2_ranks(),
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def hf_from_gguf(gguf_path):
    """transformers' own conversion of the GGUF tokenizer (the independent reference)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def smollm_json(hf_from_gguf, tmp_path_factory):
    """SmolLM2's vocabulary as tokenizer.json, exactly as transformers saves it."""
    d = tmp_path_factory.mktemp("smollm_hf")
    hf_from_gguf.backend_tokenizer.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


@pytest.fixture(scope="module")
def smollm_digits_ref(smollm_json):
    """The same vocabulary with SmolLM2's published pre-tokenizer (Digits + ByteLevel)."""
    t = tokenizers.Tokenizer.from_file(str(smollm_json))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return t


@pytest.fixture(scope="module")
def trained_json(tmp_path_factory):
    """A byte-level BPE trained here (8192 ids; llama3-style Split regex; special + plain added tokens)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    rng = random.Random(0)
    alph = ("abcdefghijklmnopqrstuvwxyz" + "абвгдежзийклмнопрстуфхцчшщыэюя"
            + "的一是不了人我在有他这为之大来以个中上们" + "あいうえおかきくけこ")
    gen = "".join("".join(rng.choice(alph) for _ in range(rng.randint(1, 8)))
                  + rng.choice([" ", " ", "\n", ", ", "  ", "\t", f"{rng.randint(0, 999)} "]) for _ in range(20000))
    texts = [fetch("us-constitution.txt").read_text(), fetch("us-declaration.txt").read_text(), gen] + CORPUS * 20
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens(["<plain_added>"])  # a non-special added token: always matched
    d = tmp_path_factory.mktemp("trained")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}))
    assert tok.get_vocab_size() >= 8192
    return d / "tokenizer.json"


@pytest.fixture(scope="module")
def trained_tok(trained_json):
    return tb.build_from_hf_json(trained_json)


@pytest.fixture(scope="module")
def trained_ref(trained_json):
    return tokenizers.Tokenizer.from_file(str(trained_json))


def hf_ids(t, text, allow_special):
    t.encode_special_tokens = not allow_special
    return t.encode(text, add_special_tokens=False).ids


# ---------------- GGUF builder ----------------

def test_gguf_metadata(gguf_tok):
    assert gguf_tok.bos_id == 1 and gguf_tok.eos_ids == [2] and gguf_tok.pad_id == 2
    assert gguf_tok.n_vocab == gguf_tok.embedding_rows == 49152
    assert gguf_tok.special_tokens["<|im_start|>"] == 1 and len(gguf_tok.special_tokens) == 17
    assert gguf_tok.pat_str == tb.DIGITS_GPT2_PAT
    assert gguf_tok.chat_template == SMOLLM2_CHAT


def test_gguf_known_ids(gguf_tok):
    # ids llama.cpp produces for SmolLM2 (its "smollm" pre-tokenizer)
    assert gguf_tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert gguf_tok.encode("  multiple   spaces") == [216, 2701, 256, 5600]


@pytest.mark.parametrize("allow_special", [False, True])
def test_gguf_equals_hf_digits_bytelevel_on_corpus(gguf_tok, smollm_digits_ref, allow_special):
    for text in CORPUS:
        assert gguf_tok.encode(text, allow_special) == hf_ids(smollm_digits_ref, text, allow_special), text


@CMP
@given(mixed_text)
def test_gguf_equals_hf_digits_bytelevel_property(gguf_tok, smollm_digits_ref, text):
    ref = hf_ids(smollm_digits_ref, text, True)
    assert gguf_tok.encode(text, allow_special=True) == ref


def test_transformers_gguf_drops_digit_split(gguf_tok, hf_from_gguf):
    """transformers converts the GGUF with a plain ByteLevel pre-tokenizer (no Digits split), so it
    differs from llama.cpp's "smollm" splits only where whitespace meets a digit (a run of spaces
    before a digit, or a space before a non-ASCII digit such as "²" or "١")."""
    pre = json.loads(hf_from_gguf.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre["type"] == "ByteLevel"
    assert hf_from_gguf.encode("x  1", add_special_tokens=False) != gguf_tok.encode("x  1")
    assert gguf_tok.encode("x  1") == [104, 256, 33]  # "x", "  ", "1" as llama.cpp splits it
    for text in CORPUS:
        ours = gguf_tok.encode(text, allow_special=True)
        theirs = hf_from_gguf.encode(text, add_special_tokens=False)
        if ours != theirs:
            assert regex.search(r"\s\p{N}", text), text
    assert hf_from_gguf.encode(" ²", add_special_tokens=False) != gguf_tok.encode(" ²")


def test_gguf_every_token_bpe_matches_hf_model(gguf_tok, smollm_json):
    """tiktoken's rank-based merging == HF pair merging on every vocab entry and on random triples."""
    model = tokenizers.Tokenizer.from_file(str(smollm_json)).model
    dec = tb.byte_decoder()
    enc = gguf_tok._enc
    vocab = json.loads(smollm_json.read_text())["model"]["vocab"]
    items = [(t, i) for t, i in vocab.items() if i >= 17]
    for t, i in items:
        assert enc._encode_single_piece(bytes(dec[c] for c in t)) == [i], t
    rng = random.Random(1)
    for _ in range(20000):
        s = "".join(rng.choice(items)[0] for _ in range(3))
        assert enc._encode_single_piece(bytes(dec[c] for c in s)) == [x.id for x in model.tokenize(s)], s


@RT
@given(any_text)
def test_gguf_round_trip(gguf_tok, text):
    """Bytes missing from SmolLM2's vocabulary (e.g. 0x04, 0xF1) are dropped, as llama.cpp does;
    everything else round-trips."""
    missing = {gguf_tok.piece(i)[0] for i in gguf_tok.dropped_ids}
    data = text.encode()
    assert gguf_tok.decode_bytes(gguf_tok.encode(text)) == bytes(b for b in data if b not in missing)
    if not missing & set(data):
        assert gguf_tok.decode(gguf_tok.encode(text)) == text


def test_gguf_dropped_bytes(gguf_tok):
    assert gguf_tok.encode("a\x04b") == gguf_tok.encode("a") + gguf_tok.encode("b")
    assert all(i < 49152 for i in gguf_tok.encode("\x04\x06\x13 \U00040000"))


def test_gguf_chat_template_matches_jinja(gguf_tok, hf_from_gguf):
    for msgs in ([{"role": "user", "content": "Hi there"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]):
        for gen in (True, False):
            ref = hf_from_gguf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert gguf_tok.apply_chat_template(msgs, add_generation_prompt=gen) == ref


# ---------------- HF tokenizer.json builder ----------------

@pytest.mark.parametrize("allow_special", [False, True])
def test_hf_json_smollm_equals_tokenizers(smollm_json, allow_special):
    ours = tb.build_from_hf_json(smollm_json)
    ref = tokenizers.Tokenizer.from_file(str(smollm_json))
    assert ours.pat_str == tb.GPT2_PAT and ours.n_vocab == 49152
    for text in CORPUS:
        assert ours.encode(text, allow_special) == hf_ids(ref, text, allow_special), text


@pytest.mark.parametrize("allow_special", [False, True])
def test_hf_json_trained_equals_tokenizers_on_corpus(trained_tok, trained_ref, allow_special):
    assert trained_tok.n_vocab == trained_ref.get_vocab_size() >= 8192
    assert "(?i:" not in trained_tok.pat_str
    for text in CORPUS + [fetch("us-declaration.txt").read_text()[:3000], "x <plain_added> y<|im_end|>"]:
        assert trained_tok.encode(text, allow_special) == hf_ids(trained_ref, text, allow_special), text


@CMP
@given(mixed_text)
def test_hf_json_trained_equals_tokenizers_property(trained_tok, trained_ref, text):
    assert trained_tok.encode(text) == hf_ids(trained_ref, text, False)


def test_hf_json_plain_added_token_always_matched(trained_tok):
    plain = trained_tok.special_tokens["<plain_added>"]
    assert plain in trained_tok.encode("a <plain_added> b")
    assert trained_tok.special_tokens["<|im_end|>"] not in trained_tok.encode("<|im_end|>")
    assert trained_tok.encode("<|im_end|>", allow_special=True) == [trained_tok.special_tokens["<|im_end|>"]]
    assert trained_tok.bos_id == 1 and trained_tok.eos_ids == [0]


@RT
@given(any_text)
def test_hf_json_round_trip(trained_tok, text):
    assert trained_tok.decode(trained_tok.encode(text)) == text


def _json_with(tmp_path, mutate):
    base = {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "byte_fallback": False, "vocab": {c: i for i, c in enumerate(tb.byte_decoder())},
                      "merges": []}}
    mutate(base)
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(base))
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda j: j.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "Metaspace"),
    (lambda j: j.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda j: j["model"].update(type="Unigram"), "not BPE"),
    (lambda j: j["model"]["vocab"].update({"ĠĠ": 256}), "not reachable"),
    (lambda j: j["model"].update(vocab={**j["model"]["vocab"], "ab": 300, "Ġa": 257},
                                 merges=["a b", "Ġ a"]), "merge order"),
])
def test_hf_json_refusals(tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        tb.build_from_hf_json(_json_with(tmp_path, mutate))


def test_hf_json_minimal_byte_only_is_accepted(tmp_path):
    t = tb.build_from_hf_json(_json_with(tmp_path, lambda j: None))
    order = list(tb.byte_decoder().values())
    assert t.encode("hé") == [order.index(b) for b in "hé".encode()] and t.decode(t.encode("hé 😀")) == "hé 😀"


# ---------------- XGen builder ----------------

def test_xgen_plain_text_equals_gpt2(xgen, gpt2_ref):
    for text in CORPUS:
        if "  " not in text and "\t\t" not in text:
            assert xgen.encode(text) == gpt2_ref.encode_ordinary(text), text


@CMP
@given(any_text)
def test_xgen_equals_gpt2_without_runs(xgen, gpt2_ref, text):
    text = re.sub(r"  +", " ", re.sub(r"\t\t+", "\t", text))
    assert xgen.encode(text) == gpt2_ref.encode_ordinary(text)


def test_xgen_whitespace_runs_and_specials(xgen):
    for n in range(2, 32):
        assert xgen.encode("x" + " " * n + "\n") == xgen.encode("x") + [50257 + 31 - n] + xgen.encode("\n")
    for n in range(2, 10):
        assert xgen.encode("\t" * n) == [50287 + 9 - n]
    assert xgen.encode(" " * 40) == [50257, 50257 + 31 - 9]  # 31 + 9
    assert xgen.special_tokens["<|endoftext|>"] == 50256 == xgen.bos_id and xgen.eos_ids == [50256]
    for k, name in enumerate(tb.XGEN_FIM_TOKENS):
        assert xgen.special_tokens[name] == 50295 + k
        assert xgen.encode(name, allow_special=True) == [50295 + k]
        assert xgen.encode(name) != [50295 + k]
    assert xgen.n_vocab == 50313 and xgen.embedding_rows == 51200
    assert xgen.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


def test_xgen_ranks_have_no_holes(xgen):
    """GPT-2 has no multi-space/tab tokens, so XGen's additions re-rank nothing: ranks are 0..50294
    with only 50256 (<|endoftext|>, a special) missing."""
    assert sorted(xgen.mergeable_ranks.values()) == [i for i in range(50295) if i != 50256]


@RT
@given(any_text)
def test_xgen_round_trip(xgen, text):
    assert xgen.decode(xgen.encode(text)) == text


# ---------------- streaming, describe, vocab check ----------------

@pytest.mark.parametrize("kind", ["xgen", "gguf_tok", "trained_tok"])
def test_stream_decode_split_characters(request, kind):
    tok = request.getfixturevalue(kind)
    text = "Emoji 😀🎉👨‍👩‍👧 𠀋𪚥 中文 ёж " + "𝔘𝔫𝔦" * 3
    ids = tok.encode(text)
    assert any(_incomplete(tok.piece(i)) for i in ids), "test needs a character split across tokens"
    dec = tok.stream_decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50255), max_size=30))
def test_stream_decode_arbitrary_ids(xgen, ids):
    dec = xgen.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == xgen.decode(ids)


def test_describe(xgen):
    out = xgen.describe("hi 😀")
    assert [i for i, _ in out] == xgen.encode("hi 😀")
    assert out[0] == (5303, "hi") and any("\\x" in p for _, p in out)


def test_check_vocab(xgen, gguf_tok):
    assert xgen.check_vocab(51200) == 51200 - 50313 and xgen.padding_rows == 887
    with pytest.raises(ValueError, match=r"50312.*50000 rows"):
        xgen.check_vocab(50000)
    assert gguf_tok.check_vocab(49152) == 0
    with pytest.raises(ValueError, match="49151"):
        gguf_tok.check_vocab(49151)


def test_unknown_id_is_clear_error(xgen):
    with pytest.raises(ValueError, match="not in this tokenizer"):
        xgen.decode([60000])


# ---------------- chat templates ----------------

def test_chat_templates_exact():
    msgs = [{"role": "user", "content": "Hi {content} {0}"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    assert render_chat(CHATML, msgs) == ("<|im_start|>user\nHi {content} {0}<|im_end|>\n<|im_start|>assistant\n"
                                         "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(SMOLLM2_CHAT, msgs[:1], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi {content} {0}<|im_end|>\n")
    assert render_chat(SMOLLM2_CHAT, [{"role": "system", "content": "S"}] + msgs[:1]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi {content} {0}<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(XGEN_INST, msgs) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n\n### Human: Hi {content} {0}\n"
        "### Assistant: Hello\n### Human: Bye\n### Assistant:")
    assert render_chat(XVERSE_CHAT, msgs) == ("Human: Hi {content} {0}\n\nAssistant: Hello</s>"
                                              "Human: Bye\n\nAssistant: ")
    with pytest.raises(ValueError, match="unknown chat role"):
        render_chat(CHATML, [{"role": "tool", "content": "x"}])


# ---------------- format: save / load / load_tokenizer ----------------

@pytest.mark.parametrize("kind", ["xgen", "gguf_tok", "trained_tok"])
def test_save_load_round_trip(request, kind, tmp_path):
    tok = request.getfixturevalue(kind)
    paths = tok.save(tmp_path)
    assert sorted(p.name for p in paths) == ["tokenizer.meta.json", "tokenizer.tiktoken"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    meta = json.loads((tmp_path / "tokenizer.meta.json").read_text())
    assert set(meta) >= {"format_version", "pat_str", "special_tokens", "bos_id", "eos_ids", "pad_id",
                         "chat_template", "embedding_rows", "source"}
    back = load_tokenizer(tmp_path)
    for text in CORPUS:
        for allow in (False, True):
            assert back.encode(text, allow) == tok.encode(text, allow)
    assert (back.n_vocab, back.bos_id, back.eos_ids, back.pad_id, back.chat_template, back.embedding_rows) == \
           (tok.n_vocab, tok.bos_id, tok.eos_ids, tok.pad_id, tok.chat_template, tok.embedding_rows)


def test_patterns_are_valid_js_regex():
    node = shutil.which("node")
    if not node:
        pytest.skip("node not installed")
    pats = sorted(set(tb.GGUF_PRE_PATTERNS.values()))
    js = "const p=JSON.parse(process.argv[1]);for(const s of p){new RegExp(s,'u')}"
    subprocess.run([node, "-e", js, json.dumps(pats)], check=True)


assigned_text = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=60)


@CMP
@given(st.one_of(mixed_text.filter(lambda s: all(unicodedata.category(c) != "Cn" for c in s)), assigned_text))
def test_digit_pattern_equals_hf_pretokenizer(text):
    """DIGITS_GPT2_PAT splits exactly like HF Sequence[Digits(individual), ByteLevel] (= llama.cpp smollm).
    Python's ``regex`` stands in for tiktoken here; code points unassigned in Python's Unicode
    tables are left out because the libraries' Unicode versions differ on them."""
    pt = tokenizers.pre_tokenizers
    seq = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    dec = tb.byte_decoder()
    ref = [bytes(dec[c] for c in p).decode("utf-8", "surrogateescape") for p, _ in seq.pre_tokenize_str(text)]
    assert regex.findall(tb.DIGITS_GPT2_PAT, text) == ref


def test_load_tokenizer_specs(gguf_path, trained_json):
    assert load_tokenizer(trained_json.parent).n_vocab == 8193
    assert load_tokenizer(trained_json).n_vocab == 8193
    with pytest.raises(ValueError):
        load_tokenizer(gguf_path.parent)


def test_gguf_unknown_pre_is_refused(gguf_path, monkeypatch):
    from edgellm import gguf_file
    real = gguf_file.read_fields
    monkeypatch.setattr(gguf_file, "read_fields", lambda p: {**real(p), "tokenizer.ggml.pre": "deepseek-llm"})
    with pytest.raises(ValueError, match="deepseek-llm"):
        tb.build_from_gguf(gguf_path)


def test_load_tokenizer_recipe():
    from edgellm import recipes

    name = "xgen-7b-8k-inst"
    tok = load_tokenizer(name)
    r = recipes.load_recipe(name)
    assert tok.eos_ids == r.eos_ids and tok.chat_template == r.chat_template


@pytest.mark.parametrize("name, const", [("smollm2-135m", SMOLLM2_CHAT), ("xgen-7b-8k-inst", XGEN_INST),
                                         ("xverse-7b-chat", XVERSE_CHAT)])
def test_recipe_chat_templates_match_constants(name, const):
    from edgellm import recipes

    assert recipes.load_recipe(name).chat_template == const


def test_runner_tokenizer_json_encodes_like_xgen():
    """The HF tokenizer.json written for ExecuTorch's runner encodes as the shared tokenizer,
    including XGen's appended whitespace tokens (ranks 50257+, no split into lower ranks)."""
    from tokenizers import Tokenizer as HF

    from edgellm.model import resolve_model
    from edgellm.tokenizer.runner_json import hf_tokenizer_json

    tok = resolve_model(recipe="xgen-7b-8k-base").tokenizer()
    hf = HF.from_str(json.dumps(hf_tokenizer_json(tok), ensure_ascii=False))
    rng = random.Random(0)
    texts = [" " * n for n in range(1, 70)] + ["\t" * n for n in range(1, 12)] + list(CORPUS)
    texts += ["".join(rng.choice(" \t\nab.") for _ in range(60)) for _ in range(300)]
    assert tok.encode(" " * 31) == [50257]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False).ids == tok.encode(t, allow_special=True), repr(t)
