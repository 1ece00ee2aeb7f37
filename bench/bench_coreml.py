"""Core ML lowering cost and the MIL interpreter's speed: a table and a JSON file.

Measures, for a recipe (default SmolLM2, int4): the wall time and peak RSS of
``python -m export --target coreml`` in a child process (``runtime.bench.run_measured``: load +
shared quantization + Core ML lowering; the lowering's own time is read from its progress
line), the package size, and the interpreter's prefill / decode tokens per second on the
exported artifact (on macOS also Core ML's own), timed by ``runtime.bench.measure``.

    python -m bench.bench_coreml [--recipe smollm2-135m] [--quant int4] [--max-seq-len 2048]
                                 [--prompt 64] [--decode 16] [--runs 1] [--warmup 0]
                                 [--out out/bench] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from edgellm.artifact import dir_size


def convert(recipe: str, quant: str, max_seq_len: int | None, out: Path) -> dict:
    from runtime.bench import run_measured

    args = ["-m", "export", "--target", "coreml", "--recipe", recipe, "--quant", quant,
            "--out", str(out)] + (["--max-seq-len", str(max_seq_len)] if max_seq_len else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), COLUMNS="200")
    proc, wall, peak = run_measured(args, env=env)
    if proc.returncode:
        raise SystemExit(f"export failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    lower = re.search(r"coreml: wrote .*? in ([\d.]+)s", text, re.S)
    dirs = sorted(out.glob(f"{recipe}-coreml-{quant if quant != 'none' else 'fp32'}*"))
    art = dirs[-1]
    pkg = art / "model.mlpackage"
    return {"export_wall_s": round(wall, 1), "coreml_lowering_s": float(lower.group(1)) if lower else None,
            "peak_rss_mb": round(peak, 1), "package_mb": round(dir_size(pkg) / 1e6, 2),
            "artifact_mb": round(dir_size(art) / 1e6, 2), "artifact": str(art)}


def speed(artifact: str, engine: str, prompt: int, decode: int, runs: int = 1, warmup: int = 0) -> dict:
    from runtime import load
    from runtime.bench import measure

    t = time.time()
    b = load(artifact, engine=engine)
    load_s = time.time() - t
    r = measure(b, prompt, decode, runs=runs, name=engine, warmup=warmup).to_dict()
    return {"engine": engine, "load_s": round(load_s, 1),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="smollm2-135m")
    p.add_argument("--quant", default="int4", choices=["int4", "none"])
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--runs", type=int, default=1, help="timed runs per engine (median)")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs before them (the interpreter is slow)")
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
    engines = ["interpreter"] + (["coreml"] if sys.platform == "darwin" else [])
    res["runs"] = [speed(res["artifact"], e, args.prompt, args.decode, args.runs, args.warmup) for e in engines]
    rows = [(k, res[k]) for k in ("export_wall_s", "coreml_lowering_s", "peak_rss_mb", "package_mb", "artifact_mb")
            if k in res]
    from rich.console import Console

    from runtime.bench import BenchResult, table

    print(f"Core ML bench: {args.recipe} {args.quant} ({res['artifact']})")
    for k, v in rows:
        print(f"  {k:20} {v}")
    runs = res["runs"]  # peak RSS: of this process so far (the export ran in a child)
    Console(width=200).print(table([BenchResult.from_dict(r) for r in runs],
                                   f"{runs[0]['prompt_tokens']} + {runs[0]['decode_tokens']} tokens",
                                   extra={"load s": [r["load_s"] for r in runs]}))
    path = Path(args.json) if args.json else out / "bench_coreml.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"  json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
