"""``python -m export --target {TARGET,...,all}``: one load, one quantization, N targets.

With no recipe or checkpoint it exports the embedded default (SmolLM2-135M-Instruct).
``all`` exports to the recipe's targets (every registered target if it names none). Every
option is checked before any heavy import or work (``export.pipeline.check_request``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edgellm  # noqa: F401  (environment defaults before torch loads)
from edgellm import cli
from export import targets as target_registry


def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m export", description=__doc__,
                   epilog="exit codes: 0 ok, 1 bad input, 2 usage, 3 I/O, 4 internal error, 130 interrupted")
    p.add_argument("--target", required=True, choices=[*target_registry.names(), "all"])
    p.add_argument("--recipe", help="recipe name (see recipes/) or path to a recipe YAML")
    p.add_argument("--checkpoint", help="HF folder (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("--quant", choices=["int4", "none"], help="default: the recipe's quantization")
    p.add_argument("--max-seq-len", type=int, help="KV cache capacity (default: the recipe's)")
    p.add_argument("--kv-dtype", choices=["fp32", "fp16", "int8"],
                   help="KV cache precision (default: the recipe's kv_cache.dtype, else fp32); int8 = per token and head")
    p.add_argument("--kv-window", type=int, help="sliding-window cache of this many slots (positions grow without "
                                                 "bound; every target and flavour)")
    p.add_argument("--kv-sinks", type=int, help="first positions a windowed cache keeps (e.g. the system prompt)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/<recipe>-<target>-<quant>/")
    p.add_argument("--flavour", help="target flavour: executorch portable|fast (default portable), "
                                     "onnx fast|portable (default fast), coreml fp16")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (recipes without a checkpoint)")
    p.add_argument("--n-layers", type=int, help="truncate the depth (dry runs of big recipes)")
    p.add_argument("--jobs", type=int, help="targets lowered at once, each in its own process (default: one per "
                                            "idle core, as many as memory allows; 1 = one after the other)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="export even if the estimated peak memory exceeds what this machine has available")
    cli.add_common_flags(p)
    return p


def export_command(args: argparse.Namespace, term: cli.Terminal) -> int:
    import time

    from rich.table import Table

    from edgellm.artifact import dir_size
    from export.pipeline import run_export

    console = term.console()
    t0 = time.time()
    with term.activity(console) as progress:
        results = run_export(args.target, recipe=args.recipe, checkpoint=args.checkpoint, quant=args.quant,
                             max_seq_len=args.max_seq_len, out=args.out, flavour=args.flavour,
                             seed=args.seed, n_layers=args.n_layers, progress=progress,
                             memory_check=not args.skip_memory_check, jobs=args.jobs,
                             kv_cache={"dtype": args.kv_dtype, "window": args.kv_window, "sinks": args.kv_sinks})
    table = Table(title=f"exported in {time.time() - t0:.1f}s")
    for col in ("target", "artifact", "size MB"):
        table.add_column(col)
    for target, path in results.items():
        table.add_row(target, str(path), f"{dir_size(path) / 1e6:.1f}")
    console.print(table)
    if term.log is not None:
        term.keep_log_at = Path(args.out) / "export.log"
        console.print(f"library output: {term.keep_log_at}")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return cli.run(lambda term: export_command(args, term), prog="python -m export", debug=args.debug,
                   verbose=args.verbose, capture=argv is None)


if __name__ == "__main__":
    sys.exit(main())
