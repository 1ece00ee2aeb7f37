"""The LLaMA family: HF ``llama``, ``mistral`` and ``xverse`` configs, and llama GGUFs.

The decoder's own tensor names are HF LLaMA's (``layers.0.self_attn.q_proj.weight``), so HF
checkpoints only lose their ``model.`` prefix. XVERSE's config class has no
``num_key_value_heads`` (plain multi-head); all three config classes default ``rms_norm_eps``
to 1e-6. llama.cpp's converter permutes Q/K rows (interleaved rotary); the GGUF path undoes it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from edgellm import gguf_file
from edgellm.architectures import Architecture, ArchitectureError, register
from edgellm.config import ModelConfig
from edgellm.rope import RopeConfig

HF_DEFAULT_EPS = 1e-6


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    ctx = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", HF_DEFAULT_EPS),
        max_seq_len=max_seq_len or ctx, rope=RopeConfig.from_hf(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def hf_config(cfg: ModelConfig, model_type: str = "llama") -> dict[str, Any]:
    """``config.json`` as the published checkpoints of ``model_type`` spell it (inverse of
    ``config_from_hf``; ``max_position_embeddings`` = the cache capacity)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "xverse": "XverseForCausalLM"}[model_type]
    d: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope.theta, "torch_dtype": "bfloat16",
    }
    if model_type != "xverse" or cfg.n_kv_heads != cfg.n_heads:  # XVERSE's config has no such key
        d["num_key_value_heads"] = cfg.n_kv_heads
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        d["head_dim"] = cfg.head_dim
    if cfg.attention_bias or cfg.o_bias:
        d["attention_bias"] = True
    if cfg.mlp_bias:
        d["mlp_bias"] = True
    r = cfg.rope
    if r.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = r.partial_rotary_factor
    if r.type == "ntk":
        d["rope_scaling"] = {"type": "ntk", "alpha": r.alpha}
    elif r.type != "default":
        keys = {"linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                         "mscale_all_dim", "attention_factor", "truncate"),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        d["rope_scaling"] = {"rope_type": r.type, **{k: getattr(r, k) for k in keys[r.type] if getattr(r, k) is not None}}
    return d


def hf_checkpoint_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def hf_tensor_name(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


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


def gguf_tensor_name(name: str) -> str | None:
    if name == "rope_freqs.weight":
        return None
    for pat, repl in _GGUF_NAMES:
        if re.fullmatch(pat, name):
            return re.sub(pat, repl, name)
    raise ArchitectureError(f"GGUF tensor {name!r} has no LLaMA equivalent; only llama-architecture GGUFs are supported")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved -> rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_fix(name: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return unpermute_rotary(w, cfg.n_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return unpermute_rotary(w, cfg.n_kv_heads)
    return w


def config_from_gguf(reader, max_seq_len: int | None = None) -> ModelConfig:
    def g(k, d=None):
        return gguf_file.field(reader, f"llama.{k}", d)

    n_heads = g("attention.head_count")
    dim = g("embedding_length")
    tokens = gguf_file.field(reader, "tokenizer.ggml.tokens")
    vocab = g("vocab_size") or len(tokens)
    names = {t.name for t in reader.tensors}
    scaling = g("rope.scaling.type", "none")
    rope_kw: dict[str, Any] = {"theta": float(g("rope.freq_base", 10000.0))}
    if scaling in ("linear", "yarn"):
        rope_kw.update(type=scaling, factor=float(g("rope.scaling.factor")))
        if scaling == "yarn":
            rope_kw["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    elif scaling not in ("none", None):
        raise ArchitectureError(f"GGUF rope.scaling.type {scaling!r} is not supported")
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


LLAMA = register(Architecture(
    name="llama", hf_model_types=("llama", "xverse", "mistral"), gguf_architectures=("llama",),
    config_from_hf=config_from_hf, hf_tensor_name=hf_tensor_name, hf_config=hf_config,
    hf_checkpoint_name=hf_checkpoint_name, config_from_gguf=config_from_gguf,
    gguf_tensor_name=gguf_tensor_name, gguf_tensor_fix=gguf_tensor_fix))
