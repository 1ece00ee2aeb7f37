"""The seed models at full size, through every target, on this machine.

For each recipe: a full-size HF folder with seeded random bf16 weights (``export.make_checkpoint``,
written once under the cache directory), then for each target a ``python -m export`` child
process (wall time, peak RSS, the per-stage figures from its manifest, artifact bytes and bytes
per parameter) and, for .pte and .onnx, one child per thread count that loads the artifact and
decodes (load time, runtime peak RSS, decode tok/s) beside the bandwidth bound: artifact bytes
read once per token at the machine's read bandwidth, measured in the same run. With several
``--kv-dtypes`` each runnable target is exported and run once per KV cache dtype (the dtype is
baked into the graph), so the runtime RSS of each cache precision stands next to its cache bytes.
``--parity STEPS`` checks each runnable artifact against the eager int4 reference it came from
(``python -m runtime parity``; at 7B a streamed reference), with its wall time and peak RSS.

    python bench/scale.py [--recipes xgen-7b-8k-base ...] [--targets executorch onnx coreml]
                          [--max-seq-len 2048] [--kv-dtypes fp32 int8] [--n-layers N]
                          [--threads 1 2] [--prompt-tokens 16] [--cache out/scale]
                          [--json FILE] [--markdown FILE] [--keep] [--skip-memory-check]
                          [--parity STEPS]

Checkpoints and artifacts are deleted after each recipe unless ``--keep`` (a 13B folder is 26 GB).
Random weights decode at the speed of real ones (the work per token does not depend on values).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgellm.artifact import dir_size  # noqa: E402
from edgellm.recipes import load_recipe  # noqa: E402
from runtime.bench import read_bandwidth_gbs, run_measured  # noqa: E402

RECIPES = ("xgen-7b-8k-base", "xgen-7b-8k-inst", "xverse-7b", "xverse-13b-256k", "xgen-mobile-4b")
TARGETS = ("executorch", "onnx", "coreml")
RUNNABLE = ("executorch", "onnx")  # Core ML cannot execute on Linux
DECODE = 32

# Child: load an artifact at a thread count and decode; imports are timed apart from the load.
RUN_CHILD = """
import json, sys, time
import runtime
from runtime.bench import measure
t = time.time()
b = runtime.load(sys.argv[1], threads=int(sys.argv[2]))
load_s = time.time() - t
r = measure(b, int(sys.argv[3]), int(sys.argv[4]), runs=int(sys.argv[5]), warmup=0)
print("RESULT " + json.dumps({"load_s": round(load_s, 2), **r.to_dict()}))
"""


def model_type(recipe: str) -> str:
    return "xverse" if recipe.startswith("xverse") else "llama"


def checkpoint(recipe: str, cache: Path, log, n_layers: int | None = None) -> tuple[Path, float]:
    """The recipe's full-width HF folder (all layers, or the first ``n_layers``; written unless
    present) and the seconds writing took."""
    ck = cache / "checkpoints" / (recipe + (f"-{n_layers}l" if n_layers else ""))
    if ck.exists():
        return ck, 0.0
    depth = ["--n-layers", str(n_layers)] if n_layers else []
    p, wall, peak = run_measured(["-m", "export.make_checkpoint", recipe, str(ck), "--model-type", model_type(recipe),
                                  *depth])
    if p.returncode:
        raise RuntimeError(f"make_checkpoint {recipe} failed:\n{p.stderr[-2000:]}")
    log(f"{recipe}: checkpoint written in {wall:.0f}s (peak RSS {peak / 1024:.1f} GiB)")
    return ck, wall


def export(recipe: str, target: str, ck: Path, out: Path, max_seq_len: int, kv_dtype: str | None = None,
           n_layers: int | None = None, skip_memory_check: bool = False) -> dict:
    extra = (["--kv-dtype", kv_dtype] if kv_dtype else []) + (["--n-layers", str(n_layers)] if n_layers else []) \
        + (["--skip-memory-check"] if skip_memory_check else [])
    p, wall, peak = run_measured(["-m", "export", "--target", target, "--recipe", recipe, "--checkpoint", str(ck),
                                  "--max-seq-len", str(max_seq_len), "--out", str(out), *extra])
    row = {"export_s": round(wall, 1), "export_peak_rss_gib": round(peak / 1024, 2), "rc": p.returncode}
    if p.returncode:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    art = next(d for d in out.iterdir() if d.is_dir() and f"-{target}-" in d.name and not d.name.startswith("."))
    manifest = json.loads((art / "manifest.json").read_text())
    size = dir_size(art) - sum(f.stat().st_size for f in art.glob("tokenizer*"))
    params = _params(recipe, n_layers)
    row.update(artifact=str(art), artifact_gb=round(size / 1e9, 3), bytes_per_parameter=round(size / params, 3),
               kv_dtype=manifest["kv_cache"]["dtype"], kv_cache_mb=round(manifest["kv_cache"]["bytes"] / 1e6, 1),
               stages={k: {"s": v["seconds"], "peak_gib": round(v["peak_rss_mb"] / 1024, 2)}
                       for k, v in manifest["export"]["stages"].items()})
    return row


def _params(recipe: str, n_layers: int | None = None) -> int:
    cfg = load_recipe(recipe).model_config()
    return (replace(cfg, n_layers=n_layers) if n_layers else cfg).num_parameters()


def run(artifact: str, threads: int, runs: int, prompt: int) -> dict:
    p, _, peak = run_measured(["-c", RUN_CHILD, artifact, str(threads), str(prompt), str(DECODE), str(runs)])
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(line[len("RESULT "):])
    return {"load_s": r["load_s"], "decode_tok_s": round(r["decode_tok_s"], 2), "runtime_peak_rss_gib": round(peak / 1024, 2)}


def parity(artifact: str, steps: int) -> dict:
    """``python -m runtime parity`` of one artifact against the eager int4 reference it came from
    (at 7B a streamed one: each weight dequantized as it is read), in its own process: the
    agreement figures, its wall time and peak RSS."""
    out = Path(artifact).parent / f".parity-{Path(artifact).name}.json"
    p, wall, peak = run_measured(["-m", "runtime", "parity", artifact, "--steps", str(steps), "--no-text",
                                  "--jobs", "1", "--json", str(out)])
    if not out.exists():
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    row = json.loads(out.read_text())["rows"][0]
    out.unlink()
    return {"passed": p.returncode == 0, "steps": row["steps"], "top1": round(row["top1"], 3),
            "mean_kl": row["mean_kl"], "max_rel": round(row["max_rel"], 4), "floor_top1": row.get("floor_top1"),
            "floor_kl": row.get("floor_kl"), "seconds": round(wall, 1), "peak_rss_gib": round(peak / 1024, 2)}


def markdown(report: dict) -> str:
    bw = report["bandwidth_gbs"]
    head = ["recipe", "target", "params B", "KV cache", "export s", "export peak GiB", "artifact GB", "B/param"]
    for t in report["threads"]:
        head += [f"load s ({t}t)", f"run RSS GiB ({t}t)", f"decode {t}t", f"bound {t}t", f"% bound {t}t"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        kv = f"{r['kv_dtype']} {r['kv_cache_mb']} MB" if "kv_dtype" in r else r.get("kv_asked", "")
        cells = [r["recipe"], r["target"], f"{r['params'] / 1e9:.2f}", kv, str(r.get("export_s", "")),
                 str(r.get("export_peak_rss_gib", "")), str(r.get("artifact_gb", r.get("error", ""))),
                 str(r.get("bytes_per_parameter", ""))]
        for t in report["threads"]:
            m = r.get("runtime", {}).get(str(t), {})
            bound = bw[str(t)] * 1e9 / (r["artifact_gb"] * 1e9) if "decode_tok_s" in m else None
            cells += [str(m.get("load_s", "")), str(m.get("runtime_peak_rss_gib", "")), str(m.get("decode_tok_s", m.get("error", ""))),
                      f"{bound:.1f}" if bound else "", f"{100 * m['decode_tok_s'] / bound:.0f} %" if bound else ""]
        lines.append("| " + " | ".join(cells) + " |")
    checked = [r for r in report["rows"] if "parity" in r]
    if checked:
        lines += ["", "| recipe | target | parity | top-1 (floor) | mean KL (floor) | max rel | s | peak RSS GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in checked:
            q = r["parity"]
            lines.append(f"| {r['recipe']} | {r['target']} | " + (
                f"{'passed' if q['passed'] else 'FAILED'} | {q['top1']:.1%} ({q['floor_top1']:.1%}) | "
                f"{q['mean_kl']:.2e} ({q['floor_kl']:.2e}) | {q['max_rel']} | {q['seconds']} | {q['peak_rss_gib']} |"
                if "error" not in q else f"{q['error']} | | | | | |"))
    lines.append("")
    lines.append(f"KV cache capacity {report['max_seq_len']} slots; runs decode {DECODE} tokens after a "
                 f"{report.get('prompt_tokens', 16)}-token prompt"
                 + (f"; first {report['n_layers']} layers of each model" if report.get("n_layers") else ""))
    lines.append("read bandwidth: " + ", ".join(f"{v:.1f} GB/s at {k} thread(s)" for k, v in bw.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache capacity of every export")
    p.add_argument("--kv-dtypes", nargs="+", choices=("fp32", "fp16", "int8"),
                   help="export and run each runnable target once per KV cache dtype (default: the recipe's)")
    p.add_argument("--n-layers", type=int, help="full width, first N layers (a quicker look; default all)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16,
                   help=f"prompt before the {DECODE} decoded tokens; the cache pages a run touches are what "
                        "its RSS counts, so a prompt near --max-seq-len shows a full cache's cost")
    p.add_argument("--cache", type=Path, default=ROOT / "out" / "scale")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    p.add_argument("--parity", type=int, metavar="STEPS", default=0,
                   help="also run python -m runtime parity on each .pte/.onnx (STEPS greedy steps a prompt)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="export even where the up-front estimate exceeds the available memory (to measure the real peak)")
    args = p.parse_args(argv)
    for r in args.recipes:
        load_recipe(r)  # unknown names fail before any work

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.prompt_tokens + DECODE > args.max_seq_len:
        p.error(f"--prompt-tokens {args.prompt_tokens} + {DECODE} decoded exceed --max-seq-len {args.max_seq_len}")
    report = {"max_seq_len": args.max_seq_len, "threads": args.threads, "n_layers": args.n_layers,
              "prompt_tokens": args.prompt_tokens, "rows": [],
              "bandwidth_gbs": {str(t): round(read_bandwidth_gbs(t), 2) for t in args.threads}}
    log(f"read bandwidth {report['bandwidth_gbs']} GB/s")
    json_path = args.json or args.cache / "scale.json"
    md_path = args.markdown or args.cache / "scale.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for recipe in args.recipes:
        ck, _ = checkpoint(recipe, args.cache, log, args.n_layers)
        jobs = [(t, kv) for t in args.targets for kv in (args.kv_dtypes if args.kv_dtypes and t in RUNNABLE
                                                          else [None])]
        for target, kv in jobs:
            out = args.cache / "artifacts" / recipe / (kv or "recipe-kv")
            row = {"recipe": recipe, "target": target, "params": _params(recipe, args.n_layers), "kv_asked": kv or "",
                   **export(recipe, target, ck, out, args.max_seq_len, kv, args.n_layers, args.skip_memory_check)}
            log(f"{recipe} -> {target}{f' (kv {kv})' if kv else ''}: {row.get('export_s')}s, "
                f"peak {row.get('export_peak_rss_gib')} GiB, {row.get('artifact_gb', row.get('error'))} GB")
            if target in RUNNABLE and "artifact" in row:
                row["runtime"] = {}
                for t in args.threads:
                    row["runtime"][str(t)] = run(row["artifact"], t, args.runs, args.prompt_tokens)
                    log(f"  {t} thread(s): {row['runtime'][str(t)]}")
                if args.parity:
                    row["parity"] = parity(row["artifact"], args.parity)
                    log(f"  parity: {row['parity']}")
            report["rows"].append(row)
            json_path.write_text(json.dumps(report, indent=2))
            md_path.write_text(markdown(report) + "\n")
            if not args.keep and "artifact" in row:
                shutil.rmtree(row["artifact"], ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ck, ignore_errors=True)
    print(markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
