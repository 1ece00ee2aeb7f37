"""Our artifacts and the peers, side by side in one interleaved run.

Systems (``--systems``, default all):
  * ours: ``edgellm-pte-fast``, ``edgellm-pte-portable``, ``edgellm-onnx`` -- exported by
    ``python -m export`` (or given with ``--artifact``), timed by ``python -m runtime bench``;
  * ``llama.cpp``: built from the ``llama-cpp-python`` sdist's bundled sources (cmake + ninja),
    the recipe's GGUF re-quantized to Q4_0 by its ``llama-quantize``, timed by ``llama-bench``
    (its own random prompt; decode with the prompt's length already in the cache);
  * ``ort-genai``: onnxruntime-genai's builder (int4, accuracy_level 4) on an HF folder of the
    same weights, in its own virtualenv, timed by the loop ours use (``bench/bench_onnx.py``);
  * ``export_llama``: ExecuTorch's own LLM export (8da4w, 4-bit embedding, custom SDPA and KV
    ops) of the same weights, timed like ours on the raw program (``bench/bench_executorch.py``).
  * references (``bench.reference_loops``, on our own files): ``ref-runner-pte-portable`` /
    ``ref-runner-pte-fast`` (ExecuTorch's C++ ``TextLLMRunner`` on the ``.pte``) and
    ``ref-ort-loop-onnx`` (a minimal IOBinding ONNX Runtime loop on the ``.onnx``): the report
    gives ours / reference per round, i.e. what ``python -m runtime bench`` adds (issue 16: <= 5 %).
Peers are built once under ``--cache`` (default ``$EDGELLM_HOME/peers``); one that cannot be
built here is reported with the reason, never estimated. Each round measures the machine's read
bandwidth, then every system at every thread count in a fresh process, in an order rotated per
round. The report: medians with min-max, ratios to the best peer, the share of the bandwidth
bound (model bytes / read bandwidth); JSON, a markdown table and a PNG bar chart in ``--out``.
SmolLM2's weights are a Q4_1 GGUF dequantized (which flatters llama.cpp's Q4 formats in quality,
not in speed).

    python -m bench.compare [--recipe smollm2-135m] [--systems ...] [--threads 1 2] [--rounds 6]
                            [--prompt 64] [--decode 128] [--max-seq-len 512] [--out out/compare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
OURS = {"edgellm-pte-fast": ("executorch", "fast"), "edgellm-pte-portable": ("executorch", "portable"),
        "edgellm-onnx": ("onnx", None)}
PEERS = ("llama.cpp", "ort-genai", "export_llama")
# reference loop -> (bench.reference_loops loop, the system of ours whose artifact it runs)
REFERENCES = {"ref-runner-pte-portable": ("runner", "edgellm-pte-portable"),
              "ref-runner-pte-fast": ("runner", "edgellm-pte-fast"),
              "ref-ort-loop-onnx": ("ort-loop", "edgellm-onnx")}
MODEL_SUFFIXES = (".pte", ".onnx", ".data", ".gguf")


class NotBuilt(RuntimeError):
    """A peer that cannot be built here; the message says why."""


@dataclass
class System:
    name: str
    kind: str  # "ours", "peer" or "reference" (a minimal loop on one of ours' files)
    artifact: Path | None = None
    model_bytes: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)
    points: dict = field(default_factory=dict)  # threads -> list of {"prefill_tok_s", "decode_tok_s"}


def model_bytes(path: Path) -> int:
    """What a decode step reads: the model files (not tokenizers or configs)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.name.endswith(MODEL_SUFFIXES)]
    return sum(p.stat().st_size for p in files)


def _run(cmd: list, log: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log``; a failure raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **kw.pop("env", {})}
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:3]))} failed ({p.returncode}): "
                           + " | ".join(tail))
    return p


# ---- preparing each system ----

