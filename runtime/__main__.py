"""``python -m runtime {generate,parity,bench,tokenize,inspect,assets}``.

SPEC is an artifact directory or ``eager:RECIPE_OR_CHECKPOINT[:int4]``. Every option is checked
before the backends (torch, XNNPACK, ONNX Runtime) load; errors are one line with the exit codes
of ``edgellm.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys

import edgellm  # noqa: F401  (environment defaults before torch, XNNPACK or ORT load)
from edgellm import checks, cli
from edgellm.errors import EdgeLLMError

TERM: cli.Terminal  # the user's streams for this command (set by main)


def _console():
    return TERM.console()


def _is_eager(spec: str) -> bool:
    return spec == "eager" or spec.startswith("eager:")


def check_spec(spec: str) -> str:
    """A SPEC that can be loaded: an artifact folder with a manifest, or an eager spec (its recipe
    or checkpoint is checked when it loads). Cheap: nothing heavy is imported."""
    if _is_eager(spec):
        return spec
    from edgellm.artifact import read_manifest

    read_manifest(spec, verify=False)
    return spec


def _backend(spec: str, args):
    import runtime

    opts = {}
    if vars(args).get("threads") is not None:
        opts["threads"] = args.threads
    if vars(args).get("max_seq_len") is not None:
        opts["max_seq_len"] = args.max_seq_len
    return runtime.load(spec, **opts)


def check_args(args) -> None:
    """The checks every command shares (ranges, paths); each command adds its own."""
    specs = [args.spec] if vars(args).get("spec") else list(vars(args).get("specs") or [])
    if args.cmd != "tokenize":  # tokenize also takes recipes, checkpoints and .gguf files
        for s in specs + ([args.reference] if vars(args).get("reference") else []):
            check_spec(s)
    if vars(args).get("threads") is not None:
        checks.threads(args.threads)
    for n in vars(args).get("threads_list") or []:
        checks.threads(n)
    if vars(args).get("max_seq_len") is not None:
        if not all(_is_eager(s) for s in specs):
            raise EdgeLLMError("--max-seq-len only applies to eager specs: an artifact's cache capacity is fixed "
                               "at export (re-export with python -m export --max-seq-len N)")
        checks.integer(args.max_seq_len, "--max-seq-len", 2)
    for flag in ("json", "plot"):
        if vars(args).get(flag):
            checks.output_file(vars(args)[flag], f"--{flag}")


def cmd_generate(args) -> int:
    from runtime.generate import SamplingConfig, generate

    checks.text(args.prompt, "--prompt", fix="give the text to continue")
    checks.integer(args.speculate, "--speculate", 0, 64, fix="0 turns speculation off")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    backend = _backend(args.spec, args)
    out = TERM.out
    # A chat shows the answer on its own line after the user's message; a plain prompt is continued.
    before, between = ("user: ", "\nassistant: ") if args.chat else ("", "")
    stream = None if args.no_stream else (lambda s: (out.write(s), out.flush()))
    if stream:
        out.write(before + args.prompt + between)
        out.flush()
    res = generate(backend, args.prompt, cfg, on_text=stream, chat=args.chat, speculate=args.speculate)
    if stream:
        out.write("\n")
    else:
        print(before + args.prompt + between + res.text, file=out)
    print(f"[{backend.name}] prompt {len(res.prompt_ids)} tok at {res.prefill_tok_s:.1f} tok/s, "
          f"generated {len(res.tokens)} tok at {res.decode_tok_s:.1f} tok/s, stopped: {res.stopped}"
          + _speculation_note(res.speculation), file=TERM.err)
    return 0


def _speculation_note(spec: dict | None) -> str:
    if not spec:
        return ""
    rate = f"{spec['acceptance_rate']:.0%}" if spec["drafted"] else "n/a"
    return (f", speculation: {spec['accepted']}/{spec['drafted']} drafts accepted ({rate}) "
            f"in {spec['forwards']} verification forwards")


def cmd_parity(args) -> int:
    checks.integer(args.steps, "--steps", 1, fix="the number of greedy steps compared after each prompt")
    checks.integer(args.text_tokens, "--text-tokens", 2, fix="perplexity needs at least 2 tokens")
    if args.jobs is not None:
        checks.integer(args.jobs, "--jobs", 1, 64, fix="artifacts compared at once, each in its own process")
    if args.text:
        checks.input_file(args.text, "--text")
    if args.text and args.no_text:
        raise EdgeLLMError("--text and --no-text contradict each other; give one")
    if not args.reference and all(_is_eager(s) for s in args.specs):
        raise EdgeLLMError("every candidate is eager: give --reference SPEC to compare them with")
    if args.accuracy_level is not None:
        from runtime.backend import spec_class

        checks.integer(args.accuracy_level, "--accuracy-level", 0, 4,
                       fix="ONNX MatMulNBits: 0 exact dequantization, 4 int8 activations")
        if not any("accuracy_level" in spec_class(s).accepts for s in args.specs):
            raise EdgeLLMError("--accuracy-level applies to .onnx artifacts and none is given; drop it")
    from edgellm.artifact import read_manifest
    from edgellm.assets import fetch
    from runtime.parity import merge_reports, problems
    from runtime.parity.session import compare_all

    console = _console()
    manifests = {s: read_manifest(s) for s in args.specs if not _is_eager(s)}
    text = None
    if not args.no_text:
        if args.text:
            try:
                text = open(args.text, encoding="utf-8").read()
            except UnicodeDecodeError:
                raise EdgeLLMError(f"--text {args.text} is not UTF-8 text") from None
            if not text.strip():
                raise EdgeLLMError(f"--text {args.text} is empty; give a text to score perplexity on")
        else:
            text = fetch("us-constitution.txt").read_text()
    # Each int4 artifact is compared with the eager model carrying the same quantization AND the
    # same int8 activation arithmetic its runtime applies (weight-only when it applies none).
    with TERM.activity(console) as progress:
        reports = compare_all(list(args.specs), args.reference, jobs=args.jobs, threads=args.threads,
                              steps=args.steps, text=text, text_tokens=args.text_tokens,
                              accuracy_level=args.accuracy_level, progress=progress)
    report = merge_reports(reports, order=list(args.specs))
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
    checks.integer(args.prompt_tokens, "--prompt-tokens", 1)
    checks.integer(args.decode_tokens, "--decode-tokens", 1)
    checks.integer(args.runs, "--runs", 1, 100)
    checks.integer(args.speculate, "--speculate", 0, 64, fix="0 turns speculation off")
    import runtime
    from runtime.backend import spec_class
    from runtime.bench import bench_prompt, measure, table
    from runtime.generate import measure_generation

    console = _console()
    results = []
    with_threads = "threads" in spec_class(args.spec).accepts
    for threads in (args.threads_list if with_threads else [None]):
        backend = runtime.load(args.spec, threads=threads)
        label = f"{threads}t" if threads else "threads n/a"
        with console.status(f"bench {args.spec} ({label})"):
            name = f"{backend.name} ({label})"
            if args.speculate:
                r = measure_generation(backend, bench_prompt(args.prompt_tokens, backend.vocab_size),
                                       args.decode_tokens, args.runs, args.speculate, name=name)
            else:
                r = measure(backend, args.prompt_tokens, args.decode_tokens, args.runs, name=name)
        results.append(r)
        del backend  # released before the next thread count resizes process-wide pools
    extra = ({"speculate": [f"k={r.speculate}" for r in results],
              "accepted": [f"{r.acceptance_rate:.0%}" if r.acceptance_rate == r.acceptance_rate else "n/a"
                           for r in results]} if args.speculate else None)
    console.print(table(results, f"bench {args.spec}", extra))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=2)
    return 0


def cmd_tokenize(args) -> int:
    from edgellm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.spec)
    pairs = tok.describe(args.text, allow_special=args.allow_special)
    print(" ".join(str(i) for i, _ in pairs), file=TERM.out)
    for i, piece in pairs:
        print(f"{i:>8}  {piece}", file=TERM.out)
    print(f"{len(pairs)} tokens", file=TERM.err)
    return 0


def cmd_inspect(args) -> int:
    from runtime.inspect import inspect_artifact, render

    info = inspect_artifact(args.spec)
    print(json.dumps(info, indent=2, default=str) if args.json else render(info), file=TERM.out)
    return 0


def cmd_assets(args) -> int:
    from edgellm.assets import fetch_all

    say = (lambda m: print(m, file=TERM.err)) if args.verbose else (lambda m: None)
    for name, path in fetch_all(progress=say).items():
        print(f"{name}: {path}", file=TERM.out)
    return 0


def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m runtime", description=__doc__,
                   epilog="exit codes: 0 ok, 1 bad input, 2 usage, 3 I/O, 4 internal error, 130 interrupted")
    cli.add_common_flags(p)
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
    g.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding: draft up to K tokens a step from the context and "
                        "verify them in one forward (greedy output unchanged; 0 = off)")
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
    q.add_argument("--accuracy-level", type=int, metavar="N",
                   help="ONNX candidates' MatMulNBits compute mode: 0 = exact int4 dequantization and fp32 "
                        "activations, compared with the weight-only reference (default: the artifact's, 4)")
    q.add_argument("--jobs", type=int, help="artifacts compared at once, each group in its own process (default: "
                                            "one per core, as many as memory allows; 1 = in this process)")
    q.set_defaults(fn=cmd_parity)

    b = sub.add_parser("bench", help="prefill/decode speed")
    b.add_argument("spec")
    b.add_argument("--threads", dest="threads_list", type=int, nargs="+", default=[1, 2])
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="decode through prompt-lookup speculation with up to K drafts a step (effective tok/s)")
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

    for command in sub.choices.values():
        cli.add_common_flags(command, default=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def command(term: cli.Terminal) -> int:
        global TERM
        TERM = term
        check_args(args)
        return args.fn(args)

    return cli.run(command, prog=f"python -m runtime {args.cmd}", debug=args.debug, verbose=args.verbose,
                   capture=argv is None)


if __name__ == "__main__":
    sys.exit(main())
