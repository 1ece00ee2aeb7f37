"""Bench the ExecuTorch artifacts of a recipe, and ExecuTorch's own LLM export of the same weights.

For each flavour (portable, fast) and quant (int4, fp32): .pte size, export wall time and peak
RSS (each export in its own subprocess, ``runtime.bench.run_measured``), prefill tok/s on a
64-token prompt, time to first token, decode tok/s over 128 tokens at 1 and 2 threads
(``runtime.bench.measure_calls`` on the raw program, so ours and the peer run the same calls),
runtime peak RSS (each measurement in its own subprocess). The peer is
``executorch.examples.models.llama.export_llama``
(8da4w, 4-bit embedding group 32, custom SDPA + KV cache ops, XNNPACK) run on a Meta-layout
checkpoint written from our fp32 weights. Prints a table and writes JSON.

    python bench/bench_executorch.py [--recipe smollm2-135m] [--flavours portable,fast] [--quants int4,fp32]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable


def run_child(args: list[str], env=None) -> tuple[int, float, float, str]:
    """(returncode, wall seconds, peak RSS MB, stdout) of a python subprocess."""
    from runtime.bench import run_measured

    p, wall, rss = run_measured(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                python=PY)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
    return p.returncode, wall, rss, p.stdout


# ---- children ----

def child_export(recipe: str, max_seq_len: int, flavour: str, quant_file: str | None, out: str):
    import torch

    from edgellm.model import resolve_model
    from export.pipeline import run_export

    loaded = resolve_model(recipe=recipe, max_seq_len=max_seq_len)
    q = torch.load(quant_file, weights_only=False) if quant_file else None
    path = run_export(["executorch"], loaded=loaded, quantization=q, quant="int4" if q is not None else "none",
                      flavour=flavour, out=out, progress=lambda s: print(s, file=sys.stderr))["executorch"]
    print("ARTIFACT", path)


def child_run(pte: str, custom_ops: bool, vocab: int, pos_mode: str, prompt_file: str,
              threads_list=(1, 2), runs: int = 3, decode_tokens: int = 128):
    """Time prefill (the prompt file's ids), TTFT and ``decode_tokens`` decode steps per thread count."""
    import torch

    from runtime.backends.executorch import load_program, set_threads
    from runtime.bench import measure_calls

    prompt = json.loads(Path(prompt_file).read_text())

    def fwd(prog, ids, start) -> int:  # the greedy next token
        toks = torch.tensor([ids], dtype=torch.long)
        pos = (torch.arange(start, start + len(ids)) if pos_mode == "vector" else torch.tensor([start]))
        logits = prog.forward((toks, pos.long()))[0]
        return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())

    res = {}
    for threads in threads_list:
        set_threads(threads)  # before loading: a resize invalidates loaded XNNPACK delegates
        prog = load_program(Path(pte), custom_ops)
        at = [0]  # the next decode position

        def prefill(ids, prog=prog):
            at[0] = len(ids)
            return fwd(prog, ids, 0)

        def decode(tok, prog=prog):
            at[0] += 1
            return fwd(prog, [tok], at[0] - 1)

        r = measure_calls(prefill, decode, prompt, decode_tokens, runs=runs, name=f"{Path(pte).name} ({threads}t)")
        res[threads] = {"prefill_tok_s": r.prefill_tok_s, "ttft_ms": r.ttft_ms, "decode_tok_s": r.decode_tok_s}
        prog = prefill = decode = None  # released before the pool it was built with is resized
    print("RESULT " + json.dumps(res))


# ---- the peer: ExecuTorch's own LLM export ----

