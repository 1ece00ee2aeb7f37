"""Source transforms: a target's formulation of the decoder's math, swapped in module by module.

Each transform is a function ``(model, **params) -> model`` that replaces one kind of
canonical submodule of ``edgellm.decoder.Decoder`` (a seam) with a class computing the same
thing in the form a runtime rewards, sharing the same Parameters. A target declares an
ordered list of them (``Transform`` values); ``apply`` runs the list and records it on the
model, and the manifest carries that record. ``tests/test_transforms.py`` holds each one
against the canonical module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.config import KVCacheConfig
from edgellm.decoder import SDPA, CausalMask, Decoder, KVCache, PositionRotary, RMSNorm, Rotary, quantize_kv, ring_slots

TRANSFORMS: dict[str, Callable[..., Decoder]] = {}


def transform(fn):
    """Register a transform under its function name."""
    TRANSFORMS[fn.__name__] = fn
    return fn


@dataclass(frozen=True)
class Transform:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **({"params": dict(self.params)} if self.params else {})}


def apply(model: Decoder, transforms: list[Transform]) -> Decoder:
    """Run ``transforms`` in order on ``model`` (in place) and record them on it."""
    for t in transforms:
        if t.name not in TRANSFORMS:
            raise ValueError(f"unknown source transform {t.name!r}; known: {', '.join(sorted(TRANSFORMS))}")
        TRANSFORMS[t.name](model, **t.params)
        model.transforms.append(t.to_dict())
    return model


def _swap(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of exactly type ``kind`` by ``make(old)``; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))
                count += 1
    if not count:
        raise ValueError(f"no {kind.__name__} left to replace (was another transform of this seam applied first?)")
    return count


def _attentions(model: Decoder):
    return [layer.self_attn for layer in model.layers]


# --------------------------------------------------------------------------- norm


class MatmulRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as a matmul with a constant 1/dim vector (XNNPACK
    delegates a matmul; it does not take mean.dim)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight
        self.register_buffer("mean_vec", torch.full((1, norm.weight.shape[0]), 1.0 / norm.weight.shape[0]),
                             persistent=False)

    def forward(self, x):
        x = x.float()
        return self.weight * (x * torch.rsqrt(F.linear(x * x, self.mean_vec) + self.eps))


@transform
def rmsnorm_as_matmul(model: Decoder) -> Decoder:
    _swap(model, RMSNorm, MatmulRMSNorm)
    return model


# --------------------------------------------------------------------------- RoPE rows


class OneHotRotaryTable(nn.Module):
    """Rows picked by a one-hot matrix built with float arithmetic times the tables (a matmul,
    which XNNPACK delegates, instead of a gather): onehot[t, s] = 1 - min(|s - pos_t|, 1)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.register_buffer("cos", table.cos, persistent=False)
        self.register_buffer("sin", table.sin, persistent=False)
        self.register_buffer("slots", torch.arange(table.cos.shape[0], dtype=torch.float32), persistent=False)

    def forward(self, input_pos):
        onehot = 1.0 - (self.slots[None, :] - input_pos.to(torch.float32)[:, None]).abs().clamp(max=1.0)
        return onehot @ self.cos, onehot @ self.sin


