"""Bad input gets a clean refusal from both CLIs and the Python API: a non-zero exit code (1 bad
input, 2 usage, 3 I/O, 130 interrupted), one line on stderr naming the problem, no traceback,
and nothing partial left on disk. Plus fault injection: a full disk, ENOSPC mid-write, SIGINT
mid-export, and the quiet terminal of a real ``python -m`` run.

Most cases run the CLIs in-process (``main(argv)``: the same parsing, checks and error path,
without re-importing torch for each); a few run real subprocesses to cover the entry points.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from helpers import ctrl_c_reaches

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "recipes" / "tiny.yaml").read_text()


def _recipe(ctx, text: str, name="bad.yaml") -> str:
    p = ctx.tmp / name
    p.write_text(text)
    return str(p)


def _tiny_with(ctx, old: str, new: str) -> str:
    assert old in TINY, old
    return _recipe(ctx, TINY.replace(old, new))


def _artifact(ctx, mutate=None) -> str:
    """A private copy of the tiny ONNX artifact, optionally damaged by ``mutate(path)``."""
    dst = ctx.tmp / "art"
    shutil.copytree(ctx.art, dst)
    if mutate:
        mutate(dst)
    return str(dst)


def _edit_manifest(fn):
    def mutate(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        fn(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return mutate


def _hf_folder(ctx, config: dict | str | None, with_tokenizer=True) -> str:
    d = ctx.tmp / "hf"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if with_tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return str(d)


LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 128}

E, R, C = "export", "runtime", "make_checkpoint"
OUT = ["--out", "{out}"]

# (id, cli, argv (strings; "{out}" is the export root, callables get the context), exit code, text the message contains)
CASES = [
    # --- python -m export: numbers out of range
    ("export-n-layers-negative", E, ["--target", "onnx", "--recipe", "tiny", "--n-layers", "-2", *OUT], 1, "--n-layers"),
    ("export-n-layers-zero", E, ["--target", "onnx", "--recipe", "tiny", "--n-layers", "0", *OUT], 1, "--n-layers"),
    ("export-n-layers-deeper", E, ["--target", "onnx", "--recipe", "tiny", "--n-layers", "9", *OUT], 1, "1..2"),
    ("export-n-layers-not-int", E, ["--target", "onnx", "--n-layers", "two", *OUT], 2, "--n-layers"),
    ("export-max-seq-len-zero", E, ["--target", "onnx", "--recipe", "tiny", "--max-seq-len", "0", *OUT], 1, "--max-seq-len"),
    ("export-max-seq-len-one", E, ["--target", "onnx", "--recipe", "tiny", "--max-seq-len", "1", *OUT], 1, "at least 2"),
    ("export-max-seq-len-negative", E, ["--target", "onnx", "--recipe", "tiny", "--max-seq-len", "-8", *OUT], 1, "--max-seq-len"),
    ("export-max-seq-len-huge", E, ["--target", "onnx", "--recipe", "tiny", "--max-seq-len", "99999999", *OUT], 1, "--max-seq-len"),
    ("export-seed-negative", E, ["--target", "onnx", "--recipe", "tiny", "--seed", "-1", *OUT], 1, "--seed"),
    # --- flags that do not apply, unknown names
    ("export-flavour-on-coreml", E, ["--target", "coreml", "--recipe", "tiny", "--flavour", "turbo", *OUT], 1, "no flavour"),
    ("export-fast-flavour-on-coreml", E, ["--target", "coreml", "--recipe", "tiny", "--flavour", "fast", *OUT], 1, "fp16"),
    ("export-flavour-on-executorch", E, ["--target", "executorch", "--recipe", "tiny", "--flavour", "turbo", *OUT], 1, "portable"),
    ("export-flavour-for-all", E, ["--target", "all", "--recipe", "tiny", "--flavour", "portable", *OUT], 1, "no flavour"),
    ("export-unknown-target", E, ["--target", "tflite", *OUT], 2, "--target"),
    ("export-no-target", E, [*OUT], 2, "--target"),
    ("export-unknown-quant", E, ["--target", "onnx", "--quant", "int8", *OUT], 2, "--quant"),
    ("export-unknown-flag", E, ["--target", "onnx", "--layers", "2", *OUT], 2, "--layers"),
    ("export-unknown-recipe", E, ["--target", "onnx", "--recipe", "no-such-model", *OUT], 1, "unknown recipe"),
    # --- recipes that are not valid
    ("recipe-malformed-yaml", E, ["--target", "onnx", "--recipe", lambda c: _recipe(c, "name: [tiny\n"), *OUT], 1, "not valid YAML"),
    ("recipe-empty-file", E, ["--target", "onnx", "--recipe", lambda c: _recipe(c, ""), *OUT], 1, "mapping"),
    ("recipe-a-list", E, ["--target", "onnx", "--recipe", lambda c: _recipe(c, "- a\n- b\n"), *OUT], 1, "mapping"),
    ("recipe-dim-a-string", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "dim: 128", 'dim: "big"'), *OUT], 1, "dim"),
    ("recipe-n-layers-negative", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "n_layers: 2", "n_layers: -1"), *OUT], 1, "n_layers"),
    ("recipe-heads-do-not-divide", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "n_kv_heads: 2", "n_kv_heads: 3"), *OUT], 1, "n_kv_heads"),
    ("recipe-unknown-field", E, ["--target", "onnx", "--recipe", lambda c: _recipe(c, TINY + "colour: blue\n"), *OUT], 1, "colour"),
    ("recipe-missing-field", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "max_seq_len: 256\n", ""), *OUT], 1, "max_seq_len"),
    ("recipe-max-seq-len-one", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "max_seq_len: 256", "max_seq_len: 1"), *OUT], 1, "max_seq_len"),
    ("recipe-group-size-odd", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "group_size: 32", "group_size: 33"), *OUT], 1, "group_size"),
    ("recipe-group-size-string", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "group_size: 32", "group_size: x"), *OUT], 1, "group_size"),
    ("recipe-symmetric-not-bool", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "symmetric: true", "symmetric: 3"), *OUT], 1, "symmetric"),
    ("recipe-scheme-unknown", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "scheme: int4", "scheme: int3"), *OUT], 1, "scheme"),
    ("recipe-eos-not-ints", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "eos_ids: [2]", "eos_ids: [x]"), *OUT], 1, "eos_ids"),
    ("recipe-name-a-path", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "name: tiny", "name: ../../evil"), *OUT], 1, "name"),
    ("recipe-rope-type-unknown", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "type: linear", "type: spiral"), *OUT], 1, "RoPE"),
    ("recipe-rope-theta-negative", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "theta: 10000.0", "theta: -5"), *OUT], 1, "theta"),
    ("recipe-norm-eps-zero", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "norm_eps: 1.0e-5", "norm_eps: 0"), *OUT], 1, "norm_eps"),
    ("recipe-tie-not-bool", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "tie_embeddings: false", "tie_embeddings: maybe"), *OUT], 1, "tie_embeddings"),
    ("recipe-targets-not-a-list", E, ["--target", "all", "--recipe", lambda c: _tiny_with(c, "targets: [executorch, onnx, coreml]", "targets: onnx"), *OUT], 1, "targets"),
    ("recipe-unknown-target", E, ["--target", "all", "--recipe", lambda c: _tiny_with(c, "targets: [executorch, onnx, coreml]", "targets: [tflite]"), *OUT], 1, "tflite"),
    ("recipe-tokenizer-source-unknown", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "source: gguf", "source: sentencepiece"), *OUT], 1, "tokenizer.source"),
    ("recipe-tokenizer-file-missing", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, "asset: smollm2-135m-instruct.gguf", "path: /nonexistent/tok.gguf"), *OUT], 1, "does not exist"),
    ("recipe-chat-template-incomplete", E, ["--target", "onnx", "--recipe", lambda c: _tiny_with(c, '  generation_prompt: "<|im_start|>assistant\\n"\n', ""), *OUT], 1, "generation_prompt"),
    ("recipe-binary-file", E, ["--target", "onnx", "--recipe", lambda c: (c.tmp / "b.yaml").write_bytes(b"\xff\xfe\x00\x81") and str(c.tmp / "b.yaml"), *OUT], 1, "recipe"),
    # --- checkpoints that are not valid
    ("checkpoint-missing", E, ["--target", "onnx", "--checkpoint", "/nonexistent/model", *OUT], 1, "does not exist"),
    ("checkpoint-folder-without-config", E, ["--target", "onnx", "--checkpoint", lambda c: _hf_folder(c, None), *OUT], 1, "config.json"),
    ("checkpoint-config-not-json", E, ["--target", "onnx", "--checkpoint", lambda c: _hf_folder(c, "{not json"), *OUT], 1, "JSON"),
    ("checkpoint-config-field-missing", E, ["--target", "onnx", "--checkpoint", lambda c: _hf_folder(c, {k: v for k, v in LLAMA_CONFIG.items() if k != "hidden_size"}), *OUT], 1, "hidden_size"),
    ("checkpoint-config-field-a-string", E, ["--target", "onnx", "--checkpoint", lambda c: _hf_folder(c, {**LLAMA_CONFIG, "num_hidden_layers": "many"}), *OUT], 1, "n_layers"),
    ("checkpoint-without-weights", E, ["--target", "onnx", "--checkpoint", lambda c: _hf_folder(c, LLAMA_CONFIG), *OUT], 1, "weight"),
    ("checkpoint-a-text-file", E, ["--target", "onnx", "--checkpoint", lambda c: _recipe(c, "hello", "model.txt"), *OUT], 1, "neither"),
    ("checkpoint-a-fake-gguf", E, ["--target", "onnx", "--checkpoint", lambda c: _recipe(c, "not a gguf", "model.gguf"), *OUT], 1, "gguf"),
    # --- where the output goes
    ("out-is-a-file", E, ["--target", "onnx", "--recipe", "tiny", "--out", lambda c: _recipe(c, "x", "file")], 1, "is a file"),
    ("out-under-a-file", E, ["--target", "onnx", "--recipe", "tiny", "--out", lambda c: _recipe(c, "x", "file") + "/sub"], 1, "is a file"),
    # --- python -m runtime: specs
    ("spec-missing", R, ["generate", "/nonexistent/artifact", "--prompt", "hi"], 1, "not an artifact directory"),
    ("spec-folder-without-manifest", R, ["generate", lambda c: str(c.tmp), "--prompt", "hi"], 1, "manifest.json"),
    ("spec-manifest-corrupt", R, ["generate", lambda c: _artifact(c, lambda d: (d / "manifest.json").write_text("{oops")), "--prompt", "hi"], 1, "corrupt"),
    ("spec-manifest-not-ours", R, ["generate", lambda c: _artifact(c, _edit_manifest(lambda m: m.update(format="other"))), "--prompt", "hi"], 1, "not an edgellm manifest"),
    ("spec-manifest-without-files", R, ["generate", lambda c: _artifact(c, _edit_manifest(lambda m: m.pop("files"))), "--prompt", "hi"], 1, "lists no files"),
    ("spec-model-modified", R, ["generate", lambda c: _artifact(c, lambda d: (d / "model.onnx").open("ab").write(b"x")), "--prompt", "hi"], 1, "sha256"),
    ("spec-tokenizer-deleted", R, ["generate", lambda c: _artifact(c, lambda d: (d / "tokenizer.tiktoken").unlink()), "--prompt", "hi"], 1, "missing"),
    ("spec-tokenizer-unlisted-and-gone", R, ["generate", lambda c: _artifact(c, lambda d: [(d / "tokenizer.tiktoken").unlink(), (d / "tokenizer.meta.json").unlink(), _edit_manifest(lambda m: [m["files"].pop("tokenizer.tiktoken"), m["files"].pop("tokenizer.meta.json")])(d)]), "--prompt", "hi"], 1, "no tokenizer"),
    ("spec-eager-unknown-recipe", R, ["generate", "eager:no-such-model", "--prompt", "hi"], 1, "unknown recipe"),
    ("spec-eager-unknown-suffix", R, ["generate", "eager:tiny:int8", "--prompt", "hi"], 1, "unknown recipe"),
    # --- generate: sampling and sizes
    ("generate-max-new-tokens-negative", R, ["generate", "{art}", "--prompt", "hi", "--max-new-tokens", "-5"], 1, "max_new_tokens"),
    ("generate-max-new-tokens-zero", R, ["generate", "{art}", "--prompt", "hi", "--max-new-tokens", "0"], 1, "max_new_tokens"),
    ("generate-past-the-cache", R, ["generate", "{art}", "--prompt", "hi", "--max-new-tokens", "100000"], 1, "capacity"),
    ("generate-temperature-negative", R, ["generate", "{art}", "--prompt", "hi", "--temperature", "-1"], 1, "temperature"),
    ("generate-temperature-nan", R, ["generate", "{art}", "--prompt", "hi", "--temperature", "nan"], 1, "temperature"),
    ("generate-temperature-inf", R, ["generate", "{art}", "--prompt", "hi", "--temperature", "inf"], 1, "temperature"),
    ("generate-top-p-zero", R, ["generate", "{art}", "--prompt", "hi", "--top-p", "0"], 1, "top_p"),
    ("generate-top-p-above-one", R, ["generate", "{art}", "--prompt", "hi", "--top-p", "1.5"], 1, "top_p"),
    ("generate-top-k-negative", R, ["generate", "{art}", "--prompt", "hi", "--top-k", "-3"], 1, "top_k"),
    ("generate-repetition-penalty-zero", R, ["generate", "{art}", "--prompt", "hi", "--repetition-penalty", "0"], 1, "repetition_penalty"),
    ("generate-seed-negative", R, ["generate", "{art}", "--prompt", "hi", "--seed", "-1"], 1, "seed"),
    ("generate-threads-zero", R, ["generate", "{art}", "--prompt", "hi", "--threads", "0"], 1, "--threads"),
    ("generate-threads-thousands", R, ["generate", "{art}", "--prompt", "hi", "--threads", "10000"], 1, "--threads"),
    ("generate-empty-prompt", R, ["generate", "{art}", "--prompt", ""], 1, "--prompt"),
    ("generate-max-seq-len-on-artifact", R, ["generate", "{art}", "--prompt", "hi", "--max-seq-len", "64"], 1, "only applies to eager"),
    ("generate-max-seq-len-one-eager", R, ["generate", "eager:tiny", "--prompt", "hi", "--max-seq-len", "1"], 1, "--max-seq-len"),
    ("generate-cache-larger-than-memory", R, ["generate", "eager:smollm2-135m", "--prompt", "hi", "--max-seq-len", "1000000"], 1, "KV cache"),
    ("generate-no-prompt", R, ["generate", "{art}"], 2, "--prompt"),
    ("generate-max-new-tokens-not-int", R, ["generate", "{art}", "--prompt", "hi", "--max-new-tokens", "many"], 2, "--max-new-tokens"),
    # --- bench
    ("bench-threads-thousands", R, ["bench", "{art}", "--threads", "10000"], 1, "--threads"),
    ("bench-threads-zero", R, ["bench", "{art}", "--threads", "1", "0"], 1, "--threads"),
    ("bench-decode-tokens-negative", R, ["bench", "{art}", "--decode-tokens", "-4"], 1, "--decode-tokens"),
    ("bench-prompt-tokens-zero", R, ["bench", "{art}", "--prompt-tokens", "0"], 1, "--prompt-tokens"),
    ("bench-runs-zero", R, ["bench", "{art}", "--runs", "0"], 1, "--runs"),
    ("bench-past-the-cache", R, ["bench", "{art}", "--prompt-tokens", "200", "--decode-tokens", "200", "--threads", "1"], 1, "cache"),
    ("bench-json-in-missing-folder", R, ["bench", "{art}", "--json", "/nonexistent/dir/b.json"], 1, "--json"),
    # --- parity
    ("parity-only-eager", R, ["parity", "eager:tiny"], 1, "--reference"),
    ("parity-steps-zero", R, ["parity", "{art}", "--steps", "0"], 1, "--steps"),
    ("parity-text-tokens-one", R, ["parity", "{art}", "--text-tokens", "1"], 1, "--text-tokens"),
    ("parity-text-missing", R, ["parity", "{art}", "--text", "/nonexistent.txt"], 1, "--text"),
    ("parity-text-empty", R, ["parity", "{art}", "--text", lambda c: _recipe(c, "  \n", "empty.txt"), "--steps", "1"], 1, "empty"),
    ("parity-text-and-no-text", R, ["parity", "{art}", "--text", lambda c: _recipe(c, "words", "t.txt"), "--no-text"], 1, "contradict"),
    ("parity-json-is-a-folder", R, ["parity", "{art}", "--json", lambda c: str(c.tmp)], 1, "folder"),
    ("parity-plot-in-missing-folder", R, ["parity", "{art}", "--plot", "/nonexistent/p.png"], 1, "--plot"),
    ("parity-reference-missing", R, ["parity", "{art}", "--reference", "/nonexistent/ref"], 1, "not an artifact"),
    # --- tokenize / inspect / usage
    ("tokenize-missing-spec", R, ["tokenize", "/nonexistent/x", "hello"], 1, "/nonexistent/x"),
    ("inspect-missing-spec", R, ["inspect", "/nonexistent/x"], 1, "not an artifact"),
    ("inspect-corrupt-artifact", R, ["inspect", lambda c: _artifact(c, lambda d: (d / "model.onnx").write_bytes(b"0"))], 1, "sha256"),
    ("runtime-no-command", R, [], 2, "required"),
    ("runtime-unknown-command", R, ["serve"], 2, "serve"),
    # --- python -m export.make_checkpoint
    ("checkpoint-writer-n-layers-zero", C, ["tiny", "{out}", "--n-layers", "0"], 1, "--n-layers"),
    ("checkpoint-writer-too-deep", C, ["tiny", "{out}", "--n-layers", "5000"], 1, "n_layers"),
    ("checkpoint-writer-shard-zero", C, ["tiny", "{out}", "--shard-gb", "0"], 1, "--shard-gb"),
    ("checkpoint-writer-unknown-recipe", C, ["no-such-model", "{out}"], 1, "unknown recipe"),
    ("checkpoint-writer-exists", C, ["tiny", lambda c: str(c.tmp)], 1, "exists"),
    ("checkpoint-writer-bad-dtype", C, ["tiny", "{out}", "--dtype", "int8"], 2, "--dtype"),
]


class Ctx:
    def __init__(self, tmp: Path, art: Path):
        self.tmp, self.art, self.out = tmp, art, tmp / "out"


def _mains():
    from export.__main__ import main as export_main
    from export.make_checkpoint import main as checkpoint_main
    from runtime.__main__ import main as runtime_main

    return {E: export_main, R: runtime_main, C: checkpoint_main}


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _expect_clean_refusal(code, err: str, expected_code: int, needle: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.fixture(scope="module")
def tiny_onnx(export_artifact):
    return export_artifact("onnx", "tiny", "int4")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(case, tmp_path, tiny_onnx, capsys):
    _, cli, argv, expected, needle = case
    ctx = Ctx(tmp_path, tiny_onnx)
    args = [a(ctx) if callable(a) else a.format(out=ctx.out, art=tiny_onnx) for a in argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = _mains()[cli](args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    _expect_clean_refusal(code, err, expected, needle)
    assert _snapshot(tmp_path) == before, "something was left on disk"
    if cli == E:
        assert not ctx.out.exists()


def test_the_catalogue_is_large():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- the Python API

def _api_cases(tiny_eager):
    import runtime
    from edgellm.config import ModelConfig
    from edgellm.model import resolve_model
    from edgellm.recipes import parse_recipe
    from export.make_checkpoint import write_checkpoint
    from export.pipeline import run_export
    from runtime.bench import measure

    return {
        "run_export-n-layers": lambda t: run_export("onnx", recipe="tiny", n_layers=-1, out=t / "o"),
        "run_export-target": lambda t: run_export(["tflite"], recipe="tiny", out=t / "o"),
        "run_export-targets-not-names": lambda t: run_export([3], recipe="tiny", out=t / "o"),
        "run_export-quant": lambda t: run_export("onnx", recipe="tiny", quant="int3", out=t / "o"),
        "run_export-out-file": lambda t: run_export("onnx", recipe="tiny", out=t / "a-file"),
        "resolve_model-missing-checkpoint": lambda t: resolve_model("/nonexistent/ck"),
        "resolve_model-max-seq-len-float": lambda t: resolve_model(recipe="tiny", max_seq_len=2.5),
        "load-missing": lambda t: runtime.load(str(t / "nothing")),
        "load-threads": lambda t: runtime.load("eager:tiny", threads=0),
        "load-option-not-taken": lambda t: runtime.load("eager:tiny", engine="coreml"),
        "sampling-top-p": lambda t: runtime.SamplingConfig(top_p=2),
        "sampling-max-new-tokens": lambda t: runtime.SamplingConfig(max_new_tokens=0),
        "generate-empty-ids": lambda t: runtime.generate(tiny_eager, []),
        "measure-zero-tokens": lambda t: measure(tiny_eager, 0, 4),
        "measure-past-the-cache": lambda t: measure(tiny_eager, 200, 200),
        "parse_recipe-not-a-mapping": lambda t: parse_recipe(["x"]),
        "model-config-dim": lambda t: ModelConfig(vocab_size=10, dim="big", n_layers=1, n_heads=2, hidden_dim=8),
        "write_checkpoint-n-layers": lambda t: write_checkpoint("tiny", t / "ck", n_layers=0),
        "forward-token-out-of-vocab": lambda t: tiny_eager.forward_all([10**9]),
    }


@pytest.fixture(scope="module")
def tiny_eager():
    import runtime

    return runtime.load("eager:tiny", max_seq_len=64)


def test_python_api_refuses_bad_input_with_one_line_errors(tmp_path, tiny_eager):
    cases = _api_cases(tiny_eager)
    for name, call in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "a-file").write_text("x")
        before = _snapshot(d)
        tiny_eager.reset()
        with pytest.raises((EdgeLLMError, ValueError)) as info:
            call(d)
        message = str(info.value)
        assert message and "\n" not in message, (name, message)
        assert _snapshot(d) == before, name


# --------------------------------------------------------------------------- faults

def _have_user_namespaces() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _have_user_namespaces(), reason="needs `unshare --user --mount` to mount a small tmpfs")
def test_a_full_disk_is_refused_before_any_work(tmp_path):
    """A 4 MB tmpfs cannot hold even the tiny artifact: refused up front, nothing written."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && cd {ROOT} && "
              f"{sys.executable} -m export --target onnx --recipe tiny --out {mnt}/out; rc=$?; "
              f"echo LEFT:$(ls -A {mnt}); exit $rc")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    _expect_clean_refusal(r.returncode, r.stderr, 1, "free")
    assert r.stdout.strip().splitlines()[-1] == "LEFT:", r.stdout  # nothing in the tmpfs