def write_meta_checkpoint(loaded, directory: Path) -> tuple[Path, Path]:
    """Our fp32 weights in the Meta layout export_llama reads (q/k rows un-permuted to the
    interleaved RoPE pairing ExecuTorch's Transformer uses) + params.json."""
    import torch

    cfg, st = loaded.config, loaded.weights  # a lazy Mapping: each tensor read when indexed
    if cfg.rope.type != "default":
        raise ValueError("the peer export is only wired for unscaled RoPE")

    def unpermute(w, n_heads):  # HF rotate-half rows -> Meta interleaved rows
        d = cfg.head_dim
        return w.reshape(n_heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()

    out = {"tok_embeddings.weight": st["embed_tokens.weight"], "norm.weight": st["norm.weight"],
           "output.weight": st["lm_head.weight"] if "lm_head.weight" in st else st["embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = unpermute(st[p + "self_attn.q_proj.weight"], cfg.n_heads)
        out[p + "attention.wk.weight"] = unpermute(st[p + "self_attn.k_proj.weight"], cfg.n_kv_heads)
        out[p + "attention.wv.weight"] = st[p + "self_attn.v_proj.weight"]
        out[p + "attention.wo.weight"] = st[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = st[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = st[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = st[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = st[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = st[p + "post_attention_layernorm.weight"]
    directory.mkdir(parents=True, exist_ok=True)
    ck, params = directory / "model.pth", directory / "params.json"
    torch.save({k: v.float().contiguous() for k, v in out.items()}, ck)
    params.write_text(json.dumps({"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                                  "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
                                  "hidden_dim": cfg.hidden_dim, "norm_eps": cfg.norm_eps,
                                  "rope_theta": cfg.rope.theta, "use_scaled_rope": False}))
    return ck, params


def peer_export_args(ck: Path, params: Path, out_dir: Path, max_seq_len: int, bos: int, eos: list[int]) -> list[str]:
    return ["-m", "executorch.examples.models.llama.export_llama", "--model", "smollm2",
            "--checkpoint", str(ck), "--params", str(params), "-kv", "--use_sdpa_with_kv_cache", "-X",
            "-d", "fp32", "-qmode", "8da4w", "-G", "32", "-E", "4,32",
            "--max_seq_length", str(max_seq_len), "--max_context_length", str(max_seq_len),
            "--metadata", json.dumps({"get_bos_id": bos, "get_eos_ids": eos}),
            "--output-dir", str(out_dir), "--output_name", str(out_dir / "peer.pte")]  # 1.5.1 writes output_name relative to the cwd


# ---- driver ----

def measure_pte(pte: Path, custom_ops: bool, vocab: int, pos_mode: str, prompt_file: Path) -> dict:
    rc, wall, rss, out = run_child([__file__, "_run", str(pte), str(int(custom_ops)), str(vocab), pos_mode,
                                    str(prompt_file)])
    if rc != 0:
        return {"error": f"runtime child failed (rc {rc})"}
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {"size_mb": pte.stat().st_size / 1e6, "runtime_rss_mb": rss, **{f"t{k}": v for k, v in res.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--flavours", "--variants", dest="flavours", default="portable,fast",
                    help="export flavours (--variants: the old name)")
    ap.add_argument("--quants", default="int4,fp32")
    ap.add_argument("--out", default="out/bench-executorch")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already in --out (no export timing)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-pte", help="an already exported peer .pte (skips the peer export)")
    ap.add_argument("--json", default="bench_executorch.json")
    a = ap.parse_args(argv)
    import torch

    from edgellm.artifact import artifact_name, read_manifest
    from edgellm.model import resolve_model
    from export.pipeline import quantize_for

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    loaded = resolve_model(recipe=a.recipe, max_seq_len=a.max_seq_len)
    tok = loaded.tokenizer()
    from edgellm.assets import fetch

    prompt = tok.encode(fetch("us-constitution.txt").read_text())[:64]
    prompt_file = out / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))
    rows = []
    quant_file = None
    if "int4" in a.quants.split(","):
        quant_file = out / "quantization.pt"
        if not quant_file.exists():
            t = time.time()
            torch.save(quantize_for(loaded, "int4", progress=lambda s: None), quant_file)
            print(f"shared int4 quantization: {time.time() - t:.1f}s (computed once, not in export times)")
    for quant in a.quants.split(","):
        for flavour in a.flavours.split(","):
            name = artifact_name(loaded.recipe.name, "executorch", f"{quant}-{flavour}")
            art = out / name
            row = {"name": name, "variant": flavour, "quant": quant}  # "variant": the JSON key readers know
            if not (a.reuse and art.exists()):
                rc, wall, rss, _ = run_child([__file__, "_export", a.recipe, str(a.max_seq_len), flavour,
                                              str(quant_file) if quant == "int4" else "", str(out)])
                row.update(export_s=wall, export_rss_mb=rss, export_rc=rc)
                if rc != 0:
                    rows.append(row)
                    continue
            m = read_manifest(art, verify=False)  # the .pte's name and whether it needs the custom ops
            row.update(measure_pte(art / m["artifact"], bool(m["executorch"]["custom_ops"]), loaded.config.vocab_size,
                                   "vector", prompt_file))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not a.no_peer:
        row = {"name": "executorch export_llama (8da4w, emb 4-bit, sdpa+kv custom ops)", "variant": "peer",
               "quant": "int4"}
        pte = Path(a.peer_pte) if a.peer_pte else out / "peer" / "peer.pte"
        if not a.peer_pte:
            ck, params = write_meta_checkpoint(loaded, out / "peer")
            rc, wall, rss, _ = run_child(peer_export_args(ck, params, out / "peer", a.max_seq_len,
                                                          loaded.recipe.bos_id, loaded.recipe.eos_ids))
            row.update(export_s=wall, export_rss_mb=rss, export_rc=rc)
        if pte.exists():
            row.update(measure_pte(pte, True, loaded.config.vocab_size, "start", prompt_file))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    Path(a.json).write_text(json.dumps(rows, indent=2))


def print_table(rows):
    cols = ["name", "size_mb", "export_s", "export_rss_mb", "t1.prefill_tok_s", "t1.ttft_ms", "t1.decode_tok_s",
            "t2.prefill_tok_s", "t2.decode_tok_s", "runtime_rss_mb"]

    def get(r, c):
        if "." in c:
            t, k = c.split(".")
            v = r.get(t, {}).get(k)
        else:
            v = r.get(c)
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(get(r, c) for c in cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_export":
        child_export(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] or None, sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "_run":
        opt = [int(x) for x in sys.argv[7:10]]  # [threads runs decode_tokens], as bench.compare passes them
        child_run(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5], sys.argv[6],
                  *(((opt[0],), *opt[1:]) if opt else ()))
    else:
        main()
