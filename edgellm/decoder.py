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

from edgellm.config import KVCacheConfig, ModelConfig
from edgellm.rope import inv_freq_and_scale, rope_tables


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


class PositionRotary(nn.Module):
    """cos/sin rows computed from the positions themselves (the same float32 arithmetic as the
    tables), for a windowed cache whose positions outgrow any table. ``widen(rest)`` makes the rows
    head-dim wide ([cos, cos, 1 * rest] / [sin, sin, 0 * rest]) for ``export.transforms.LinearRotary``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, scale = inv_freq_and_scale(cfg.rope, cfg.head_dim, cfg.max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale, self.rest = float(scale), None

    def widen(self, rest: int) -> None:
        self.rest = rest

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = input_pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        if self.rest is not None:
            ones = torch.ones_like(freqs[:, :1]).expand(-1, self.rest)
            return torch.cat([cos, cos, ones], dim=-1), torch.cat([sin, sin, ones * 0.0], dim=-1)
        return cos, sin


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


def ring_slots(input_pos: torch.Tensor, spec: KVCacheConfig) -> torch.Tensor:
    """The cache slot of each position: itself in a plain cache; in a windowed one, a sink
    (position < sinks) keeps its own slot and the rest wrap around the ring."""
    if spec.ring is None:
        return input_pos
    s = spec.sinks
    return torch.where(input_pos < s, input_pos, s + torch.remainder(input_pos - s, spec.ring))


class CausalMask(nn.Module):
    """Additive mask [T, S] (0 where the slot holds a position <= the query's, ``value``
    elsewhere) and the number of slots attention reads: with ``n_valid`` (the filled slots)
    only those, else the whole cache.

    In a windowed cache a ring slot s holds, after this call's writes (the last written position
    is ``input_pos[-1]``), the latest position q <= last that maps to it; it holds nothing yet
    while last < s."""

    def __init__(self, capacity: int, value: float = float("-inf"), spec: KVCacheConfig | None = None):
        super().__init__()
        self.value = value
        self.spec = spec or KVCacheConfig()
        self.register_buffer("positions", torch.arange(capacity), persistent=False)

    def slot_positions(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Position held by each slot ([S]; a slot not yet written holds a position > last)."""
        s = self.positions
        if self.spec.ring is None:
            return s
        last = input_pos[-1]
        held = last - torch.remainder(last - s, self.spec.ring)
        return torch.where(s < self.spec.sinks, s, torch.where(s <= last, held, last + 1))

    def rows(self, input_pos: torch.Tensor) -> torch.Tensor:
        visible = self.slot_positions(input_pos)[None, :] <= input_pos[:, None]
        return torch.where(visible, 0.0, self.value)

    def forward(self, input_pos: torch.Tensor, n_valid: torch.Tensor | None):
        mask = self.rows(input_pos)
        if n_valid is None:
            return mask, None
        capacity = self.positions.shape[0]
        n = (n_valid.clamp(max=capacity) if self.spec.ring is not None else n_valid).item()
        torch._check(n >= 1)
        torch._check(n <= capacity)
        return mask[:, :n], n