def prepare_ours(name: str, a, out: Path, log: Path) -> System:
    target, flavour = OURS[name]
    given = next((Path(p) for p in a.artifact if _artifact_kind(Path(p)) == (target, flavour)), None)
    if given is None:
        from edgellm.artifact import artifact_name

        art = out / "ours" / artifact_name(a.recipe_name, target, f"int4-{flavour}" if flavour else "int4")
        if not (art / "manifest.json").exists():
            _run([sys.executable, "-m", "export", "--target", target, "--recipe", a.recipe, "--quant", "int4",
                  "--max-seq-len", a.max_seq_len, "--out", out / "ours", *(["--flavour", flavour] if flavour else [])],
                 log, cwd=ROOT)
        given = next(p for p in (out / "ours").iterdir() if _artifact_kind(p) == (target, flavour))
    return System(name, "ours", given, model_bytes(given))


def _artifact_kind(path: Path) -> tuple[str, str | None] | None:
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    target = m.get("target")
    flavour = m.get(target, {}).get("flavour") if target == "executorch" else None
    return target, flavour


def _gguf_of(loaded) -> Path:
    origin = Path(str(loaded.origin))
    if origin.suffix != ".gguf":
        raise NotBuilt(f"the recipe's weights are not a GGUF ({origin.name}); llama.cpp needs one")
    return origin


def prepare_llama_cpp(loaded, cache: Path, out: Path, log: Path) -> System:
    gguf = _gguf_of(loaded)
    build = cache / "llama.cpp" / "build"
    bench, quantize = build / "bin" / "llama-bench", build / "bin" / "llama-quantize"
    if not (bench.exists() and quantize.exists()):
        sdist_dir = cache / "llama.cpp" / "sdist"
        sdist_dir.mkdir(parents=True, exist_ok=True)
        if not list(sdist_dir.glob("*.tar.gz")):
            print(f"  llama.cpp: downloading the {LLAMA_CPP_SDIST} sdist (its bundled llama.cpp sources)", flush=True)
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_SDIST,
                  "-d", sdist_dir], log)
        src = cache / "llama.cpp" / "src"
        if not src.exists():
            with tarfile.open(next(sdist_dir.glob("*.tar.gz"))) as t:
                t.extractall(cache / "llama.cpp" / "extract", filter="data")
            next((cache / "llama.cpp" / "extract").glob("*/vendor/llama.cpp")).rename(src)
        print("  llama.cpp: building llama-bench and llama-quantize (cmake, a few minutes)", flush=True)
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", src, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
              "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], log)
        _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", "llama-bench", "llama-quantize"], log)
    q4_0 = out / "peers" / f"{gguf.stem}.Q4_0.gguf"
    if not q4_0.exists():
        q4_0.parent.mkdir(parents=True, exist_ok=True)
        _run([quantize, "--allow-requantize", gguf, q4_0, "Q4_0", "2"], log)
    return System("llama.cpp", "peer", q4_0, model_bytes(q4_0), extra={"bench": str(bench), "format": "Q4_0"})


def prepare_ort_genai(a, cache: Path, out: Path, log: Path) -> System:
    from bench import bench_onnx

    from edgellm.cli import Terminal

    py = bench_onnx.genai_python(cache / "ort-genai-venv")
    with Terminal(quiet=True, log=out / "ort-genai-build.log"):  # torch/torchao/transformers noise
        hf = bench_onnx.write_hf_folder(a.recipe, a.max_seq_len, out / "peers" / f"{a.recipe_name}-hf")
        built = bench_onnx.build_peer(py, hf, out / "peers" / f"{a.recipe_name}-genai-int4-cpu")
    art = Path(built["artifact"])
    return System("ort-genai", "peer", art, model_bytes(art), extra={"python": str(py)})


