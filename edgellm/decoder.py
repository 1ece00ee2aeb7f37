"""The one LLaMA-family decoder with a static KV cache, written once with the HF math.

``forward(tokens int64[1, T], input_pos int64[T], n_valid int64[] | None) -> logits float32[1, T, V]``.
The KV cache is a pair of fixed-capacity buffers per layer, written in place at ``input_pos``;
a query at position p attends to cache slots 0..p.

The math has named seams, each a small module with one job, so that an export target can
swap in its own formulation of the same computation without this file knowing about it
(``export.transforms``): ``Decoder.rope`` (positions -> cos/sin rows), ``Decoder.mask``
(positions -> additive causal mask), and per layer ``norm`` modules, ``self_attn.rotary``
(applying RoPE), ``self_attn.kv_cache`` (writing and reading the cache) and ``self_attn.sdpa``
(attention over the cache). Shapes between the seams: q/k/v leave the projections as
[1, T, H, D]; the cache returns its full buffers in its own layout; sdpa returns [1, T, H*D].

Parameter names follow the HF LLaMA layout (``layers.0.self_attn.q_proj.weight``) so that
checkpoint loaders only strip prefixes; other formats' names are mapped in
``edgellm.architectures``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgellm.config import ModelConfig
from edgellm.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class RotaryTable(nn.Module):
    """cos/sin rows for the given positions, looked up in tables computed once (``edgellm.rope``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)  # [capacity, rot_dim // 2]
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[input_pos], self.sin[input_pos]


class Rotary(nn.Module):
    """Rotate-half RoPE (HF layout) on the first 2 * cos.shape[-1] dims of x [1, T, H, D]."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = cos.shape[-1]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if rest.shape[-1]:
            out.append(rest)
        return torch.cat(out, dim=-1)


class CausalMask(nn.Module):
    """Additive mask [T, S] (0 where slot <= position, ``value`` elsewhere) and the number of
    slots attention reads: with ``n_valid`` (the filled slots) only those, else the whole cache."""

    def __init__(self, capacity: int, value: float = float("-inf")):
        super().__init__()
        self.value = value
        self.register_buffer("positions", torch.arange(capacity), persistent=False)

    def rows(self, input_pos: torch.Tensor) -> torch.Tensor:
        visible = self.positions[None, :] <= input_pos[:, None]
        return torch.where(visible, 0.0, self.value)

    def forward(self, input_pos: torch.Tensor, n_valid: torch.Tensor | None):
        mask = self.rows(input_pos)
        if n_valid is None:
            return mask, None
        n = n_valid.item()
        torch._check(n >= 1)
        torch._check(n <= self.positions.shape[0])
        return mask[:, :n], n


class KVCache(nn.Module):
    """Fixed-capacity K/V buffers [1, Hkv, S, D], written in place at the given positions."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, n_kv_heads, capacity, head_dim), persistent=False)
        self.register_buffer("v", torch.zeros(1, n_kv_heads, capacity, head_dim), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [1, T, Hkv, D]. Returns the full caches."""
        self.k.index_copy_(2, input_pos, k.transpose(1, 2))
        self.v.index_copy_(2, input_pos, v.transpose(1, 2))
        return self.k, self.v

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class SDPA(nn.Module):
    """Attention of q [1, T, Hq, D] over the caches [1, Hkv, S, D]; K/V heads repeated for GQA."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        T = q.shape[1]
        q = q.transpose(1, 2)
        if n is not None:  # attend to the filled slots only
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k_all, v_all = k_all.repeat_interleave(rep, dim=1), v_all.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return y.transpose(1, 2).reshape(1, T, -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.rotary = Rotary()
        self.kv_cache = KVCache(cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.sdpa = SDPA(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)

    def forward(self, x, rope, input_pos, mask, n):
        cos, sin = rope
        q = self.q_proj(x).view(1, -1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        k_all, v_all = self.kv_cache.update(input_pos, k, v)
        return self.o_proj(self.sdpa(q, k_all, v_all, mask, n, input_pos))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, rope, input_pos, mask, n):
        h = x + self.self_attn(self.input_layernorm(x), rope, input_pos, mask, n)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """LLaMA-family decoder: embedding, blocks, final norm, output head, static KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryTable(cfg)
        self.mask = CausalMask(cfg.max_seq_len)
        self.transforms: list[dict] = []  # source transforms applied (export.transforms), for manifests

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``n_valid`` (int64 scalar, optional): cache slots 0..n_valid-1 are the filled ones;
        attention then reads only those (an exported graph's cost follows the filled length,
        not the capacity). None = attend over the whole cache, masked."""
        rope = self.rope(input_pos)
        mask, n = self.mask(input_pos, n_valid)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask, n)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache.reset()


def buffer_source(cfg: ModelConfig, prepare=None):
    """name -> value of a decoder buffer (RoPE tables, mask positions, KV cache), for a decoder
    whose tensors are filled one at a time instead of built with weights: the buffers come from
    a one-layer, two-row-vocabulary decoder (``prepare`` applies the caller's module swaps),
    which has the same buffers as the full one; layer i's are layer 0's."""
    small = Decoder(replace(cfg, n_layers=1, vocab_size=2, hidden_dim=2))
    buffers = dict((prepare(small) if prepare else small).named_buffers())

    def value(name: str) -> torch.Tensor:
        parts = name.split(".")
        key = ".".join(["layers", "0", *parts[2:]]) if parts[0] == "layers" else name
        if key not in buffers:
            raise KeyError(name)
        return buffers[key]

    return value


def untouched_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages are not resident until written: calloc'd memory (numpy) is the kernel's
    zero page, where ``torch.zeros`` writes every byte. A 7B's fp32 KV cache is 8 GiB at 8K slots,
    and an exporter that only traces it (ExecuTorch does not serialize a mutable buffer's
    initial state) should not pay for it."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(n, dtype=np.uint8)).view(dtype).reshape(shape)


def fill(model: nn.Module, parameter, buffer) -> nn.Module:
    """Give a decoder built on the meta device its tensors one at a time, in place:
    ``parameter(name, module, meta_param)`` returns each parameter (a tied one is visited under
    both names), ``buffer(name)`` each buffer's value, copied (a one-layer source serves every
    layer's mutable cache); an all-zero buffer (the caches) becomes ``untouched_zeros``, equal
    in value. Order and names stay those of the module built with weights."""
    zero: dict[int, tuple] = {}  # per source tensor (kept alive, so ids stay its): sources repeat
    for prefix, mod in model.named_modules():
        for attr, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[attr] = parameter(f"{prefix}.{attr}" if prefix else attr, mod, p)
        for attr, b in list(mod._buffers.items()):
            if b is not None:
                src = buffer(f"{prefix}.{attr}" if prefix else attr)
                if id(src) not in zero:
                    zero[id(src)] = (src, src.numel() > 0 and not bool(src.any()))
                mod._buffers[attr] = untouched_zeros(src.shape, src.dtype) if zero[id(src)][1] else src.clone()
    return model
