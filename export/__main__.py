"""``python -m export --target {TARGET,...,all}``: one load, one quantization, N targets.

With no recipe or checkpoint it exports the embedded default (SmolLM2-135M-Instruct).
``all`` exports to the recipe's targets (every registered target if it names none).
"""

from __future__ import annotations

from edgellm.artifact import dir_size

import argparse
import sys

import edgellm  # noqa: F401  (environment defaults before torch loads)
from edgellm.errors import EdgeLLMError
from export import targets as target_registry
from export.pipeline import run_export




def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--target", required=True, choices=[*target_registry.names(), "all"])
    p.add_argument("--recipe", help="recipe name (see recipes/) or path to a recipe YAML")
    p.add_argument("--checkpoint", help="HF folder (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("--quant", choices=["int4", "none"], help="default: the recipe's quantization")
    p.add_argument("--max-seq-len", type=int, help="KV cache capacity (default: the recipe's)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/<recipe>-<target>-<quant>/")
    p.add_argument("--flavour", help="target flavour: executorch portable|fast (default portable), "
                                     "onnx fast|portable (default fast), coreml fp16")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (recipes without a checkpoint)")
    p.add_argument("--n-layers", type=int, help="truncate the depth (dry runs of big recipes)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="export even if the estimated peak memory exceeds what this machine has available")
    args = p.parse_args(argv)

    import time

    from rich.console import Console
    from rich.table import Table

    console = Console()
    t0 = time.time()
    try:
        with console.status("exporting") as status:
            def progress(msg: str):
                console.log(msg)
                status.update(msg)

            results = run_export(args.target, recipe=args.recipe, checkpoint=args.checkpoint, quant=args.quant,
                                 max_seq_len=args.max_seq_len, out=args.out, flavour=args.flavour,
                                 seed=args.seed, n_layers=args.n_layers, progress=progress,
                                 memory_check=not args.skip_memory_check)
    except (EdgeLLMError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = Table(title=f"exported in {time.time() - t0:.1f}s")
    for col in ("target", "artifact", "size MB"):
        table.add_column(col)
    for target, path in results.items():
        table.add_row(target, str(path), f"{dir_size(path) / 1e6:.1f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
