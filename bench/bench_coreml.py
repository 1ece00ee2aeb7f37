"""Core ML lowering cost and the MIL interpreter's speed: a table and a JSON file.

Measures, for a recipe (default SmolLM2, int4): the wall time and peak RSS of
``python -m export --target coreml`` in a child process (getrusage of the child: load +
shared quantization + Core ML lowering; the lowering's own time is read from its progress
line), the package size, and the interpreter's prefill / decode tokens per second on the
exported artifact (on macOS also Core ML's own).

    python -m bench.bench_coreml [--recipe smollm2-135m] [--quant int4] [--max-seq-len 2048]
                                 [--prompt 64] [--decode 16] [--out out/bench] [--json FILE]
"""

from __future__ import annotations

from edgellm.artifact import dir_size

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path




def convert(recipe: str, quant: str, max_seq_len: int | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "export", "--target", "coreml", "--recipe", recipe, "--quant", quant,
           "--out", str(out)] + (["--max-seq-len", str(max_seq_len)] if max_seq_len else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), COLUMNS="200")
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t
    if proc.returncode:
        raise SystemExit(f"export failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    text = proc.stdout + proc.stderr
    lower = re.search(r"coreml: wrote .*? in ([\d.]+)s", text, re.S)
    dirs = sorted(out.glob(f"{recipe}-coreml-{quant if quant != 'none' else 'fp32'}*"))
    art = dirs[-1]
    pkg = art / "model.mlpackage"
    return {"export_wall_s": round(wall, 1), "coreml_lowering_s": float(lower.group(1)) if lower else None,
            "peak_rss_mb": round(peak_kb / 1024, 1), "package_mb": round(dir_size(pkg) / 1e6, 2),
            "artifact_mb": round(dir_size(art) / 1e6, 2), "artifact": str(art)}


def speed(artifact: str, engine: str, prompt: int, decode: int) -> dict:
    import numpy as np

    from runtime import load

    t = time.time()
    b = load(artifact, engine=engine)
    load_s = time.time() - t
    ids = np.random.default_rng(0).integers(0, b.vocab_size, prompt).tolist()
    t = time.time()
    logits = b.prefill(ids)
    pre = time.time() - t
    t = time.time()
    for _ in range(decode):
        logits = b.decode(int(np.argmax(logits)))
    dec = time.time() - t
    return {"engine": engine, "load_s": round(load_s, 1), "prompt_tokens": prompt, "decode_tokens": decode,
            "prefill_tok_s": round(prompt / pre, 2), "decode_tok_s": round(decode / dec, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="smollm2-135m")
    p.add_argument("--quant", default="int4", choices=["int4", "none"])
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--out", default="out/bench")
    p.add_argument("--artifact", help="skip the export and time this artifact")
    p.add_argument("--json", help="write the results here (default OUT/bench_coreml.json)")
    args = p.parse_args(argv)
    out = Path(args.out)
    res = {"recipe": args.recipe, "quant": args.quant, "platform": sys.platform}
    if args.artifact:
        res["artifact"] = args.artifact
    else:
        res.update(convert(args.recipe, args.quant, args.max_seq_len, out))
    res["runs"] = [speed(res["artifact"], "interpreter", args.prompt, args.decode)]
    if sys.platform == "darwin":
        res["runs"].append(speed(res["artifact"], "coreml", args.prompt, args.decode))
    rows = [(k, res[k]) for k in ("export_wall_s", "coreml_lowering_s", "peak_rss_mb", "package_mb", "artifact_mb")
            if k in res]
    print(f"Core ML bench: {args.recipe} {args.quant} ({res['artifact']})")
    for k, v in rows:
        print(f"  {k:20} {v}")
    print(f"  {'engine':12} {'load s':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in res["runs"]:
        print(f"  {r['engine']:12} {r['load_s']:>8} {r['prefill_tok_s']:>14} {r['decode_tok_s']:>13}"
              f"   ({r['prompt_tokens']} + {r['decode_tokens']} tokens)")
    path = Path(args.json) if args.json else out / "bench_coreml.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"  json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
