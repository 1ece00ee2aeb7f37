"""Checkpoint loaders: HF folders, GGUF files, and seeded random weights.

Every loader returns ``(ModelConfig, state_dict)`` with the decoder's own (HF LLaMA) tensor
names in float32. Format differences — shard layouts, GGUF names, llama.cpp's Q/K row
permutation for rotary, XVERSE's config defaults — are absorbed here, so the decoder never
branches on where its weights came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.config import ModelConfig, config_from_hf
from export.rope import RopeConfig


class CheckpointError(ValueError):
    pass


# --------------------------------------------------------------------------- HF folders


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]} which is missing from {folder}")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no weights in {folder}: expected model.safetensors, sharded safetensors "
                              f"with model.safetensors.index.json, or pytorch_model*.bin")
    return files


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt shard
        raise CheckpointError(f"cannot read weights from {path} (corrupt or truncated?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _hf_name(name: str) -> str | None:
    """HF LLaMA/XVERSE tensor name -> decoder name (None = not a model weight)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


def load_hf_folder(folder: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json; pass an HF model folder or a .gguf file")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    try:
        cfg = config_from_hf(hf, max_seq_len)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path} lacks the required field {e.args[0]!r}") from None
    state: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(folder):
        for k, v in _read_weights(f).items():
            name = _hf_name(k)
            if name is not None:
                state[name] = v.float()
    if "lm_head.weight" not in state and not cfg.tie_embeddings:
        raise CheckpointError(f"{folder} has no lm_head.weight but config.json does not tie the embeddings; "
                              f"set tie_word_embeddings: true in config.json or add the output head")
    return cfg, state


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


# --------------------------------------------------------------------------- GGUF

_GGUF_NAMES = [
    (r"token_embd\.weight", "embed_tokens.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight"),
]


def _gguf_name(name: str) -> str | None:
    if name == "rope_freqs.weight":
        return None
    for pat, repl in _GGUF_NAMES:
        if re.fullmatch(pat, name):
            return re.sub(pat, repl, name)
    raise CheckpointError(f"GGUF tensor {name!r} has no LLaMA equivalent; only llama-architecture GGUFs are supported")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved -> rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, max_seq_len: int | None = None) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; edgellm reads llama GGUFs")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = g("attention.head_count")
    dim = g("embedding_length")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = g("vocab_size") or len(tokens)
    names = {t.name for t in reader.tensors}
    scaling = g("rope.scaling.type", "none")
    rope_kw: dict[str, Any] = {"theta": float(g("rope.freq_base", 10000.0))}
    if scaling in ("linear", "yarn"):
        rope_kw.update(type=scaling, factor=float(g("rope.scaling.factor")))
        if scaling == "yarn":
            rope_kw["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    elif scaling not in ("none", None):
        raise CheckpointError(f"GGUF rope.scaling.type {scaling!r} is not supported")
    ctx = int(g("context_length", 2048))
    return ModelConfig(
        vocab_size=int(vocab), dim=int(dim), n_layers=int(g("block_count")), n_heads=int(n_heads),
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length", dim // n_heads)),
        hidden_dim=int(g("feed_forward_length")),
        norm_eps=float(np.float32(g("attention.layer_norm_rms_epsilon", 1e-5))),
        max_seq_len=max_seq_len or ctx, rope=RopeConfig(**rope_kw),
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
    )


def load_gguf(path: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama GGUF, dequantize every tensor to fp32 and map names to the decoder's."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader, max_seq_len)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        if name is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rotary(w, cfg.n_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_rotary(w, cfg.n_kv_heads)
        state[name] = w
    return cfg, state


# --------------------------------------------------------------------------- random


def random_state(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random weights (normal, std 0.02; norms near 1) for dry runs at any size."""
    from export.decoder import Decoder

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            state[k] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif k.endswith(".bias"):
            state[k] = 0.02 * torch.randn(shape, generator=gen)
        else:
            state[k] = std * torch.randn(shape, generator=gen)
    return state