class SliceRotaryTable(nn.Module):
    """Rows from ``input_pos[0]`` on (positions are contiguous): a slice, for Core ML."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.register_buffer("cos", table.cos, persistent=False)
        self.register_buffer("sin", table.sin, persistent=False)

    def forward(self, input_pos):
        start, T = input_pos[0].item(), input_pos.shape[0]
        torch._check(start >= 0)
        torch._check(start + T <= self.cos.shape[0])
        return self.cos.narrow(0, start, T), self.sin.narrow(0, start, T)


@transform
def rope_rows_onehot(model: Decoder) -> Decoder:
    """(Rows computed from the positions, for a windowed cache, are no gather: kept as they are.)"""
    if not isinstance(model.rope, PositionRotary):
        model.rope = OneHotRotaryTable(model.rope)
    return model


@transform
def rope_rows_slice(model: Decoder) -> Decoder:
    if not isinstance(model.rope, PositionRotary):
        model.rope = SliceRotaryTable(model.rope)
    return model


# --------------------------------------------------------------------------- RoPE application


def rope_rotation(head_dim: int, half: int) -> torch.Tensor:
    """W with F.linear(x, W) = rotate_half(x) on the first 2*half dims, 0 on the rest."""
    w = torch.zeros(head_dim, head_dim)
    i = torch.arange(half)
    w[i, i + half] = -1.0
    w[i + half, i] = 1.0
    return w


class LinearRotary(nn.Module):
    """RoPE with full-width tables ([T, D]; cos 1 / sin 0 past the rotary dims) and rotate-half
    as a linear with a constant +-1 matrix: no slices of dynamic-length tensors."""

    def __init__(self, rotation: torch.Tensor):
        super().__init__()
        self.register_buffer("rotation", rotation, persistent=False)

    def forward(self, x, cos_full, sin_full):
        d = x.shape[-1]
        return x * cos_full.view(1, -1, 1, d) + F.linear(x, self.rotation) * sin_full.view(1, -1, 1, d)


@transform
def rope_rotate_linear(model: Decoder) -> Decoder:
    """Widen the tables to the head dim and rotate by a matmul (apply after the rows transform)."""
    table, head_dim = model.rope, model.config.head_dim
    if isinstance(table, PositionRotary):
        half = table.inv_freq.shape[0]
        table.widen(head_dim - 2 * half)
    else:
        half, rest = table.cos.shape[-1], head_dim - 2 * table.cos.shape[-1]
        n = table.cos.shape[0]
        table.cos = torch.cat([table.cos, table.cos, torch.ones(n, rest)], dim=-1)
        table.sin = torch.cat([table.sin, table.sin, torch.zeros(n, rest)], dim=-1)
    _swap(model, Rotary, lambda old: LinearRotary(rope_rotation(head_dim, half)))
    return model


# --------------------------------------------------------------------------- mask


class ArithCausalMask(CausalMask):
    """clamp(held - pos, 0, 1) * value, ``held`` the position each slot holds (the slot itself in
    a plain cache): float arithmetic over [T, S] (XNNPACK delegates it; Core ML's select drops a
    dynamic shape), exact for integer positions below 2^24. Needs a finite value. A windowed
    cache's held positions keep the canonical integer arithmetic, over the static [S] only."""

    def __init__(self, capacity: int, value: float, spec=None):
        if not abs(value) < float("inf"):
            raise ValueError("an arithmetic mask multiplies by its value: give a finite one (e.g. -1e30)")
        super().__init__(capacity, value, spec)
        self.register_buffer("slots", torch.arange(capacity, dtype=torch.float32), persistent=False)

    def rows(self, input_pos):
        held = self.slots if self.spec.ring is None else self.slot_positions(input_pos).to(torch.float32)
        return (held[None, :] - input_pos.to(torch.float32)[:, None]).clamp(0.0, 1.0) * self.value


@transform
def mask_arithmetic(model: Decoder, value: float) -> Decoder:
    model.mask = ArithCausalMask(model.config.max_seq_len, value, model.config.kv_cache)
    return model


