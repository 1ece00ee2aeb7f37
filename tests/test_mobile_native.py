"""The native C++ runner (mobile_demo/native, ``edgellm_run``) against the Python runtime.

The runner is built with CMake against the ExecuTorch runtime the ``executorch`` wheel ships
(build.sh installs g++/cmake/PCRE2 headers on a fresh Debian machine when run as root). It must
produce the same greedy token ids as ``runtime.load(artifact)`` on the SmolLM2 int4 portable
``.pte``, tokenize like the Python tokenizer id for id, and refuse bad input with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the native runner / drives a browser on SmolLM2 artifacts

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_corpus import CORPUS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "mobile_demo" / "native"
BUILD = ROOT / "build" / "native"  # gitignored; reused between sessions (cmake rebuilds what changed)
N_TOKENS = 32
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
RAW_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
# Unicode whitespace/digit corners where regex engines' classes can differ (PCRE2 vs tiktoken's Rust).
EXTRA_TEXTS = ["a\u0085b \u0085 c", "x\ufeffy \ufeff z", "\x1c\x1d\x1e\x1f a", "١٢٣ 4٥6 ७८",
               "word_\u200d\u0301x  \u2003 y", "\u180e x \u2028\u2029 \u00a0\u00a0x \x0b\x0c 12", "🇺 ⅷ Ⅻ ½ ౸ 𝟙"]


@pytest.fixture(scope="module")
def runner() -> Path:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([str(NATIVE / "build.sh"), str(BUILD)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"native build failed:\n{r.stderr[-4000:]}"
    exe = Path(r.stdout.strip().splitlines()[-1])
    assert exe.is_file() and os.access(exe, os.X_OK), exe
    return exe


@pytest.fixture(scope="module")
def smollm2_pte(export_artifact) -> Path:
    return export_artifact("executorch", "smollm2", "int4", "portable")


def run(runner: Path, artifact: Path, prompt: str, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(runner), "--artifact", str(artifact), "--prompt", prompt, *flags],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ids_of(r: subprocess.CompletedProcess) -> list[int]:
    return [int(x) for x in r.stdout.split()]


# ---- generation: same artifact, same ids ----

@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_greedy_ids_equal_python_runtime(runner, smollm2_pte, chat):
    import runtime
    from runtime.generate import SamplingConfig, generate

    backend = runtime.load(smollm2_pte, threads=2)
    prompt = CHAT_PROMPT if chat else RAW_PROMPT
    ref = generate(backend, prompt, SamplingConfig(max_new_tokens=N_TOKENS, temperature=0.0), chat=chat)
    mode = ["--chat"] if chat else []
    assert ids_of(run(runner, smollm2_pte, prompt, "--tokenize-only", *mode)) == ref.prompt_ids
    r = run(runner, smollm2_pte, prompt, "--print-ids", "--threads", "2", "--max-new-tokens", str(N_TOKENS), *mode)
    assert ids_of(r) == ref.tokens, f"C++ {ids_of(r)}\nPython {ref.tokens}"
    assert "tok/s" in r.stderr
    # The streamed text is the decoded ids (raw mode echoes the prompt first).
    text = run(runner, smollm2_pte, prompt, "--threads", "2", "--max-new-tokens", str(N_TOKENS), *mode).stdout
    assert text == ("" if chat else prompt) + ref.text + "\n"


def test_sampling_is_seeded(runner, smollm2_pte):
    """Same seed, same tokens; the sampler draws from the distribution, not always the argmax."""
    args = ("--print-ids", "--max-new-tokens", "24", "--temperature", "1.0", "--top-p", "0.95")
    a = ids_of(run(runner, smollm2_pte, "Once upon a time", *args, "--seed", "7"))
    b = ids_of(run(runner, smollm2_pte, "Once upon a time", *args, "--seed", "7"))
    c = [ids_of(run(runner, smollm2_pte, "Once upon a time", *args, "--seed", str(s))) for s in (8, 9)]
    greedy = ids_of(run(runner, smollm2_pte, "Once upon a time", "--print-ids", "--max-new-tokens", "24"))
    assert a == b
    assert any(x != a for x in c) and any(x != greedy for x in [a, *c])


# ---- tokenizer: id for id on the shared corpus ----

def test_tokenizer_equals_python_on_corpus(runner, smollm2_pte):
    from edgellm.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_pte)
    bad = []
    for text in CORPUS + EXTRA_TEXTS:
        got = ids_of(run(runner, smollm2_pte, text, "--tokenize-only"))
        if got != tok.encode(text):
            bad.append((text[:40], got[:12], tok.encode(text)[:12]))
    assert not bad, f"{len(bad)} of {len(CORPUS) + len(EXTRA_TEXTS)} texts differ: {bad[:3]}"


def test_chat_prompt_equals_python_and_user_text_stays_text(runner, smollm2_pte):
    """The chat prompt is tokenized exactly as Python's ``Tokenizer.encode_chat``: specials only
    from the template, special-token text typed by the user stays text (no injected turns)."""
    from edgellm.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_pte)
    specials = set(tok.special_tokens.values())
    n_template_specials = len([i for i in tok.encode_chat([{"role": "user", "content": "x"}]) if i in specials])
    checked_injection = 0
    for text in CORPUS:
        messages = [{"role": "user", "content": text}]
        got = ids_of(run(runner, smollm2_pte, text, "--tokenize-only", "--chat"))
        assert got == tok.encode_chat(messages), repr(text[:40])
        if any(s in text for s in tok.special_tokens):
            checked_injection += 1
            assert tok.decode(got) == tok.apply_chat_template(messages)
            assert len([i for i in got if i in specials]) == n_template_specials
    assert checked_injection, "the corpus should hold a text with special-token look-alikes"


# ---- bad input: one clear line, non-zero exit ----

def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm_run: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_path(runner, tmp_path):
    _one_line_error(run(runner, tmp_path / "nowhere", "hi", check=False), "manifest.json", "nowhere")


def test_prompt_longer_than_cache(runner, smollm2_pte):
    cap = json.loads((smollm2_pte / "manifest.json").read_text())["max_seq_len"]
    _one_line_error(run(runner, smollm2_pte, "word " * (cap + 10), check=False), "exceeds the KV cache capacity")
    # Fits alone, but not with the requested continuation.
    _one_line_error(run(runner, smollm2_pte, "word " * (cap - 20), "--max-new-tokens", "64", check=False),
                    "--max-new-tokens")


@pytest.mark.parametrize("edit,needle", [({"target": "onnx"}, "onnx artifact"),
                                         ({"flavour": "fast", "executorch": {"flavour": "fast", "custom_ops": True}},
                                          "--flavour portable")])
def test_wrong_artifact_kind(runner, smollm2_pte, tmp_path, edit, needle):
    for name in ("tokenizer.tiktoken", "tokenizer.meta.json"):
        shutil.copy(smollm2_pte / name, tmp_path / name)
    manifest = json.loads((smollm2_pte / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    _one_line_error(run(runner, tmp_path, "hi", check=False), needle)


def test_bad_flag(runner, smollm2_pte):
    _one_line_error(run(runner, smollm2_pte, "hi", "--top-p", "0", check=False), "--top-p")


def test_windowed_pte_generates_past_its_capacity_like_python(runner, tmp_path):
    """A windowed cache (tiny, fp32, window 32 + 4 sinks): the runner goes on past the capacity
    with the ids the Python runtime produces."""
    import runtime
    from edgellm.model import resolve_model
    from export.pipeline import run_export
    from runtime.generate import SamplingConfig, generate

    loaded = resolve_model(recipe="tiny", kv_cache={"window": 32, "sinks": 4})
    art = run_export(["executorch"], loaded=loaded, quant="none", out=tmp_path, progress=lambda s: None)["executorch"]
    n, prompt = 4 * 32, RAW_PROMPT * 3  # longer than the window: its prefill chunks end at the ring's wrap
    backend = runtime.load(art)
    assert len(backend.tokenizer.encode(prompt)) > 32
    ref = generate(backend, prompt, SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False))
    r = run(runner, art, prompt, "--print-ids", "--ignore-eos", "--max-new-tokens", str(n))
    assert len(ref.tokens) == n and ids_of(r) == ref.tokens
