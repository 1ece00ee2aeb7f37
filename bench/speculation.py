"""Prompt-lookup speculation on input-grounded tasks: tok/s with and without, per artifact.

Three task kinds whose answers reuse their prompt: copying a paragraph, repeating it with its
sentences numbered, and editing a code snippet (a rename). Per artifact and task: plain greedy
decode tok/s, speculative decode tok/s for each K, the ratio, the acceptance rate, and whether
the tokens are identical (they must be). Rounds rotate the artifacts' order; medians. The
machine's read bandwidth is measured in the same run. Paragraphs come from the packaged US
constitution; SmolLM2's weights are a Q4_1 GGUF dequantized.

    .venv/bin/python bench/speculation.py ARTIFACT... [--k 4 8] [--tokens 128] [--rounds 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: E402
from edgellm.assets import fetch  # noqa: E402
from runtime.bench import read_bandwidth_gbs  # noqa: E402
from runtime.generate import SamplingConfig, generate  # noqa: E402

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''


def tasks() -> dict[str, str]:
    text = fetch("us-constitution.txt").read_text()
    para = " ".join(text[3000:3600].split())
    return {
        "copy": f"Copy this text word for word:\n\n{para}",
        "number sentences": f"Repeat the following text with every sentence numbered:\n\n{para}",
        "code edit": f"Rename the variable `item` to `product` in this code and show the whole code:\n\n{CODE}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    backends = [runtime.load(a, threads=args.threads) for a in args.artifacts]
    cfg = SamplingConfig(max_new_tokens=args.tokens)
    runs: dict[tuple, list] = {}
    for b in backends:  # untimed: first-call allocations and kernel selection
        generate(b, "Hello", SamplingConfig(max_new_tokens=8), chat=True, speculate=max(args.k))
    for r in range(args.rounds):
        order = backends[r % len(backends):] + backends[:r % len(backends)]
        for b in order:
            for task, prompt in tasks().items():
                plain = generate(b, prompt, cfg, chat=True)
                runs.setdefault((b.name, task, 0), []).append((plain.decode_tok_s, plain.tokens, None))
                for k in args.k:
                    s = generate(b, prompt, cfg, chat=True, speculate=k)
                    runs.setdefault((b.name, task, k), []).append(
                        (s.decode_tok_s, s.tokens, s.speculation["acceptance_rate"], s.tokens == plain.tokens))
    bandwidth = read_bandwidth_gbs(args.threads)
    rows = []
    print(f"read bandwidth {bandwidth:.1f} GB/s at {args.threads} thread(s); {args.tokens} greedy tokens, "
          f"{args.rounds} rounds, medians (min-max)")
    print("| artifact | task | K | decode tok/s | vs plain | acceptance | tokens identical |")
    print("|---|---|---|---|---|---|---|")
    for (name, task, k), got in runs.items():
        tps = [g[0] for g in got]
        base = statistics.median(x[0] for x in runs[(name, task, 0)])
        med = statistics.median(tps)
        row = {"artifact": name, "task": task, "k": k, "decode_tok_s": med, "min": min(tps), "max": max(tps),
               "ratio": med / base, "generated": len(got[0][1])}
        if k:
            row["acceptance_rate"] = statistics.median(g[2] for g in got if g[2] == g[2]) if any(
                g[2] == g[2] for g in got) else None
            row["identical"] = all(g[3] for g in got)
        rows.append(row)
        acc = f"{row['acceptance_rate']:.0%}" if k and row["acceptance_rate"] is not None else "-"
        same = ("yes" if row["identical"] else "NO") if k else "-"
        print(f"| {name} | {task} | {k or 'off'} | {med:.1f} ({min(tps):.1f}-{max(tps):.1f}) | "
              f"{row['ratio']:.2f}x | {acc} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bandwidth, "threads": args.threads,
                                               "tokens": args.tokens, "rounds": args.rounds, "rows": rows}, indent=2))
    return 0 if all(r.get("identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
