"""ONNX export cost and ONNX Runtime speed, next to onnxruntime-genai's own model of the same weights.

For a recipe (default SmolLM2-135M, int4), in one run:
  * ours: ``python -m export --target onnx`` in a child process (wall time, peak RSS, size),
    then prefill tok/s (64-token prompt), TTFT and decode tok/s over 128 greedy steps at 1 and
    2 intra-op threads, each in a fresh child process (its own peak RSS), by ``runtime.bench.measure``;
  * the peer: the model onnxruntime-genai's builder makes from the same weights (an HF folder
    written with transformers' ``save_pretrained`` from our fp32 weights, tokenizer from the
    GGUF; ``-p int4 -e cpu``, accuracy_level 4), run with onnxruntime-genai at the same cache
    capacity, prompt and thread counts -- in its own virtualenv (a benchmark, not a dependency),
    created on demand -- timed by the same loop (``runtime.bench.measure_calls``, that file
    loaded by path in the peer's interpreter);
and prints a table plus the ours/peer decode ratio, and writes JSON.

    python -m bench.bench_onnx [--recipe smollm2-135m] [--max-seq-len 512] [--threads 1 2]
                               [--runs 5] [--out out/bench-onnx] [--json FILE] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgellm.artifact import dir_size

ROOT = Path(__file__).resolve().parents[1]
GENAI_PINS = ["onnxruntime-genai==0.18.0", "onnxruntime==1.31.1", "torch==2.13.0", "transformers", "onnx-ir"]  # the builder imports onnx_ir
PROMPT, DECODE = 64, 128


def _dir_mb(path: Path) -> float:
    return round(dir_size(path) / 1e6, 2)


def _child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), **kw)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def export_ours(recipe: str, max_seq_len: int, out: Path) -> dict:
    from runtime.bench import run_measured

    p, wall, peak = run_measured(["-m", "export", "--target", "onnx", "--recipe", recipe, "--quant", "int4",
                                  "--max-seq-len", str(max_seq_len), "--out", str(out)], cwd=ROOT, env=_child_env())
    if p.returncode:
        raise SystemExit(f"export failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    art = out / f"{recipe}-onnx-int4"
    return {"artifact": str(art), "export_wall_s": round(wall, 1), "export_peak_rss_mb": round(peak, 1),
            "size_mb": _dir_mb(art), "model_mb": round(sum(dir_size(p) for p in art.glob("model.onnx*")) / 1e6, 2)}


def measure_ours(artifact: str, threads: int, runs: int) -> dict:
    """In this (child) process: runtime.bench.measure on an OnnxBackend."""
    from runtime import load
    from runtime.bench import measure

    b = load(artifact, threads=threads)
    r = measure(b, PROMPT, DECODE, runs=runs, name=f"edgellm onnx ({threads}t)")
    return r.to_dict()


# ----------------------------------------------------------------------------- the peer

def genai_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} with {' '.join(GENAI_PINS)} (one-time)", flush=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    _run([str(py), "-m", "pip", "install", "-q", *GENAI_PINS])
    return py


def write_hf_folder(recipe: str, max_seq_len: int, folder: Path) -> Path:
    """Our fp32 weights as an HF LLaMA folder (save_pretrained) + the GGUF's tokenizer."""
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgellm.model import resolve_model

    loaded = resolve_model(recipe=recipe, max_seq_len=max_seq_len)
    c, rec = loaded.config, loaded.recipe
    if c.rope.type != "default":
        raise SystemExit(f"{recipe}: RoPE {c.rope.type} is not mapped to an HF config here")
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                     head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope.theta,
                     max_position_embeddings=max(max_seq_len, 2048), tie_word_embeddings=c.tie_embeddings,
                     bos_token_id=rec.bos_id, eos_token_id=rec.eos_ids[0], torch_dtype="float32")
    model = LlamaForCausalLM(hf)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in loaded.weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"HF folder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(folder)
    gguf = Path(loaded.origin)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(folder)
    return folder


def build_peer(py: Path, hf: Path, out: Path) -> dict:
    if (out / "genai_config.json").exists():
        return {"artifact": str(out), "build_wall_s": None, "size_mb": _dir_mb(out)}
    t = time.time()
    _run([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
          "-e", "cpu", "-c", str(out.parent / "genai-cache"), "--extra_options", "accuracy_level=4"])
    return {"artifact": str(out), "build_wall_s": round(time.time() - t, 1), "size_mb": _dir_mb(out)}