class FilledFromPositions(nn.Module):
    """``n_valid`` derived in the graph from the last position (``input_pos[-1] + 1``) when the
    caller gives none, so attention reads only the filled slots of a two-input program (what
    ExecuTorch's TextLLMRunner calls) instead of the whole capacity."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_pos, n_valid):
        return self.inner(input_pos, input_pos[-1] + 1 if n_valid is None else n_valid)


@transform
def mask_filled_from_positions(model: Decoder) -> Decoder:
    """Not for an int8 cache, which keeps attending over the whole capacity: its quantizing ops
    and its attention cannot share one XNNPACK partition with the codes written and read outside
    (a cycle), and split they decoded slower (SmolLM2 .pte, 512 / 2048 slots: 23.1 / 8.0 tok/s
    against 28.2 / 10.9 over the whole cache)."""
    if model.config.kv_cache.dtype != "int8":
        model.mask = FilledFromPositions(model.mask)
    return model


# --------------------------------------------------------------------------- attention


class FoldedRowsMask(nn.Module):
    """The inner mask for query rows r*T + t (query heads sharing a K/V head folded into rows)."""

    def __init__(self, inner: nn.Module, rep: int):
        super().__init__()
        self.inner, self.rep = inner, rep

    def forward(self, input_pos, n_valid):
        return self.inner(input_pos.repeat(self.rep) if self.rep > 1 else input_pos, n_valid)


class FoldedBmmSDPA(SDPA):
    """Explicit 3-D bmm + softmax with the query heads of a K/V head folded into rows: only ops
    XNNPACK takes with a dynamic query length (no SDPA decomposition, no K/V copy)."""

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        hkv, d = self.n_kv_heads, self.head_dim
        q = q.transpose(1, 2)
        if n is not None:
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
        # [1, Hq, T, D] -> [Hkv, rep*T, D]: query head h uses K/V head h // rep (rows r*T + t).
        s = torch.bmm(q.reshape(hkv, -1, d), k_all.reshape(hkv, -1, d).transpose(1, 2)) * d ** -0.5 + mask
        y = torch.bmm(torch.softmax(s, dim=-1), v_all.reshape(hkv, -1, d))
        y = y.view(1, hkv, self.n_heads // hkv, -1, d).permute(0, 3, 1, 2, 4)
        return y.reshape(1, -1, self.n_heads * d)


class ExpandSDPA(SDPA):
    """K/V heads repeated with expand + reshape (a tile in MIL) instead of repeat_interleave."""

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        T = q.shape[1]
        q = q.transpose(1, 2)
        if n is not None:
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            b, h, s, d = k_all.shape
            k_all = k_all[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
            v_all = v_all[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return y.transpose(1, 2).reshape(1, T, -1)


class GqaSDPA(SDPA):
    """SDPA with ``enable_gqa`` (exports to ONNX opset 23's Attention with K/V heads as they are)."""

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        T = q.shape[1]
        q = q.transpose(1, 2)
        if n is not None:
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).reshape(1, T, -1)


def _same_sdpa(cls):
    return lambda old: cls(old.n_heads, old.n_kv_heads, old.head_dim)


@transform
def attention_folded_bmm(model: Decoder) -> Decoder:
    cfg = model.config
    _swap(model, SDPA, _same_sdpa(FoldedBmmSDPA))
    model.mask = FoldedRowsMask(model.mask, cfg.n_heads // cfg.n_kv_heads)
    return model


@transform
def attention_expand_kv(model: Decoder) -> Decoder:
    _swap(model, SDPA, _same_sdpa(ExpandSDPA))
    return model


@transform
def attention_gqa(model: Decoder) -> Decoder:
    _swap(model, SDPA, _same_sdpa(GqaSDPA))
    return model


# --------------------------------------------------------------------------- KV cache


class SliceKVCache(KVCache):
    """Written as a slice starting at the first position's slot (Core ML states; index_put and
    index_copy do not convert): a call's slots must be contiguous."""

    def _put(self, name, slots, x):
        start = slots[0].item()
        buf = getattr(self, name)
        torch._check(start >= 0)
        torch._check(start + x.shape[2] <= buf.shape[2])
        buf[:, :, start:start + x.shape[2]] = x


class ScatterKVCache(KVCache):
    """Written with scatter along the sequence axis (ONNX ScatterElements: no whole-cache copy)."""

    def _put(self, name, slots, x):
        getattr(self, name).scatter_(2, slots.view(1, 1, -1, 1).expand(x.shape), x)


def _like_cache(cls):
    def make(old: KVCache):
        _, h, s, d = old.k.shape
        return cls(h, s, d, old.spec)
    return make


@transform
def cache_slice(model: Decoder) -> Decoder:
    _swap(model, KVCache, _like_cache(SliceKVCache))
    return model


@transform
def cache_scatter(model: Decoder) -> Decoder:
    _swap(model, KVCache, _like_cache(ScatterKVCache))
    return model


# --------------------------------------------------------------------------- ExecuTorch LLM custom ops


def _llama_ops():
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers torch.ops.llama.*)

    return torch.ops.llama


class KVQuantize(nn.Module):
    """``quantize_kv`` of x [..., D] (rotated first by ``rotation``: ``KVCache.query``), a module of
    its own so that the lowering can find its ops (``nn_module_stack``) and leave them outside
    XNNPACK (``export.targets.executorch.lowering.PORTABLE_MODULES``)."""

    def forward(self, x: torch.Tensor, rotation: torch.Tensor | None = None):
        return quantize_kv(x @ rotation if rotation is not None else x)