def test_no_space_mid_write_exits_3_and_leaves_nothing(tmp_path, tiny, tiny_quant, monkeypatch, capsys):
    """ENOSPC while the artifact is being written (injected into the writer): exit 3, one line,
    no temp directory, no lock file, no output folder."""
    from edgellm import cli
    from edgellm.artifact import ArtifactWriter
    from export.pipeline import run_export

    real_commit = ArtifactWriter.commit

    def full_disk(self, manifest):
        (self.dir / "partial.bin").write_bytes(b"x" * 1024)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.dir / "partial.bin"))

    monkeypatch.setattr(ArtifactWriter, "commit", full_disk)
    out = tmp_path / "out"
    code = cli.run(lambda term: run_export(["onnx"], loaded=tiny, quantization=tiny_quant, out=out,
                                           progress=lambda m: None) and 0,
                   prog="python -m export", capture=False)
    monkeypatch.setattr(ArtifactWriter, "commit", real_commit)
    _expect_clean_refusal(code, capsys.readouterr().err, 3, "space")
    assert not out.exists(), list(out.rglob("*"))


def test_sigint_mid_export_exits_130_and_leaves_nothing(tmp_path):
    """Ctrl-C while the exporter traces: exit 130, one line, no --out folder."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "export", "--target", "onnx", "--recipe", "tiny", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         preexec_fn=ctrl_c_reaches)
    for line in p.stdout:  # the progress lines; interrupt once tracing has started
        if "tracing" in line:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    _expect_clean_refusal(p.returncode, err, 130, "interrupted")
    assert not out.exists(), list(out.rglob("*"))


def test_real_command_lines_are_quiet_and_fail_in_one_line(tmp_path):
    """The ``python -m`` entry points: library warnings go to the log file, not the terminal; a bad
    input is one line before torch is even imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_HOME": str(tmp_path / "home")}
    env.pop("EDGELLM_VERBOSE", None)
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "runtime", "bench", "eager:tiny", "--threads", "10000"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    _expect_clean_refusal(r.returncode, r.stderr, 1, "--threads")
    assert time.time() - t < 60
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", "eager:tiny", "--prompt", "The",
                        "--max-new-tokens", "3"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The"), r.stdout
    noise = [line for line in r.stderr.splitlines() if not line.startswith("[")]
    assert noise == [], noise  # only the stats line; torchao/torch warnings are in the log
    log = (tmp_path / "home" / "logs" / "runtime-generate.log").read_text()
    assert "python -m runtime generate" in log
    r = subprocess.run([sys.executable, "-m", "runtime", "--verbose", "generate", "eager:tiny", "--prompt", "The",
                        "--max-new-tokens", "3"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and len(r.stderr.splitlines()) > 1  # --verbose shows the libraries' lines


def test_sigkill_mid_write_leaves_a_temp_folder_the_next_export_removes(tmp_path, tiny, tiny_quant):
    """SIGKILL runs no cleanup: the hidden temp folder of the killed export stays, unused; the
    next export to the same place recognises it as stale and removes it."""
    from export.pipeline import run_export

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "export", "--target", "onnx", "--recipe", "tiny", "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.is_dir() and any(d.is_dir() for d in out.iterdir())):
        time.sleep(0.02)  # the writer's temp folder: the model is being written
    p.kill()
    p.wait()
    stale = [d.name for d in out.iterdir() if d.is_dir()]
    assert stale and all(n.startswith(".tiny-onnx-int4.") for n in stale), stale
    art = run_export(["onnx"], loaded=tiny, quantization=tiny_quant, out=out, progress=lambda m: None)["onnx"]
    assert sorted(p.name for p in out.iterdir()) == [art.name]


def test_a_terminal_sees_no_library_warnings_during_an_export(tmp_path):
    """On a real terminal (a pty), with the live progress line active, the libraries' warnings
    still go to the log: none reaches the screen; the log has them."""
    import pty

    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_HOME": str(tmp_path / "home"), "COLUMNS": "120"}
    env.pop("EDGELLM_VERBOSE", None)
    leader, follower = pty.openpty()
    # ExecuTorch's lowering raises Python warnings (FutureWarning) while the live line is up
    p = subprocess.Popen([sys.executable, "-m", "export", "--target", "executorch", "--recipe", "tiny", "--out",
                          str(tmp_path / "out")], stdin=follower, stdout=follower, stderr=follower, env=env,
                         cwd=tmp_path)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert p.wait(timeout=300) == 0, screen.decode(errors="replace")[-2000:]
    text = screen.decode(errors="replace")
    assert "tiny-executorch-int4" in text and "executorch: trace" in text
    for noise in ("Warning", "WARNING", "W1201", "Failed to load", "Traceback"):
        assert noise not in text, noise
    assert "Failed to load" in (tmp_path / "out" / "export.log").read_text()  # torchao, at import