# Runs in the peer's virtualenv: runtime/bench.py loaded by path (it needs only numpy there), so
# the peer is timed by the same loop and reports its peak RSS the same way as ours.
PEER_MEASURE = r'''
import importlib.util, json, os, sys
bench_file, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(bench_file))))  # for edgellm.memory
threads, max_len, n_prompt, n_decode, runs = (int(x) for x in sys.argv[3:8])
spec = importlib.util.spec_from_file_location("edgellm_bench", bench_file)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # its dataclass looks the module up
spec.loader.exec_module(bench)
import onnxruntime_genai as og
cfg = og.Config(path)
cfg.clear_providers()
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
with open(os.path.join(path, "genai_config.json")) as f:
    vocab = json.load(f)["model"].get("vocab_size", 30000)
state = {}
def reset():
    state.clear()  # the previous generator is freed before the next one is made
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=max_len, do_sample=False, past_present_share_buffer=True)
    state["g"] = og.Generator(model, p)
def prefill(ids):
    state["g"].append_tokens(ids)  # prefill (logits of the last token computed)
def decode(_):
    state["g"].generate_next_token()
r = bench.measure_calls(prefill, decode, bench.bench_prompt(n_prompt, vocab), n_decode, runs,
                        f"onnxruntime-genai ({threads}t)", reset=reset)
state.clear()
print(json.dumps(r.to_dict()))
'''


def measure_peer(py: Path, model_dir: str, threads: int, max_len: int, runs: int,
                 prompt: int = PROMPT, decode: int = DECODE) -> dict:
    p = _run([str(py), "-c", PEER_MEASURE, str(ROOT / "runtime" / "bench.py"), model_dir, str(threads),
              str(max_len), str(prompt), str(decode), str(runs)])
    return _last_json(p.stdout)


# ----------------------------------------------------------------------------- report

def table(rows: list[dict], title: str):
    """runtime.bench.table of the rows, with their threads and size as extra columns."""
    from runtime.bench import BenchResult, table as bench_table

    return bench_table([BenchResult.from_dict(r, name=r["model"]) for r in rows], title,
                       extra={"threads": [r["threads"] for r in rows],
                              "size MB": [f"{r['size_mb']:.1f}" for r in rows]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--max-seq-len", type=int, default=512, help="KV cache capacity (ours and the peer's max_length)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per point (median; after one warm-up)")
    ap.add_argument("--out", default="out/bench-onnx")
    ap.add_argument("--json", help="write results here (default OUT/bench_onnx.json)")
    ap.add_argument("--no-peer", action="store_true", help="skip onnxruntime-genai")
    ap.add_argument("--genai-venv", default=os.environ.get("EDGELLM_GENAI_VENV", "/tmp/edgellm-genai-venv"))
    ap.add_argument("--artifact", help="measure this existing artifact instead of exporting")
    ap.add_argument("--_measure", nargs=2, metavar=("ARTIFACT", "THREADS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._measure:  # child: one speed point, JSON on the last line
        print(json.dumps(measure_ours(a._measure[0], int(a._measure[1]), a.runs)))
        return 0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"recipe": a.recipe, "max_seq_len": a.max_seq_len, "prompt": PROMPT, "decode": DECODE}
    if a.artifact:
        res["ours"] = {"artifact": a.artifact, "size_mb": _dir_mb(Path(a.artifact)), "export_wall_s": None,
                       "export_peak_rss_mb": None}
    else:
        print("exporting ours ...", flush=True)
        res["ours"] = export_ours(a.recipe, a.max_seq_len, out)
    rows = []
    peer = None
    if not a.no_peer:
        py = genai_python(Path(a.genai_venv))
        hf = write_hf_folder(a.recipe, a.max_seq_len, out / f"{a.recipe}-hf")
        print("building the onnxruntime-genai model ...", flush=True)
        peer = res["peer"] = build_peer(py, hf, out / f"{a.recipe}-genai-int4-cpu")
    for th in a.threads:  # interleave ours and the peer per thread count (shared, noisy machine)
        p = _run([sys.executable, "-m", "bench.bench_onnx", "--_measure", res["ours"]["artifact"], str(th),
                  "--runs", str(a.runs)], cwd=ROOT)
        r = _last_json(p.stdout)
        rows.append({"model": "edgellm onnx int4", "threads": th, "size_mb": res["ours"]["size_mb"], **r})
        if peer:
            r = measure_peer(py, peer["artifact"], th, a.max_seq_len, a.runs)
            rows.append({"model": "onnxruntime-genai int4", "threads": th, "size_mb": peer["size_mb"], **r})
    res["rows"] = rows
    if peer:
        res["decode_ratio_ours_over_peer"] = {
            str(th): round(next(r["decode_tok_s"] for r in rows if r["threads"] == th and r["model"].startswith("edgellm"))
                           / next(r["decode_tok_s"] for r in rows if r["threads"] == th and r["model"].startswith("onnxruntime-genai")), 3)
            for th in a.threads}
    from rich.console import Console

    con = Console(width=200)
    con.print(table(rows, f"{a.recipe} int4, cache {a.max_seq_len}, prompt {PROMPT}, decode {DECODE}"))
    o = res["ours"]
    con.print(f"ours: export {o['export_wall_s']} s, export peak RSS {o['export_peak_rss_mb']} MB, "
              f"artifact {o['size_mb']} MB (model files {o.get('model_mb')} MB)")
    if peer:
        con.print(f"peer: build {peer['build_wall_s']} s, {peer['size_mb']} MB; decode ratio ours/peer "
                  f"{res['decode_ratio_ours_over_peer']}")
    path = Path(a.json) if a.json else out / "bench_onnx.json"
    path.write_text(json.dumps(res, indent=2))
    con.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
