"""``python -m export --target {executorch,onnx,coreml,all}``: one load, one quantization, N targets.

With no recipe or checkpoint it exports the embedded default (SmolLM2-135M-Instruct).
A target that is not built in this version is reported as unavailable with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    from export.pipeline import TARGET_MODULES

    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--target", required=True, choices=[*TARGET_MODULES, "all"])
    p.add_argument("--recipe", help="recipe name (see recipes/) or path to a recipe YAML")
    p.add_argument("--checkpoint", help="HF folder (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("--quant", choices=["int4", "none"], help="default: the recipe's quantization")
    p.add_argument("--max-seq-len", type=int, help="KV cache capacity (default: the recipe's)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/<recipe>-<target>-<quant>/")
    p.add_argument("--flavour", dest="variant", help="target flavour: executorch portable|fast (default portable), onnx fast|portable (default fast)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (recipes without a checkpoint)")
    p.add_argument("--n-layers", type=int, help="truncate the depth (dry runs of big recipes)")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from export.pipeline import TargetUnavailable, available_targets, run_export, target_module
    from export.recipes import RecipeError

    console = Console()
    if args.target == "all":
        targets = available_targets()
        missing = [t for t in TARGET_MODULES if t not in targets]
        for t in missing:
            console.print(f"[yellow]target {t} is unavailable in this edgellm version; skipped[/yellow]")
        if not targets:
            console.print("[red]no target is available[/red]")
            return 2
    else:
        try:
            target_module(args.target)
        except TargetUnavailable as e:
            console.print(f"[red]{e}[/red] (available: {', '.join(available_targets()) or 'none'})")
            return 2
        targets = [args.target]

    t0 = time.time()
    try:
        with console.status("exporting") as status:
            def progress(msg: str):
                console.log(msg)
                status.update(msg)

            results = run_export(targets, recipe=args.recipe, checkpoint=args.checkpoint, quant=args.quant,
                                 max_seq_len=args.max_seq_len, out=args.out, variant=args.variant,
                                 seed=args.seed, n_layers=args.n_layers, progress=progress)
    except (RecipeError, ValueError, FileNotFoundError, TargetUnavailable) as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    table = Table(title=f"exported in {time.time() - t0:.1f}s")
    for col in ("target", "artifact", "size MB"):
        table.add_column(col)
    for target, path in results.items():
        table.add_row(target, str(path), f"{_dir_size(path) / 1e6:.1f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