STORED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp16 scales [..., 1] of x [..., D]: symmetric, one scale per token and
    head. The codes are x / (max |x| / 127) rounded (an all-zero row: codes 0); the scale is stored
    in fp16 (2^-11 relative, far below the codes' step), which keeps XGen-7B's 8K cache at 2.18 GB."""
    # max(amax, -amin) rather than abs().amax(), no clamp of the codes (|x| / scale <= 127 by
    # construction) and the fp16 rounding only on the way to the buffer: XNNPACK then takes the
    # float ops around the reductions in one partition with no dependency cycle.
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True))
    scale = amax.clamp(min=127 * 2.0 ** -14) / 127.0  # fp16's smallest normal at least: no subnormal scale
    return torch.round(x / scale).to(torch.int8), scale.to(torch.float16)


def hadamard(d: int) -> torch.Tensor:
    """An orthonormal [d, d] float32 rotation that spreads each coordinate over many: block
    diagonal, each block the Sylvester Hadamard matrix of the largest power of two dividing d
    (d = 64 or 128, every head_dim here: one block), scaled by 1/sqrt(block)."""
    block = d & -d
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / block ** 0.5] * (d // block))


class KVCache(nn.Module):
    """Fixed-capacity K/V buffers [1, Hkv, S, D], written in place at the positions' slots
    (``ring_slots``) in the stored dtype (``spec.dtype``; int8 adds fp16 ``k_scale``/``v_scale``
    [1, Hkv, S, 1]); ``update`` returns the first ``n`` slots (all without ``n``) as float32.
    Subclasses change only how a buffer is written (``_put``) or the layout.

    An int8 cache stores keys rotated by ``hadamard(D)`` (``key_rotation``) and ``query`` rotates
    the queries alike, so q.k is unchanged: RoPE'd keys carry a few outlier channels that set a
    per-token scale and flatten the rest to a few codes; rotated, the outliers are spread over the
    head. On SmolLM2 (511 tokens) that cut the int8 cache's KL to the fp32 cache's logits from
    3.6e-3 to 1.0e-3, at no byte of storage."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, spec: KVCacheConfig | None = None):
        super().__init__()
        self.spec = spec or KVCacheConfig()
        self._allocate((1, n_kv_heads, capacity), head_dim)

    def _allocate(self, layout: tuple[int, int, int], head_dim: int) -> None:
        """k and v [*layout, D] in the stored dtype; int8 adds their fp16 scales [*layout, 1] and
        the key rotation. A subclass with another layout (heads and slots swapped) calls it too."""
        dtype = STORED_DTYPES[self.spec.dtype]
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(*layout, head_dim, dtype=dtype), persistent=False)
        if self.spec.dtype == "int8":
            for name in ("k_scale", "v_scale"):
                self.register_buffer(name, torch.zeros(*layout, 1, dtype=torch.float16), persistent=False)
            self.register_buffer("key_rotation", hadamard(head_dim), persistent=False)

    def state_names(self) -> list[str]:
        """The buffers that persist between calls, in a fixed order."""
        return ["k", "v"] + (["k_scale", "v_scale"] if self.spec.dtype == "int8" else [])

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., D] in the basis the cached keys are stored in (rotated for int8)."""
        return q @ self.key_rotation if self.spec.dtype == "int8" else q

    def _put(self, name: str, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Write x [1, Hkv, T, *] into buffer ``name`` at ``slots`` along the sequence axis."""
        getattr(self, name).index_copy_(2, slots, x)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int | None = None):
        """k, v: [1, T, Hkv, D]. Returns the caches' first ``n`` slots (all if None) as float32."""
        slots = ring_slots(input_pos, self.spec)
        for name, x in (("k", self.query(k).transpose(1, 2)), ("v", v.transpose(1, 2))):
            if self.spec.dtype == "int8":
                codes, scale = quantize_kv(x)
                self._put(name, slots, codes)
                self._put(f"{name}_scale", slots, scale)
            else:
                self._put(name, slots, x.to(self.k.dtype))
        return self.read("k", n), self.read("v", n)

    def read(self, name: str, n: int | None = None) -> torch.Tensor:
        x = getattr(self, name)
        if n is not None:
            x = x[:, :, :n]
        if self.spec.dtype == "int8":
            scale = getattr(self, f"{name}_scale")
            return x.float() * (scale[:, :, :n] if n is not None else scale).float()
        return x.float() if x.dtype != torch.float32 else x

    def reset(self) -> None:
        for name in self.state_names():
            getattr(self, name).zero_()


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
        self.kv_cache = KVCache(cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim, cfg.kv_cache)
        self.sdpa = SDPA(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)

    def forward(self, x, rope, input_pos, mask, n):
        cos, sin = rope
        q = self.q_proj(x).view(1, -1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        k_all, v_all = self.kv_cache.update(input_pos, k, v, n)
        return self.o_proj(self.sdpa(self.kv_cache.query(q), k_all, v_all, mask, n, input_pos))


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
        self.rope = PositionRotary(cfg) if cfg.kv_cache.window is not None else RotaryTable(cfg)
        self.mask = CausalMask(cfg.max_seq_len, spec=cfg.kv_cache)
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
