"""The one eager LLaMA-family decoder with a static KV cache, read top to bottom.

``forward(tokens int64[1, T], input_pos int64[T]) -> logits float32[1, T, vocab]``. The KV
cache is a pair of fixed-capacity buffers per layer, written in place at ``input_pos``; a
query at position p attends to cache slots 0..p. Every export target traces this module;
where a runtime needs another formulation (how the cache is written, how attention or GQA
is expressed) that is a ``DecoderOptions`` field, never a copy of the model.

Parameter names follow the HF LLaMA layout (``layers.0.self_attn.q_proj.weight``) so that
checkpoint loaders only strip prefixes; naming differences of other formats are resolved in
``export.checkpoints``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from export.config import ModelConfig
from export.rope import rope_tables

CACHE_UPDATES = ("index_copy", "slice", "scatter", "custom_op")
ATTENTIONS = ("sdpa", "sdpa_gqa", "custom_sdpa", "bmm")
NORMS = ("mean", "matmul")
GQA_EXPANDS = ("repeat_interleave", "expand", "fold")
MASK_BUILDS = ("where", "arith")


@dataclass(frozen=True)
class DecoderOptions:
    """How the same math is expressed for a given runtime.

    cache_update: ``index_copy`` (ExecuTorch mutable buffer), ``slice`` (a slice starting at
      ``input_pos[0]``; Core ML states), ``scatter`` (ScatterElements in ONNX), ``custom_op``
      (ExecuTorch's ``llama::update_cache``; cache layout [B, S, H, D]).
    attention: ``sdpa`` (explicit additive mask, K/V expanded for GQA), ``sdpa_gqa``
      (``enable_gqa=True``), ``custom_sdpa`` (ExecuTorch's ``llama::custom_sdpa``), ``bmm``
      (explicit 3-D bmm + softmax with the query heads of a K/V head folded into rows: only ops
      XNNPACK takes with a dynamic query length -- no SDPA decomposition, no K/V copy).
    norm: ``mean`` (as written in HF) or ``matmul`` (the mean of squares as a matmul with a
      constant vector, which XNNPACK delegates).
    gqa_expand: how K/V heads are repeated for ``sdpa``; ``fold`` repeats nothing: the query
      heads sharing a K/V head are folded into the query rows (no copy of the cache).
    rope_lookup: ``index`` (gather rows at ``input_pos``), ``slice`` (rows from
      ``input_pos[0]``, contiguous positions) or ``onehot`` (a one-hot matrix built with float
      arithmetic times the tables: a matmul, which XNNPACK delegates, instead of a gather).
    mask_build: ``where`` (compare + select) or ``arith`` (clamp(slot - pos, 0, 1) * mask_value:
      float arithmetic XNNPACK delegates; needs a finite mask_value).
    rope_rotate: ``slice`` (rotate-half by slicing x) or ``linear`` (rotate-half as a linear with
      a constant +-1 matrix, full-width tables: no slices of dynamic-length tensors).
    mask_value: additive mask for masked slots (finite so fp16 targets stay finite).
    """

    cache_update: str = "index_copy"
    attention: str = "sdpa"
    norm: str = "mean"
    gqa_expand: str = "repeat_interleave"
    rope_lookup: str = "index"
    mask_build: str = "where"
    rope_rotate: str = "slice"
    mask_value: float = float("-inf")

    def __post_init__(self):
        for name, allowed in (("cache_update", CACHE_UPDATES), ("attention", ATTENTIONS),
                              ("norm", NORMS), ("gqa_expand", GQA_EXPANDS),
                              ("rope_lookup", ("index", "slice", "onehot")), ("mask_build", MASK_BUILDS),
                              ("rope_rotate", ("slice", "linear"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecoderOptions.{name}={getattr(self, name)!r}; valid: {', '.join(allowed)}")
        if (self.attention == "custom_sdpa") != (self.cache_update == "custom_op"):
            raise ValueError("custom_sdpa and the custom_op cache update go together (cache layout [B, S, H, D])")
        if self.mask_build == "arith" and not abs(self.mask_value) < float("inf"):
            raise ValueError("mask_build='arith' multiplies by mask_value: give a finite mask_value (e.g. -1e30)")

    def to_dict(self):
        return asdict(self)


def _custom_ops():
    """ExecuTorch's LLM custom ops (registers torch.ops.llama.*)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401

    return torch.ops.llama


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, style: str = "mean"):
        super().__init__()
        self.eps, self.style = eps, style
        self.weight = nn.Parameter(torch.ones(dim))
        if style == "matmul":
            self.register_buffer("mean_vec", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.style == "matmul":
            var = F.linear(x * x, self.mean_vec)
        else:
            var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class KVCache(nn.Module):
    """Fixed-capacity K/V buffers, written in place at the given positions."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, update: str):
        super().__init__()
        self.update_kind = update
        shape = (1, capacity, n_kv_heads, head_dim) if update == "custom_op" else (1, n_kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape), persistent=False)
        self.register_buffer("v", torch.zeros(shape), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [1, Hkv, T, D] (or [1, T, Hkv, D] for custom_op). Returns the full caches."""
        kind = self.update_kind
        if kind == "index_copy":
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        elif kind == "slice":
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + k.shape[2] <= self.k.shape[2])
            self.k[:, :, start:start + k.shape[2]] = k
            self.v[:, :, start:start + v.shape[2]] = v
        elif kind == "scatter":
            idx = input_pos.view(1, 1, -1, 1).expand(k.shape)
            self.k.scatter_(2, idx, k)
            self.v.scatter_(2, idx, v)
        else:  # custom_op
            ops = _custom_ops()
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start < self.k.shape[1])
            ops.update_cache(k, self.k, start)
            ops.update_cache(v, self.v, start)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: DecoderOptions):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.opts = opts
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.kv_cache = KVCache(cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim, opts.cache_update)

    def forward(self, x, cos, sin, input_pos, mask, n_valid=None):
        T = x.shape[1]
        q = self.q_proj(x).view(1, -1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        if self.opts.rope_rotate == "linear":
            q, k = apply_rope_linear(q, cos, sin, self.rope_rotation), apply_rope_linear(k, cos, sin, self.rope_rotation)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.opts.attention == "custom_sdpa":
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            start = input_pos[0].item()
            y = _custom_ops().custom_sdpa(q, k_all, v_all, start, None, 0, True)
            return self.o_proj(y.reshape(1, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k_all, v_all = self.kv_cache.update(input_pos, k, v)
        if n_valid is not None:  # attend to the filled slots only (see Decoder.forward)
            k_all, v_all = k_all[:, :, :n_valid], v_all[:, :, :n_valid]
        if self.opts.attention == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        elif self.opts.attention == "bmm":
            # [1, Hq, T, D] -> [Hkv, rep*T, D]: query head h uses K/V head h // rep (rows r*T + t,
            # matching the mask built in Decoder.forward); reshapes keep one inferred dim only.
            hkv, d = self.n_kv_heads, self.head_dim
            s = torch.bmm(q.reshape(hkv, -1, d), k_all.reshape(hkv, -1, d).transpose(1, 2)) * d ** -0.5 + mask
            y = torch.bmm(torch.softmax(s, dim=-1), v_all.reshape(hkv, -1, d))
            y = y.view(1, hkv, self.n_heads // hkv, -1, d).permute(0, 3, 1, 2, 4)
            return self.o_proj(y.reshape(1, -1, self.n_heads * d))
        elif self.opts.gqa_expand == "fold" and self.n_heads != self.n_kv_heads:
            # [1, Hq, T, D] -> [1, Hkv, rep*T, D]: query head h uses K/V head h // rep; the mask
            # was built for rep*T rows (Decoder.forward).
            rep, hkv, d = self.n_heads // self.n_kv_heads, self.n_kv_heads, self.head_dim
            qf = q.view(1, hkv, rep, T, d).flatten(2, 3)
            y = F.scaled_dot_product_attention(qf, k_all, v_all, attn_mask=mask)
            return self.o_proj(y.view(1, hkv, rep, T, d).permute(0, 3, 1, 2, 4).reshape(1, T, -1))
        else:
            rep = self.n_heads // self.n_kv_heads
            if rep > 1:
                k_all, v_all = _repeat_kv(k_all, rep, self.opts.gqa_expand), _repeat_kv(v_all, rep, self.opts.gqa_expand)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(1, T, -1))


def _repeat_kv(x: torch.Tensor, rep: int, how: str) -> torch.Tensor:
    if how == "repeat_interleave":
        return x.repeat_interleave(rep, dim=1)
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)


def rope_rotation(head_dim: int, half: int) -> torch.Tensor:
    """W with F.linear(x, W) = rotate_half(x) on the first 2*half dims, 0 on the rest."""
    w = torch.zeros(head_dim, head_dim)
    i = torch.arange(half)
    w[i, i + half] = -1.0
    w[i + half, i] = 1.0
    return w


def apply_rope_linear(x, cos_full, sin_full, rotation):
    """apply_rope with full-width tables ([T, D]; cos 1 / sin 0 past the rotary dims)."""
    d = x.shape[-1]
    return x * cos_full.view(1, -1, 1, d) + F.linear(x, rotation) * sin_full.view(1, -1, 1, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout) on the first 2*cos.shape[-1] dims; x: [1, T, H, D]."""
    half = cos.shape[-1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rest.shape[-1]:
        out.append(rest)
    return torch.cat(out, dim=-1)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: DecoderOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, opts.norm)
        self.self_attn = Attention(cfg, opts)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, opts.norm)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, input_pos, mask, n_valid=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, n_valid)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """LLaMA-family decoder: embedding, blocks, final norm, output head, static KV cache."""

    def __init__(self, cfg: ModelConfig, opts: DecoderOptions | None = None):
        super().__init__()
        self.config, self.options = cfg, opts or DecoderOptions()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, self.options) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.options.norm)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, cfg.max_seq_len)
        if self.options.rope_rotate == "linear":
            half, rest = cos.shape[-1], cfg.head_dim - 2 * cos.shape[-1]
            cos = torch.cat([cos, cos, torch.ones(cos.shape[0], rest)], dim=-1)
            sin = torch.cat([sin, sin, torch.zeros(sin.shape[0], rest)], dim=-1)
            for layer in self.layers:
                layer.self_attn.register_buffer("rope_rotation", rope_rotation(cfg.head_dim, half), persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("cache_positions", torch.arange(cfg.max_seq_len), persistent=False)
        self.register_buffer("slot_index", torch.arange(cfg.max_seq_len, dtype=torch.float32), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``n_valid`` (int64 scalar, optional): cache slots 0..n_valid-1 are the filled ones;
        attention then reads only those (an exported graph's cost follows the filled length,
        not the capacity). None = attend over the whole cache, masked."""
        T = tokens.shape[1]
        opts, cfg = self.options, self.config
        if opts.rope_lookup == "onehot" or opts.mask_build == "arith":
            pos_f = input_pos.to(torch.float32)
        if opts.rope_lookup == "onehot":
            # onehot[t, s] = 1 - min(|s - pos_t|, 1): exact for integer-valued floats
            onehot = 1.0 - (self.slot_index[None, :] - pos_f[:, None]).abs().clamp(max=1.0)
            cos, sin = onehot @ self.rope_cos, onehot @ self.rope_sin
        elif opts.rope_lookup == "slice":
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + T <= self.config.max_seq_len)
            cos, sin = self.rope_cos.narrow(0, start, T), self.rope_sin.narrow(0, start, T)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        mask = None
        if opts.attention != "custom_sdpa":
            folded = opts.attention == "bmm" or (opts.gqa_expand == "fold" and opts.attention == "sdpa")
            rep = cfg.n_heads // cfg.n_kv_heads if folded else 1
            if opts.mask_build == "arith":
                rows = pos_f.repeat(rep) if rep > 1 else pos_f
                mask = (self.slot_index[None, :] - rows[:, None]).clamp(0.0, 1.0) * opts.mask_value
            else:
                rows = input_pos.repeat(rep) if rep > 1 else input_pos
                visible = self.cache_positions[None, :] <= rows[:, None]
                mask = torch.where(visible, 0.0, opts.mask_value)
        n = None
        if n_valid is not None and opts.attention != "custom_sdpa":
            n = n_valid.item()
            torch._check(n >= 0)
            torch._check(n >= 1)
            torch._check(n <= cfg.max_seq_len)
            mask = mask[:, :n]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, n)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache.k.zero_()
            layer.self_attn.kv_cache.v.zero_()

    def with_options(self, opts: DecoderOptions, **changes) -> "Decoder":
        """The same weights expressed for another runtime (a new module sharing parameters)."""
        opts = replace(opts, **changes) if changes else opts
        other = Decoder(self.config, opts)
        other.load_state_dict(self.state_dict(), strict=False, assign=True)
        if self.config.tie_embeddings:
            other.lm_head.weight = other.embed_tokens.weight
        return other.eval()