def prepare_export_llama(loaded, a, out: Path, log: Path) -> System:
    from bench import bench_executorch

    if loaded.config.rope.type != "default":
        raise NotBuilt(f"RoPE {loaded.config.rope.type} is not mapped to export_llama's params here")
    peer = out / "peers" / "export_llama"
    pte = peer / "peer.pte"
    if not pte.exists():
        ck, params = bench_executorch.write_meta_checkpoint(loaded, peer)
        args = bench_executorch.peer_export_args(ck, params, peer, a.max_seq_len, loaded.recipe.bos_id
                                                 if loaded.recipe.bos_id is not None else -1, list(loaded.recipe.eos_ids))
        _run([sys.executable, *args], log, cwd=peer)
        if not pte.exists():
            raise NotBuilt(f"export_llama wrote no {pte.name} (see {log})")
    return System("export_llama", "peer", pte, model_bytes(pte))


# ---- one measurement: a fresh process per system and thread count ----

def measure(s: System, threads: int, a, out: Path, log: Path) -> dict:
    if s.kind == "reference":
        p = _run([sys.executable, "-m", "bench.reference_loops", s.extra["loop"], s.artifact, "--threads", threads,
                  "--prompt", a.prompt, "--decode", a.decode, "--runs", 1], log, cwd=ROOT)
        r = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    elif s.kind == "ours":
        res = out / "point.json"
        _run([sys.executable, "-m", "runtime", "bench", s.artifact, "--threads", threads, "--runs", 1,
              "--prompt-tokens", a.prompt, "--decode-tokens", a.decode, "--json", res], log, cwd=ROOT)
        r = json.loads(res.read_text())[0]
    elif s.name == "llama.cpp":
        p = _run([s.extra["bench"], "-m", s.artifact, "-p", a.prompt, "-n", a.decode, "-d", f"0,{a.prompt}",
                  "-t", threads, "-r", 1, "-o", "json"], log)
        tests = json.loads(p.stdout)
        pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"] and not t.get("n_depth"))
        tg = next(t for t in tests if t["n_gen"] and t.get("n_depth") == a.prompt)
        r = {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"]}
    elif s.name == "ort-genai":
        from bench import bench_onnx

        r = bench_onnx.measure_peer(Path(s.extra["python"]), str(s.artifact), threads, a.max_seq_len, 1,
                                    a.prompt, a.decode)
    else:  # export_llama's .pte: the raw program, prompt ids from the file ours read
        p = _run([sys.executable, ROOT / "bench" / "bench_executorch.py", "_run", s.artifact, 1, a.vocab, "start",
                  out / "prompt.json", threads, 1, a.decode], log, cwd=ROOT)
        line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
        r = json.loads(line[7:])[str(threads)]
    return {"prefill_tok_s": float(r["prefill_tok_s"]), "decode_tok_s": float(r["decode_tok_s"])}


# ---- report ----

def summarize(systems: list[System], bandwidth: dict, threads: list[int]) -> dict:
    """Medians, min-max, ratios to the best peer and the share of the bandwidth bound."""
    rows = []
    for s in systems:
        row = {"system": s.name, "kind": s.kind, "artifact": str(s.artifact) if s.artifact else None,
               "model_mb": round(s.model_bytes / 1e6, 1), "error": s.error, **s.extra}
        for t in threads:
            pts = s.points.get(t, [])
            for key in ("decode_tok_s", "prefill_tok_s"):
                vals = [p[key] for p in pts]
                row[f"{key}_{t}t"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                      "n": len(vals)} if vals else None
            bw = statistics.median(bandwidth[t]) if bandwidth.get(t) else None
            if bw and s.model_bytes and row[f"decode_tok_s_{t}t"]:
                bound = bw * 1e9 / s.model_bytes
                row[f"bound_{t}t"] = round(bound, 1)
                row[f"of_bound_{t}t"] = round(row[f"decode_tok_s_{t}t"]["median"] / bound, 3)
        rows.append(row)
    for t in threads:
        for key in ("decode_tok_s", "prefill_tok_s"):
            peers = [r[f"{key}_{t}t"]["median"] for r in rows if r["kind"] == "peer" and r[f"{key}_{t}t"]]
            best = max(peers) if peers else None
            for r in rows:
                r[f"{key}_{t}t_vs_best_peer"] = (round(r[f"{key}_{t}t"]["median"] / best, 3)
                                                 if best and r[f"{key}_{t}t"] else None)
    by_name = {s.name: s for s in systems}
    for r in rows:  # ours / reference on the same file, per round (the rounds interleave them)
        if r["kind"] != "reference":
            continue
        ours = by_name.get(REFERENCES[r["system"]][1])
        ref = by_name[r["system"]]
        r["ours"] = ours.name if ours else None
        for t in threads:
            for key in ("decode_tok_s", "prefill_tok_s"):
                pairs = list(zip(ours.points.get(t, []), ref.points.get(t, []))) if ours else []
                ratios = [o[key] / f[key] for o, f in pairs if f[key]]
                r[f"ours_over_reference_{key}_{t}t"] = round(statistics.median(ratios), 3) if ratios else None
    return {"rows": rows, "bandwidth_gbs": {str(t): bandwidth.get(t, []) for t in threads}}


def markdown(report: dict, threads: list[int]) -> str:
    def cell(v):
        return "-" if not v else f"{v['median']:.1f} ({v['min']:.0f}-{v['max']:.0f})"

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    head = ["system", "MB"]
    for t in threads:
        head += [f"decode {t}t", "x best peer", "of bound", f"prefill {t}t", "x best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"| {r['system']} | - | not built: {r['error']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["system"], f"{r['model_mb']:.1f}"]
        for t in threads:
            of = r.get(f"of_bound_{t}t")
            cells += [cell(r[f"decode_tok_s_{t}t"]), ratio(r[f"decode_tok_s_{t}t_vs_best_peer"]),
                      "-" if of is None else f"{of:.0%}", cell(r[f"prefill_tok_s_{t}t"]),
                      ratio(r[f"prefill_tok_s_{t}t_vs_best_peer"])]
        lines.append("| " + " | ".join(cells) + " |")
    for r in report["rows"]:
        if r["kind"] == "reference" and not r["error"]:
            lines.append("")
            lines.append(f"{r['ours']} / {r['system']} (same file; median of per-round ratios): " + ", ".join(
                f"decode {t}t {_x(r.get(f'ours_over_reference_decode_tok_s_{t}t'))}, "
                f"prefill {t}t {_x(r.get(f'ours_over_reference_prefill_tok_s_{t}t'))}" for t in threads))
    bw = ", ".join(f"{t}t {statistics.median(v):.1f} GB/s" for t, v in report["bandwidth_gbs"].items() if v)
    lines.append("")
    lines.append(f"Medians (min-max) of {report['rounds']} interleaved rounds; prompt {report['prompt']} tokens, "
                 f"decode {report['decode']}; read bandwidth {bw}; bound = bandwidth / model bytes.")
    return "\n".join(lines)


def _x(v) -> str:
    return "-" if v is None else f"{v:.3f}x"


def plot(report: dict, threads: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["error"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) * len(threads)), 4))
    width = 0.8 / max(1, len(threads))
    for i, t in enumerate(threads):
        med = [r[f"decode_tok_s_{t}t"]["median"] if r[f"decode_tok_s_{t}t"] else 0 for r in rows]
        lo = [m - r[f"decode_tok_s_{t}t"]["min"] if r[f"decode_tok_s_{t}t"] else 0 for m, r in zip(med, rows)]
        hi = [r[f"decode_tok_s_{t}t"]["max"] - m if r[f"decode_tok_s_{t}t"] else 0 for m, r in zip(med, rows)]
        ax.bar([x + i * width for x in range(len(rows))], med, width, yerr=[lo, hi], capsize=3, label=f"{t} thread(s)")
    ax.set_xticks([x + width * (len(threads) - 1) / 2 for x in range(len(rows))], [r["system"] for r in rows],
                  rotation=20, ha="right")
    ax.set_ylabel("decode tok/s (median, min-max)")
    ax.set_title(f"{report['recipe']}: decode {report['decode']} tokens after a {report['prompt']}-token prompt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--systems", nargs="+", default=[*OURS, *PEERS, *REFERENCES], choices=[*OURS, *PEERS, *REFERENCES])
    ap.add_argument("--artifact", nargs="*", default=[], help="existing artifacts of ours to time instead of exporting")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--cache", type=Path, help="where peers are built (default $EDGELLM_HOME/peers)")
    ap.add_argument("--out", type=Path, default=Path("out/compare"))
    a = ap.parse_args(argv)
    from edgellm import checks

    checks.integer(a.rounds, "--rounds", 1, 100)
    checks.integer(a.prompt, "--prompt", 1)
    checks.integer(a.decode, "--decode", 1)
    if a.prompt + a.decode >= a.max_seq_len:
        raise SystemExit(f"error: --prompt {a.prompt} + --decode {a.decode} do not fit a {a.max_seq_len}-slot cache; "
                         "raise --max-seq-len")
    from edgellm.assets import home
    from edgellm.model import resolve_model
    from runtime.bench import bench_prompt, read_bandwidth_gbs

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = (a.cache or home() / "peers").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    log = out / "compare.log"
    log.write_text("")
    loaded = resolve_model(recipe=a.recipe, max_seq_len=a.max_seq_len)
    a.recipe_name, a.vocab = loaded.recipe.name, loaded.config.vocab_size
    (out / "prompt.json").write_text(json.dumps(bench_prompt(a.prompt, a.vocab)))  # the ids every loop of ours reads
    systems = []
    for name in a.systems:
        print(f"preparing {name}", flush=True)
        t = time.time()
        try:
            if name in OURS:
                s = prepare_ours(name, a, out, log)
            elif name in REFERENCES:
                loop, of = REFERENCES[name]
                base = next((x for x in systems if x.name == of), None)
                if base is None:  # its artifact without timing ours
                    base = prepare_ours(of, a, out, log)
                if base.error:
                    raise NotBuilt(f"{of} was not built: {base.error}")
                s = System(name, "reference", base.artifact, base.model_bytes, extra={"loop": loop})
            elif name == "llama.cpp":
                s = prepare_llama_cpp(loaded, cache, out, log)
            elif name == "ort-genai":
                s = prepare_ort_genai(a, cache, out, log)
            else:
                s = prepare_export_llama(loaded, a, out, log)
        except (NotBuilt, RuntimeError, SystemExit, OSError, StopIteration) as e:
            s = System(name, "ours" if name in OURS else "reference" if name in REFERENCES else "peer",
                       error=str(e) or type(e).__name__)
            print(f"  {name}: not built: {s.error}", flush=True)
        else:
            print(f"  {name}: {s.artifact} ({s.model_bytes / 1e6:.1f} MB of model, {time.time() - t:.0f} s)", flush=True)
        systems.append(s)
    bandwidth: dict[int, list[float]] = {t: [] for t in a.threads}
    ready = [s for s in systems if not s.error]
    for r in range(a.rounds):
        for t in a.threads:
            bandwidth[t].append(read_bandwidth_gbs(t))
        order = ready[r % len(ready):] + ready[:r % len(ready)] if ready else []
        for s in order:
            for t in a.threads:
                try:
                    s.points.setdefault(t, []).append(measure(s, t, a, out, log))
                except (RuntimeError, StopIteration, KeyError, ValueError) as e:
                    s.extra.setdefault("measure_errors", []).append(f"{t}t: {e}")
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{s.name} {s.points[a.threads[0]][-1]['decode_tok_s']:.1f}" for s in ready if s.points.get(a.threads[0])),
            flush=True)
    report = {"recipe": a.recipe, "prompt": a.prompt, "decode": a.decode, "rounds": a.rounds,
              "max_seq_len": a.max_seq_len, "threads": a.threads, **summarize(systems, bandwidth, a.threads)}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    md = markdown(report, a.threads)
    (out / "compare.md").write_text(md + "\n")
    plot(report, a.threads, out / "compare.png")
    print(md)
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
