"""``python -m runtime {generate,parity,bench,tokenize,inspect,assets}``.

SPEC is an artifact directory or ``eager:RECIPE_OR_CHECKPOINT[:int4]``.
"""

from __future__ import annotations

import argparse
import json
import sys

import runtime
from edgellm.artifact import read_manifest
from edgellm.assets import fetch, fetch_all
from runtime.backend import spec_class
from runtime.backends.eager import EagerBackend
from runtime.bench import measure, table
from runtime.generate import SamplingConfig, generate
from runtime.inspect import inspect_artifact, render
from runtime.parity import merge_reports, problems, run_parity


def _console():
    from rich.console import Console

    # Wide enough for the parity table when the output is a file or a CI log.
    return Console(stderr=False, width=None if sys.stdout.isatty() else 200)


def _backend(spec: str, args) -> "runtime.Backend":
    opts = {}
    if vars(args).get("threads"):
        opts["threads"] = args.threads
    if vars(args).get("max_seq_len") and spec.startswith("eager"):
        opts["max_seq_len"] = args.max_seq_len
    return runtime.load(spec, **opts)


def cmd_generate(args) -> int:
    backend = _backend(args.spec, args)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    stream = None if args.no_stream else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    res = generate(backend, args.prompt, cfg, on_text=stream, chat=args.chat)
    if stream:
        sys.stdout.write("\n")
    else:
        print(args.prompt + res.text)
    print(f"[{backend.name}] prompt {len(res.prompt_ids)} tok at {res.prefill_tok_s:.1f} tok/s, "
          f"generated {len(res.tokens)} tok at {res.decode_tok_s:.1f} tok/s, stopped: {res.stopped}",
          file=sys.stderr)
    return 0


def cmd_parity(args) -> int:

    console = _console()
    manifests = {s: read_manifest(s) for s in args.specs if not s.startswith("eager")}
    candidates = {}
    for s in args.specs:
        with console.status(f"loading {s}"):
            candidates[s] = _backend(s, args)
    if args.reference:
        def reference(_scheme):
            with console.status(f"loading reference {args.reference}"):
                return runtime.load(args.reference)
        groups = {None: candidates}
    elif manifests:
        # Each int4 artifact is compared with the eager model carrying the same quantization AND
        # the same int8 activation arithmetic its runtime applies (weight-only when it applies none).
        # One reference is alive at a time (each is an fp32 copy of the model); the checkpoint
        # and the quantization are read and computed once.
        first = next(iter(manifests.values()))
        groups = {}
        for s, be in candidates.items():
            groups.setdefault(be.capabilities.activation_scheme, {})[s] = be
        shared: dict = {}

        def reference(scheme):
            with console.status(f"rebuilding the eager reference ({scheme or 'no activation quantization'}) "
                                f"from the artifact manifest"):
                ref = EagerBackend.reference_for(first, activations=scheme or False, **shared)
                shared.update(loaded=ref.loaded, quantization=ref.quantization)
                return ref
    else:
        print("parity: give --reference SPEC when every candidate is eager", file=sys.stderr)
        return 2
    text = None
    if not args.no_text:
        if args.text:
            text = open(args.text).read()
        else:
            text = fetch("us-constitution.txt").read_text()
    reports = []
    for scheme, group in groups.items():
        ref = reference(scheme)
        reports.append(run_parity(group, ref, steps=args.steps, text=text, text_tokens=args.text_tokens,
                                  with_noise_floor=ref.capabilities.activation_scheme is not None,
                                  progress=lambda m: console.log(m)))
        del ref
    report = merge_reports(reports, order=list(candidates))
    console.print(report.table())
    if args.json:
        report.save_json(args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot)
        console.print(f"wrote {args.plot}")
    failed = []
    for row in report.rows:
        bad = problems(row, manifests.get(row.candidate))
        if bad:
            failed.append(f"{row.candidate}: " + "; ".join(bad))
    if failed:
        console.print("[red]PARITY FAILED[/red]\n" + "\n".join(failed))
        return 1
    console.print("[green]parity passed[/green] (bounds: top-1, mean KL, perplexity ratio vs the reference; "
                  "for int8-activation artifacts, top-1 and KL relative to the reference's noise floor)")
    return 0


def cmd_bench(args) -> int:
    console = _console()
    results = []
    with_threads = "threads" in spec_class(args.spec).accepts
    for threads in (args.threads_list if with_threads else [None]):
        backend = runtime.load(args.spec, threads=threads)
        label = f"{threads}t" if threads else "threads n/a"
        with console.status(f"bench {args.spec} ({label})"):
            r = measure(backend, args.prompt_tokens, args.decode_tokens, args.runs, name=f"{backend.name} ({label})")
        results.append(r)
        del backend  # released before the next thread count resizes process-wide pools
    console.print(table(results, f"bench {args.spec}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=2)
    return 0


def cmd_tokenize(args) -> int:
    tok = runtime.load_tokenizer(args.spec)
    pairs = tok.describe(args.text, allow_special=args.allow_special)
    print(" ".join(str(i) for i, _ in pairs))
    for i, piece in pairs:
        print(f"{i:>8}  {piece}")
    print(f"{len(pairs)} tokens", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    info = inspect_artifact(args.spec)
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def cmd_assets(args) -> int:
    for name, path in fetch_all(progress=lambda m: print(m, file=sys.stderr)).items():
        print(f"{name}: {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("spec")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--threads", type=int)
    g.add_argument("--max-seq-len", type=int, help="cache capacity for eager specs")
    g.add_argument("--no-stream", action="store_true")
    g.set_defaults(fn=cmd_generate)

    q = sub.add_parser("parity", help="compare backends with a reference (eager PyTorch by default)")
    q.add_argument("specs", nargs="+")
    q.add_argument("--reference", help="reference SPEC (default: the eager model the first artifact came from)")
    q.add_argument("--steps", type=int, default=32)
    q.add_argument("--text", help="text file for perplexity (default: the US constitution)")
    q.add_argument("--text-tokens", type=int, default=512)
    q.add_argument("--no-text", action="store_true", help="skip perplexity")
    q.add_argument("--json")
    q.add_argument("--plot")
    q.add_argument("--threads", type=int)
    q.set_defaults(fn=cmd_parity)

    b = sub.add_parser("bench", help="prefill/decode speed")
    b.add_argument("spec")
    b.add_argument("--threads", dest="threads_list", type=int, nargs="+", default=[1, 2])
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--json")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("tokenize", help="print token ids and pieces")
    t.add_argument("spec", help="recipe name, checkpoint folder, .gguf file or artifact directory")
    t.add_argument("text")
    t.add_argument("--allow-special", action="store_true")
    t.set_defaults(fn=cmd_tokenize)

    i = sub.add_parser("inspect", help="structural verification of an artifact")
    i.add_argument("spec")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    a = sub.add_parser("assets", help="fetch and verify the packaged assets")
    a.set_defaults(fn=cmd_assets)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