class KVDequantize(nn.Module):
    """int8 codes [..., D] times their fp16 scales [..., 1] as float32 (``KVCache.read``), a module of
    its own for the same reason as ``KVQuantize``."""

    def forward(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.float()


class CustomOpKVCache(KVCache):
    """ExecuTorch's ``llama::update_cache``; layout [1, S, Hkv, D] (what custom_sdpa reads); a
    windowed cache is written at its ring slots (``update_cache_with_indices``).

    The stored dtype is the decoder's (``spec.dtype``): update_cache writes fp16 values, or int8
    codes and their fp16 scales [1, S, Hkv, 1] (``quantize_kv``, keys rotated by ``key_rotation``
    first), as it writes fp32. custom_sdpa takes K/V in the query's dtype only, so an fp16/int8
    cache is read back as fp32 before it, exactly as ``KVCache.read``: a plain cache only its
    slots 0..last position (all custom_sdpa reads), a windowed one whole (the mask picks)."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, spec: KVCacheConfig | None = None):
        nn.Module.__init__(self)
        self.spec = spec or KVCacheConfig()
        self._allocate((1, capacity, n_kv_heads), head_dim)
        if self.spec.dtype == "int8":
            self.quantize, self.dequantize = KVQuantize(), KVDequantize()

    def _writes(self, k, v):
        """(buffer name, value) pairs to write, in the stored dtype."""
        if self.spec.dtype == "fp32":
            return [("k", k), ("v", v)]
        if self.spec.dtype == "fp16":
            return [("k", k.to(torch.float16)), ("v", v.to(torch.float16))]
        out = []
        for name, x in (("k", k), ("v", v)):
            codes, scale = self.quantize(x, self.key_rotation if name == "k" else None)
            out += [(name, codes), (f"{name}_scale", scale)]
        return out

    def update(self, input_pos, k, v, n=None):
        ops = _llama_ops()
        writes = self._writes(k, v)
        if self.spec.ring is not None:
            slots = ring_slots(input_pos, self.spec)[None, :]
            for name, x in writes:
                ops.update_cache_with_indices(x, getattr(self, name), 0, slots)
            return self._read("k"), self._read("v")
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start < self.k.shape[1])
        for name, x in writes:
            ops.update_cache(x, getattr(self, name), start)
        if self.spec.dtype == "fp32":
            return self.k, self.v
        end = start + k.shape[1]  # custom_sdpa reads slots 0..end-1 only
        torch._check(end <= self.k.shape[1])
        return self._read("k", end), self._read("v", end)

    def _read(self, name: str, end: int | None = None) -> torch.Tensor:
        """Buffer ``name`` (its first ``end`` slots) as float32, as ``KVCache.read``."""
        x = getattr(self, name)
        if end is not None:
            x = x[:, :end]
        if self.spec.dtype == "int8":
            scale = getattr(self, f"{name}_scale")
            return self.dequantize(x, scale[:, :end] if end is not None else scale)
        return x.float() if x.dtype != torch.float32 else x


class CustomSDPA(SDPA):
    """ExecuTorch's ``llama::custom_sdpa``: causal from ``input_pos[0]``, reads slots 0..pos only;
    given a mask (a windowed cache's [T, S] rows) it reads every slot under that mask."""

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        T = q.shape[1]
        if mask is not None:
            y = _llama_ops().custom_sdpa(q, k_all, v_all, 0, mask, 0, False)
        else:
            y = _llama_ops().custom_sdpa(q, k_all, v_all, input_pos[0].item(), None, 0, True)
        return y.reshape(1, T, -1)


class NoMask(nn.Module):
    """No mask tensor: the attention computes causality itself."""

    def forward(self, input_pos, n_valid):
        return None, None


@transform
def executorch_llm_ops(model: Decoder) -> Decoder:
    """Cache and attention as ExecuTorch's LLM custom ops (they go together: the cache layout), in
    the cache's own dtype (fp32, fp16, int8). A windowed cache keeps the decoder's mask
    (custom_sdpa then attends under it, not causally)."""
    _llama_ops()
    spec = model.config.kv_cache
    _swap(model, KVCache, lambda old: CustomOpKVCache(old.k.shape[1], old.k.shape[2], old.k.shape[3], old.spec))
    _swap(model, SDPA, _same_sdpa(CustomSDPA))
    if spec.window is None:
        model.mask = NoMask()
    return model

