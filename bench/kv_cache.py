"""What a KV cache option costs and saves on SmolLM2: perplexity, decode speed, cache bytes.

For each target (portable flavours: the ones carrying every cache option), capacity and cache
dtype, one SmolLM2 export (the one shared quantization, read back from the store): perplexity
over the capacity's worth of the US constitution, decode tok/s with the cache nearly full
(prompt = capacity - decode - 1 tokens, where the cache's size matters), and the manifest's
cache bytes. Then a sliding window (default 512 + 4 sinks) on each target, streaming a text of
4x the window: perplexity vs the eager model with a full cache of the text's length.

    python -m bench.kv_cache --out /tmp/kvbench [--targets executorch,onnx] [--slots 512,2048]
                             [--dtypes fp32,fp16,int8] [--flavour executorch=fast] [--json report.json]

SmolLM2's weights are a Q4_1 GGUF dequantized, which flatters Q4_1-like formats; the cache
options do not quantize weights, so their perplexity ratios are not affected by that.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgellm  # noqa: F401  (environment defaults before torch loads)

FLAVOURS = {"executorch": "portable", "onnx": "portable", "coreml": None}


def _long_text(tok, n: int) -> list[int]:
    from edgellm.assets import fetch

    ids = tok.encode("\n\n".join(fetch(a).read_text() for a in ("us-constitution.txt", "us-declaration.txt")))
    if len(ids) < n:
        raise SystemExit(f"the packaged texts hold {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def _decode_tok_s(backend, prompt: list[int], n: int) -> float:
    import numpy as np

    from runtime.bench import measure_calls

    res = measure_calls(lambda ids: int(np.argmax(backend.prefill(ids))), lambda t: int(np.argmax(backend.decode(t))),
                        prompt, n, runs=3, reset=backend.reset, name=backend.name)
    return res.decode_tok_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the artifacts")
    p.add_argument("--targets", default="executorch,onnx")
    p.add_argument("--slots", default="512,2048")
    p.add_argument("--dtypes", default="fp32,fp16,int8")
    p.add_argument("--window", type=int, default=512, help="sliding window streamed at the end (0: none)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flavour", action="append", default=[], metavar="TARGET=FLAVOUR",
                   help="another flavour than the portable one, e.g. executorch=fast")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    import runtime
    from edgellm.model import LoadedModel, resolve_model
    from export.pipeline import quantize_for, run_export
    from runtime.backends.eager import EagerBackend
    from runtime.parity.harness import perplexity

    out = Path(args.out)
    rows, quant = [], None
    targets = args.targets.split(",")
    flavours = {**FLAVOURS, **dict(f.split("=", 1) for f in args.flavour)}

    def export(target, slots, kv):
        nonlocal quant
        loaded = resolve_model(recipe="smollm2-135m", max_seq_len=None if kv.get("window") else slots, kv_cache=kv)
        quant = quant or quantize_for(loaded, "int4", progress=lambda s: None)
        t = time.time()
        art = run_export([target], loaded=loaded, quantization=quant, flavour=flavours[target], out=out,
                         progress=lambda s: None)[target]
        return loaded, art, time.time() - t

    for target in targets:
        for slots in map(int, args.slots.split(",")):
            for dtype in args.dtypes.split(","):
                loaded, art, secs = export(target, slots, {"dtype": dtype})
                backend = runtime.load(str(art), threads=args.threads)
                text = _long_text(loaded.tokenizer(), slots)
                prompt = text[: slots - args.decode_tokens - 1]
                man = json.loads((art / "manifest.json").read_text())
                scheme = backend.capabilities.activation_scheme
                ref = EagerBackend.reference_for(man, activations=scheme or False, loaded=loaded, quantization=quant)
                row = {"target": target, "flavour": flavours[target], "slots": slots, "dtype": dtype, "export_s": round(secs, 1),
                       "cache_bytes": man["kv_cache"]["bytes"], "ppl": round(perplexity(backend, text), 4),
                       # the eager model with the same cache and activation arithmetic: the cache's own
                       # effect, without the int8 activations' rounding cascades between implementations
                       "ppl_eager_same_arithmetic": round(perplexity(ref, text), 4),
                       "decode_tok_s": round(_decode_tok_s(backend, prompt, args.decode_tokens), 1)}
                if target == "onnx":  # exact weight-only arithmetic (MatMulNBits accuracy_level 0)
                    row["ppl_accuracy_level_0"] = round(perplexity(runtime.load(str(art), accuracy_level=0), text), 4)
                del ref
                rows.append(row)
                print(json.dumps(row), flush=True)
                del backend

    n = 4 * args.window
    for target in targets if args.window else []:
        loaded, art, secs = export(target, args.window, {"window": args.window, "sinks": args.sinks})
        text = _long_text(loaded.tokenizer(), n)
        windowed = perplexity(runtime.load(str(art), threads=args.threads), text)
        full_cfg = type(loaded.config)(**{**loaded.config.to_dict(), "max_seq_len": n, "kv_cache": {}})
        full = perplexity(EagerBackend.from_loaded(LoadedModel(loaded.recipe, full_cfg, loaded.weights), int4=True,
                                                   quantization=quant), text)
        row = {"target": target, "window": args.window, "sinks": args.sinks, "text_tokens": n,
               "ppl_windowed": round(windowed, 4), "ppl_full_cache_eager_int4": round(full, 4),
               "ratio": round(windowed / full, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
