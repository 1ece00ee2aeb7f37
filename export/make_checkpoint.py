"""``python -m export.make_checkpoint RECIPE DIR``: a full-size HF checkpoint folder with seeded
random weights, written tensor by tensor, so tests and benches take exactly the path of a user
who downloaded the published model (config.json in its own format, sharded safetensors + index,
tokenizer files).

Weights are ``edgellm.weights.random_tensor`` cast to the stored dtype (bf16 by default, as the
seed models publish them), so a checkpoint made here holds the same numbers as the recipe's own
random dry run. At most one shard is in memory at a time; the folder is assembled under a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edgellm import checks, cli
from edgellm.errors import EdgeLLMError

DTYPES = ("bf16", "fp16", "fp32")
STAND_IN_TOKENIZER = {"source": "gguf", "asset": "smollm2-135m-instruct.gguf"}


def _tokenizer(rec, cfg, progress):
    """The recipe's tokenizer, or (a recipe whose tokenizer only comes with its checkpoint) a
    stand-in: SmolLM2's byte-level BPE, which fits any embedding of 49152 rows or more."""
    from edgellm.tokenizer import tokenizer_from_source

    src = dict(rec.tokenizer)
    if src["source"] == "hf" and not src.get("path"):
        progress(f"{rec.name}: its tokenizer ships only with the published checkpoint; writing SmolLM2's "
                 f"tokenizer as a stand-in")
        src = STAND_IN_TOKENIZER
    tok = tokenizer_from_source(src)
    if rec.bos_id is not None:
        tok.bos_id = rec.bos_id
    if rec.eos_ids:
        tok.eos_ids = list(rec.eos_ids)
    tok.check_vocab(cfg.vocab_size)
    return tok


def write_checkpoint(recipe: str, out: str | Path, *, seed: int = 0, n_layers: int | None = None,
                     max_seq_len: int | None = None, dtype: str = "bf16", model_type: str = "llama",
                     shard_bytes: int = 2 << 30, progress=print) -> Path:
    import torch

    from edgellm import architectures
    from edgellm.recipes import load_recipe
    from edgellm.weights import decoder_shapes

    if dtype not in DTYPES:
        raise EdgeLLMError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checks.number(shard_bytes, "--shard-gb", 1 << 20, fix="shards of at least 1 MiB")
    seed = checks.integer(seed, "--seed", 0, 2**32 - 1)
    rec = load_recipe(recipe)
    if n_layers is not None:
        checks.integer(n_layers, "--n-layers", 1)  # random weights exist at any depth (the config caps it)
    if max_seq_len is not None:
        checks.integer(max_seq_len, "--max-seq-len", 2)
    cfg = rec.model_config(max_seq_len, **({"n_layers": n_layers} if n_layers else {}))
    arch = architectures.for_model_type(model_type)
    out = Path(out)
    if out.exists():
        raise EdgeLLMError(f"{out} exists; remove it or choose another folder")
    checks.output_dir(out.parent, "the checkpoint's folder", need_bytes=cfg.num_parameters() * {
        "bf16": 2, "fp16": 2, "fp32": 4}[dtype] + (64 << 20))
    shapes = decoder_shapes(cfg)
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    size = torch.tensor([], dtype=torch_dtype).element_size()
    shards, current, used = [], [], 0
    for name, shape in shapes.items():
        n = size * int(torch.Size(shape).numel())
        if current and used + n > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    shards.append(current)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.torch import save_file

        from edgellm.tokenizer import runner_json
        from edgellm.tokenizer.builders import build_from_hf_json
        from edgellm.weights import random_tensor

        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {arch.hf_checkpoint_name(n): random_tensor(n, shapes[n], seed, torch_dtype) for n in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: file for k in tensors})
            del tensors
            progress(f"{file}: {len(names)} tensors")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = arch.hf_config(cfg, model_type)
        hf["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        hf.update(bos_token_id=rec.bos_id, eos_token_id=rec.eos_ids[0] if len(rec.eos_ids) == 1 else rec.eos_ids)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tok = _tokenizer(rec, cfg, progress)
        tok.save(tmp)
        try:  # tokenizer.json (HF format), where the ranks are expressible as merges and read back
            runner_json.write(tok, tmp)
            build_from_hf_json(tmp / "tokenizer.json")
        except ValueError as e:  # XGen's published tokenizer is tiktoken code, not a tokenizer.json either
            (tmp / "tokenizer.json").unlink(missing_ok=True)
            progress(f"no tokenizer.json ({e}); the tiktoken files carry the tokenizer")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {out}: {len(shapes)} tensors, {total / 1e9:.2f} GB ({dtype}) in {len(shards)} shard(s)")
    return out


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m export.make_checkpoint", description=__doc__)
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--max-seq-len", type=int, help="max_position_embeddings in config.json (default: the recipe's cache)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--model-type", choices=["llama", "mistral", "xverse"], default="llama",
                   help="config.json format (XVERSE's checkpoints are model_type xverse)")
    p.add_argument("--shard-gb", type=float, default=2.0)
    cli.add_common_flags(p)
    args = p.parse_args(argv)

    def command(term: cli.Terminal) -> int:
        shard_gb = checks.number(args.shard_gb, "--shard-gb", 0, lo_open=True)
        write_checkpoint(args.recipe, args.out, seed=args.seed, n_layers=args.n_layers, max_seq_len=args.max_seq_len,
                         dtype=args.dtype, model_type=args.model_type, shard_bytes=int(shard_gb * 2**30),
                         progress=lambda m: print(m, file=term.err))
        return 0

    return cli.run(command, prog="python -m export.make_checkpoint", debug=args.debug, verbose=args.verbose,
                   capture=argv is None)


if __name__ == "__main__":
    sys.exit(main())
