"""Quality of the shared quantization's configurations on SmolLM2-135M (eager reference).

Per configuration: perplexity on the evaluation text (first N tokens, default 2048, of the US
constitution, one window, N-1 scored), mean KL(unquantized || quantized) per scored token and
top-1 agreement with the unquantized model, model bytes (``Quantization.summary()["bytes"]`` +
the float tensors at fp32, i.e. what an artifact carries), quantization time. Each
configuration is the eager decoder with its weights replaced by the quantized reference
(``apply_reference``); ``+8da`` adds int8 per-token dynamic activation fake-quant (what the
ExecuTorch 8da4w artifact computes). Writes JSON and a PNG of perplexity against megabytes with
the peers' points (issue 13). SmolLM2's shipped weights are a Q4_1 GGUF dequantized, which
flatters Q4_1-like (asymmetric, group-32) formats: read the figures with that in mind.

    .venv/bin/python bench/quant_quality.py [--tokens 2048] [--variants a,b,...] [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from edgellm.model import resolve_model  # noqa: E402
from edgellm.quantization import apply_reference, quantize  # noqa: E402

E8 = dict(embedding="int8")  # tied: the head is the same tensor
KV8 = {"layers.*.self_attn.k_proj.weight": "int8", "layers.*.self_attn.v_proj.weight": "int8",
       "layers.0.*": "int8", "layers.29.*": "int8"}
# name -> (QuantConfig overrides or None for fp32, dynamic activations)
VARIANTS = {
    "fp32": (None, False),
    "default (scale-search, all int4)": (dict(method="scale-search"), False),
    "scale-search, emb/head int8": (dict(method="scale-search", **E8), False),
    "gptq, emb/head int8": (dict(method="gptq", **E8), False),
    "hqq, emb/head int8": (dict(method="hqq", **E8), False),
    "rtn, emb/head int8": (dict(method="rtn", **E8), False),
    "gptq (2048 calib tokens), emb/head int8": (dict(method="gptq", calibration_tokens=2048, **E8), False),
    "rtn": (dict(method="rtn"), False),
    "hqq": (dict(method="hqq"), False),
    "gptq": (dict(method="gptq"), False),
    "gptq, emb/head int8 +8da": (dict(method="gptq", **E8), True),
    "scale-search asym, emb/head int8": (dict(method="scale-search", symmetric=False, **E8), False),
    "hqq asym, emb/head int8": (dict(method="hqq", symmetric=False, **E8), False),
    "gptq asym, emb/head int8": (dict(method="gptq", symmetric=False, **E8), False),
    "all int8 (scale-search)": (dict(method="scale-search", linears="int8", **E8), False),
    "emb/head float (scale-search)": (dict(method="scale-search", embedding="float"), False),
    # int8 where it is cheap or sensitive, staying <= 95 MB: k/v projections, first and last layer
    "scale-search, emb/head + k/v + layers 0,29 int8": (dict(method="scale-search", **E8, overrides=KV8), False),
    "gptq, emb/head + k/v + layers 0,29 int8": (dict(method="gptq", **E8, overrides=KV8), False),
    "gptq (32768 calib tokens), emb/head + k/v + layers 0,29 int8": (
        dict(method="gptq", calibration_tokens=32768, **E8, overrides=KV8), False),
}

# Peers measured on the same text (issue 13): name -> (ppl, MB)
PEERS = {
    "llama.cpp Q4_0": (10.96, 92), "llama.cpp Q4_1": (8.22, 98), "ORT GenAI int4": (12.18, 86),
    "optimum-executorch 8da4w": (15.8, 105),
}


def tokens_of_constitution(n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from edgellm.assets import fetch

    path = fetch("smollm2-135m-instruct.gguf")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok(fetch("us-constitution.txt").read_text(), add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    model.reset_cache()
    T = tokens.numel()
    return model(tokens[None], torch.arange(T))[0, :-1].float()


def scores(logp: torch.Tensor, tokens: torch.Tensor, ref_logp: torch.Tensor | None):
    """perplexity, mean KL(ref || this) per token, top-1 agreement with ref."""
    nll = -logp.gather(1, tokens[1:, None]).mean()
    if ref_logp is None:
        return math.exp(nll.item()), 0.0, 1.0
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(1).mean()
    top1 = (ref_logp.argmax(1) == logp.argmax(1)).float().mean()
    return math.exp(nll.item()), kl.item(), top1.item()


def plot(rows, path: Path, tokens: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        mb = r["bytes"] / 1e6
        if r["method"] == "fp32":
            ax.axhline(r["ppl"], color="gray", ls=":", lw=1)
            ax.annotate(f"unquantized {r['ppl']:.2f} ({mb:.0f} MB)", (80, r["ppl"]), fontsize=7, color="gray")
            continue
        if mb > 300:
            continue
        ax.scatter(mb, r["ppl"], color="tab:blue", s=18)
        ax.annotate(r["method"], (mb, r["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for name, (ppl, mb) in PEERS.items():
        ax.scatter(mb, ppl, color="tab:red", marker="x", s=30)
        ax.annotate(name, (mb, ppl), fontsize=7, color="tab:red", xytext=(3, -8), textcoords="offset points")
    ax.axvline(95, color="k", ls="--", lw=0.8)
    ax.axhline(9.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("model MB (codes + scales + float tensors)")
    ax.set_ylabel(f"perplexity, US constitution, {tokens - 1} tokens scored")
    ax.set_title("SmolLM2-135M shared quantization vs peers (weights: Q4_1 GGUF dequantized)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variants", default=None, help="indices into VARIANTS (comma-separated) or names "
                    "(';'-separated); default all")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--png", default=None, help="plot perplexity against MB (with the peers) to this file")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from-json", nargs="+", default=None, help="only re-render the table (and --json, --png) "
                    "from earlier runs' JSON files (rows merged in order; fp32 first)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows, seen = [], set()
        for f in args.from_json:
            for r in json.loads(Path(f).read_text())["results"]:
                if r["method"] not in seen:
                    seen.add(r["method"])
                    rows.append(r)
        rows.sort(key=lambda r: r["method"] != "fp32")
        report(rows, args.tokens, 32, args.json, args.png)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = resolve_model(recipe="smollm2-135m", max_seq_len=max(args.tokens, 16))
    tokens = tokens_of_constitution(args.tokens)
    base_cfg = loaded.recipe.quantization
    shapes = loaded.weights.shapes  # names and shapes without reading a tensor
    fp32_bytes = sum(math.prod(s) * 4 for s in shapes.values())
    names = list(VARIANTS)
    if args.variants is None:
        chosen = list(names)
    elif all(v.strip().isdigit() for v in args.variants.split(",")):
        chosen = [names[int(v)] for v in args.variants.split(",")]
    else:
        chosen = [v.strip() for v in args.variants.split(";")]
    if "fp32" not in chosen:
        chosen.insert(0, "fp32")
    chosen.sort(key=lambda n: n != "fp32")
    calib = None
    rows, ref_logp, cache = [], None, {}
    for name in chosen:
        overrides, dyn = VARIANTS[name]
        model = loaded.decoder()
        qtime, nbytes, sha, summ = 0.0, fp32_bytes, None, {}
        if overrides is not None:
            cfg = dataclasses.replace(base_cfg, **overrides)
            key = repr(sorted(overrides.items()))
            if key not in cache:
                if cfg.method == "gptq" and calib is None:
                    from edgellm.calibration import calibration_tokens, check_disjoint, calibration_text

                    check_disjoint(calibration_text(), Path(_eval_path()).read_text())
                    calib = calibration_tokens(loaded.tokenizer().encode, 1 << 16)  # cut per configuration
                t = time.time()
                q = quantize(loaded.weights, cfg, tied=loaded.config.tie_embeddings, model_config=loaded.config,
                             calibration=None if calib is None else calib[:cfg.calibration_tokens])
                cache[key] = (q, time.time() - t)
            q, qtime = cache[key]
            summ = q.summary()
            quantized = set(q.weights)
            nbytes = summ["bytes"] + sum(math.prod(shape) * 4 for k, shape in shapes.items() if k not in quantized)
            sha = summ["sha256"][:12]
            apply_reference(model, q, activations=dyn)
        t = time.time()
        logp = torch.log_softmax(logits_of(model, tokens), dim=-1)
        ftime = time.time() - t
        ppl, kl, top1 = scores(logp, tokens, ref_logp)
        if name == "fp32":
            ref_logp = logp
        del model
        rows.append({"method": name, "ppl": ppl, "kl": kl, "top1": top1, "bytes": nbytes,
                     "quantize_s": round(qtime, 2), "forward_s": round(ftime, 2), "sha256": sha,
                     "config": {k: summ.get(k) for k in ("method", "linears", "embedding", "head", "symmetric",
                                                          "calibration")} if summ else None})
        if args.json:  # partial results survive an interrupted run
            Path(args.json).write_text(json.dumps({"results": rows}, indent=2))
        print(f"  {name}: ppl {ppl:.3f} kl {kl:.4f} top1 {top1:.3f} {nbytes / 1e6:.1f} MB "
              f"(quantize {qtime:.1f}s, forward {ftime:.1f}s)", file=sys.stderr, flush=True)

    report(rows, tokens.numel(), base_cfg.group_size, args.json, args.png)


def report(rows, n_tokens, group_size, json_path=None, png_path=None):
    """Print the table; write the JSON and PNG."""
    fp32_ppl = rows[0]["ppl"]
    print(f"\nSmolLM2-135M (weights: Q4_1 GGUF dequantized), US constitution, {n_tokens} tokens "
          f"({n_tokens - 1} scored), group {group_size}")
    print(f"| {'configuration':<47} | {'ppl':>7} | {'x fp32':>6} | {'mean KL':>7} | {'top-1':>6} | {'MB':>6} | {'quant s':>7} |")
    print(f"|{'-' * 49}|{'-' * 9}|{'-' * 8}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['method']:<47} | {r['ppl']:7.3f} | {r['ppl'] / fp32_ppl:6.3f} | {r['kl']:7.4f} | "
              f"{r['top1']:6.3f} | {r['bytes'] / 1e6:6.1f} | {r['quantize_s']:7.1f} |")
    out = {"tokens": n_tokens, "group_size": group_size, "results": rows,
           "peers": {k: {"ppl": p, "MB": mb} for k, (p, mb) in PEERS.items()},
           "note": "SmolLM2 weights are a Q4_1 GGUF dequantized (flatters Q4_1-like formats)"}
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    if png_path:
        plot(rows, Path(png_path), n_tokens)


def _eval_path():
    from edgellm.assets import fetch

    return fetch("us-constitution.txt")


if __name__ == "__main__":
    main()
