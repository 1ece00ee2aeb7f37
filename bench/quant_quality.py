"""Perplexity of SmolLM2-135M fp32 vs int4 quantization variants (edgellm.quantization).

Text: first N tokens (default 2048) of the US constitution, one window, N-1 scored; tokens from
the SmolLM2 GGUF tokenizer via transformers. Each variant is the eager decoder with its weights
replaced by the int4 reference (``apply_reference``); ``+8da`` adds int8 per-token dynamic
activation fake-quant (what the ExecuTorch 8da4w artifact computes).

    .venv/bin/python bench/quant_quality.py [--tokens 2048] [--variants a,b,...] [--json out.json]
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

# name -> (QuantConfig overrides or None for fp32, dynamic activations)
VARIANTS = {
    "fp32": (None, False),
    "rtn-sym": (dict(symmetric=True, scale_search=False), False),
    "search-sym": (dict(symmetric=True, scale_search=True), False),
    "search-sym+8da": (dict(symmetric=True, scale_search=True), True),
    "rtn-asym": (dict(symmetric=False, scale_search=False), False),
    "search-asym": (dict(symmetric=False, scale_search=True), False),
    "float-emb/head": (dict(symmetric=True, scale_search=True, embedding="float"), False),
}


def tokens_of_constitution(n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from edgellm.assets import fetch

    path = fetch("smollm2-135m-instruct.gguf")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok(fetch("us-constitution.txt").read_text(), add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor) -> float:
    model.reset_cache()
    T = tokens.numel()
    logits = model(tokens[None], torch.arange(T))[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:])
    return math.exp(nll.item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    loaded = resolve_model(recipe="smollm2-135m", max_seq_len=max(args.tokens, 16))
    tokens = tokens_of_constitution(args.tokens)
    base_cfg = loaded.recipe.quantization
    shapes = loaded.weights.shapes  # names and shapes without reading a tensor
    fp32_bytes = sum(math.prod(s) * 4 for s in shapes.values())
    rows, fp32_ppl, cache = [], None, {}
    for name in args.variants.split(","):
        overrides, dyn = VARIANTS[name]
        model = loaded.decoder()
        qtime, nbytes, sha = 0.0, fp32_bytes, None
        if overrides is not None:
            cfg = dataclasses.replace(base_cfg, **overrides)
            key = tuple(sorted(overrides.items()))
            if key not in cache:
                t = time.time()
                cache[key] = (quantize(loaded.weights, cfg, tied=loaded.config.tie_embeddings), time.time() - t)
            q, qtime = cache[key]
            s = q.summary()
            quantized = {n for n in q.weights}
            nbytes = s["bytes"] + sum(math.prod(shape) * 4 for k, shape in shapes.items() if k not in quantized)
            sha = s["sha256"][:12]
            apply_reference(model, q, activations=dyn)
        t = time.time()
        ppl = perplexity(model, tokens)
        ftime = time.time() - t
        if name == "fp32":
            fp32_ppl = ppl
        rows.append({"method": name, "ppl": ppl, "ratio": ppl / fp32_ppl if fp32_ppl else None,
                     "bytes": nbytes, "quantize_s": round(qtime, 2), "forward_s": round(ftime, 2), "sha256": sha})
        print(f"  {name}: ppl {ppl:.3f} (quantize {qtime:.1f}s, forward {ftime:.1f}s)", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M, US constitution, {tokens.numel()} tokens ({tokens.numel() - 1} scored), "
          f"group {base_cfg.group_size}")
    print(f"| {'method':<26} | {'ppl':>7} | {'x fp32':>6} | {'bytes':>11} | {'quant s':>7} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 8}|{'-' * 13}|{'-' * 9}|")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        print(f"| {r['method']:<26} | {r['ppl']:7.3f} | {ratio:>6} | {r['bytes']:>11,} | {r['quantize_s']:7.1f} |")
    out = {"tokens": tokens.numel(), "group_size": base_cfg.group_size, "results": rows}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
