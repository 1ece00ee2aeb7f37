"""Quantization methods beyond the data-free scale search: HQQ (data-free) and GPTQ (calibrated).

Every method returns the same ``QuantizedWeight`` (codes, grid-exact scales, integer zero points
for asymmetric int4), so every export target carries its bits unchanged and the quantization
digest identifies them. ``quantization.quantize`` dispatches here on ``QuantConfig.method``.

HQQ (half-quadratic quantization, Badri & Shaji 2023), from torchao:

* asymmetric int4: torchao's ``_choose_qparams_and_quantize_affine_hqq`` (proximal solver of
  ``||W - dequant(quant(W))||_p``, p = 0.7, optimising the zero point with the scale fixed at
  the min-max one). HQQ's zero point is a float; our format (ONNX MatMulNBits, Core ML) carries
  an integer zero point per group, so the result is projected: scale rounded to the bf16/fp16
  grid, zero point rounded to the nearest integer in [0, 15], codes re-rounded with both.
* symmetric int4 and int8 (zero-point-free: XNNPACK needs it): HQQ's zero-point step has
  nothing to act on, so we use torchao's scale-only variant
  ``_choose_qparams_and_quantize_scale_only_hqq`` (alternating codes ↔ least-squares scale
  from max|w|/8), then the same grid projection.

A group is then kept at whichever of the HQQ and max-abs RTN parameters reconstructs it with
the smaller squared error (the projection onto integer zero points / grid scales can undo
HQQ's gain on a few groups), so HQQ never reconstructs a group worse than RTN.

GPTQ (Frantar et al. 2022) is hand-written here rather than torchao's
(``torchao.prototype.gptq``): that one asserts a CUDA device, quantizes into torchao's own
Int4Tensor (asymmetric, float zero points from mslk) / Int8Tensor, and its qparams are not on
our bf16∩fp16 scale grid, so it cannot produce our symmetric [-8, 7] codes with grid-exact
scales. The algorithm is the paper's, in ~40 lines: Hessian H = XᵀX of the layer's calibration
inputs (plus 1 % mean-diagonal damping), upper Cholesky factor of H⁻¹, columns quantized left to
right in blocks of 128 with each column's error fed back into the not-yet-quantized columns.
A group's scale (and zero point) is chosen when its first column is reached, from the
error-updated weights, by the same scale search as ``scale-search`` weighted by diag(H) of the
group's columns. int8 (one scale per row) chooses the row's scale up front.

Calibration streams layer by layer (``gptq_quantize``): it holds one layer's fp32 weights and
the calibration hidden states [tokens, dim]; each layer's linears are quantized in execution
order (q/k/v share one Hessian, then o, gate/up, down), each from the inputs produced by the
already quantized ones, and the quantized layer's output is the next layer's input. The
embedding and head are quantized data-free (scale search): the embedding is a lookup, and a
tied head is that same tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torchao.quantization.quant_primitives import (
    _choose_qparams_and_quantize_affine_hqq,
    _choose_qparams_and_quantize_scale_only_hqq,
    quantize_affine,
)

from edgellm import calibration
from edgellm import quantization as Q  # a cycle, resolved at call time: quantization dispatches here
from edgellm.rope import rope_tables

GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01


def _grid_codes(wc, s, z, qmin, qmax, group_size):
    block = (1, group_size)
    zz = torch.zeros_like(s, dtype=torch.int8) if z is None else z.to(torch.int8)
    return quantize_affine(wc, block, s, zz, torch.int8, qmin, qmax)


def _group_err(wc, codes, s, z, group_size):
    rows, cols = wc.shape
    q = codes.to(torch.float32).view(rows, -1, group_size)
    if z is not None:
        q = q - z.to(torch.float32)[..., None]
    d = q * s[..., None] - wc.view(rows, -1, group_size)
    return d.square().sum(-1)


@torch.no_grad()
def hqq_weight(w: torch.Tensor, group_size: int, symmetric: bool = True, name: str = "weight",
               bits: int = 4) -> Q.QuantizedWeight:
    """HQQ codes and grid-exact scales for one 2-D weight (see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"cannot quantize {name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    group_size, symmetric, (qmin, qmax) = Q.code_format(bits, group_size, symmetric, cols)
    Q._check_divisible(name, cols, group_size)
    n_groups = cols // group_size
    scales = torch.empty(rows, n_groups)
    zp = None if symmetric else torch.empty(rows, n_groups, dtype=torch.int8)
    codes = torch.empty(rows, cols, dtype=torch.int8)
    chunk_rows = max(1, Q._CHUNK_ELEMS // cols)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        wc = w[r0:r1].detach().to(torch.float32).contiguous()
        if not torch.isfinite(wc).all():
            raise ValueError(f"cannot quantize {name}: it contains non-finite values")
        G = wc.view(-1, group_size)
        if symmetric:
            _, s = _choose_qparams_and_quantize_scale_only_hqq(wc, [1, group_size], qmin, qmax)
            s, z = Q._scale_grid(s.float()), None
            s_rtn, z_rtn = Q._rtn_sym(G, qmin, qmax).view(r1 - r0, n_groups), None
        else:
            _, s_inv, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                wc, nbits=4, group_size=group_size, optimize=True, axis=1, compute_dtype=torch.float32,
                device="cpu", raw_output=True)
            s = Q._scale_grid(s_inv.float().view(r1 - r0, n_groups))
            z = zero.float().view(r1 - r0, n_groups).round().clamp(qmin, qmax)
            s_rtn, z_rtn = Q._rtn_asym(G)
            s_rtn, z_rtn = s_rtn.view(r1 - r0, n_groups), z_rtn.view(r1 - r0, n_groups)
        c = _grid_codes(wc, s, z, qmin, qmax, group_size)
        c_rtn = _grid_codes(wc, s_rtn, z_rtn, qmin, qmax, group_size)
        worse = _group_err(wc, c, s, z, group_size) > _group_err(wc, c_rtn, s_rtn, z_rtn, group_size)
        s = torch.where(worse, s_rtn, s)
        if z is not None:
            z = torch.where(worse, z_rtn, z)
            zp[r0:r1] = z.to(torch.int8)
        codes[r0:r1] = _grid_codes(wc, s, z, qmin, qmax, group_size)
        scales[r0:r1] = s
    return Q.QuantizedWeight(codes.contiguous(), scales.contiguous(), zp, group_size, bits)


# ----------------------------------------------------------------------------------------------
# GPTQ


F64_MAX_COLS = 4096  # wider inputs (a 7B's down_proj, 11008) factorise in fp32: 4 float64 copies
# of an 11008² Hessian would be 3.9 GB, beyond the scale work's memory goals


def _hinv(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (float64 up to F64_MAX_COLS inputs,
    else fp32 as in the GPTQ reference), one temporary at a time."""
    H = H.to(torch.float64 if H.shape[0] <= F64_MAX_COLS else torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    idx = torch.arange(H.shape[0])
    H[idx, idx] += GPTQ_DAMP * torch.diag(H).mean()
    L = torch.linalg.cholesky(H)
    del H
    Hi = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hi, upper=True).to(torch.float32)


@torch.no_grad()
def gptq_weight(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool = True, bits: int = 4,
                search: bool = True, name: str = "weight", Hinv: torch.Tensor | None = None) -> Q.QuantizedWeight:
    """GPTQ of one 2-D weight [rows, cols] given the Hessian H [cols, cols] of its inputs."""
    rows, cols = w.shape
    group_size, symmetric, (qmin, qmax) = Q.code_format(bits, group_size, symmetric, cols)
    Q._check_divisible(name, cols, group_size)
    W = w.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    Hi = _hinv(H) if Hinv is None else Hinv
    hdiag = torch.diag(H).to(torch.float32).clamp_min(1e-12)
    n_groups = cols // group_size
    scales = torch.empty(rows, n_groups)
    zps = None if symmetric else torch.empty(rows, n_groups)
    codes = torch.empty(rows, cols, dtype=torch.int8)

    def choose(g: int):
        c0 = g * group_size
        G = W[:, c0:c0 + group_size]
        imp = hdiag[c0:c0 + group_size]
        Wimp = (imp / imp.mean()).expand_as(G) if search else None
        if symmetric:
            s, z = (Q._search_sym(G, Wimp, qmin, qmax) if search else (Q._rtn_sym(G, qmin, qmax), None))
        else:
            s, z = Q._search_asym(G, Wimp) if search else Q._rtn_asym(G)
        scales[:, g] = s[:, 0]
        if z is not None:
            zps[:, g] = z[:, 0]

    block = max(group_size, GPTQ_BLOCK // group_size * group_size) if bits == 4 else GPTQ_BLOCK
    if bits == 8:
        choose(0)
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        H1 = Hi[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if bits == 4 and col % group_size == 0:
                W[:, b0:b1] = W1  # the group's scale is chosen from the error-updated weights
                choose(col // group_size)
            g = col // group_size
            s = scales[:, g]
            x = W1[:, i]
            if symmetric:
                q = torch.clamp(torch.round(x / s), qmin, qmax)
                dq = q * s
            else:
                z = zps[:, g]
                q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
                dq = (q - z) * s
            codes[:, col] = q.to(torch.int8)
            e = (x - dq) / H1[i, i]
            W1[:, i:] -= e[:, None] * H1[i, i:][None, :]
            Err[:, i] = e
        W[:, b0:b1] = W1
        W[:, b1:] -= Err @ Hi[b0:b1, b1:]
    zp = None if symmetric else zps.to(torch.int8)
    return Q.QuantizedWeight(codes, scales, zp, group_size, bits)


# ----------------------------------------------------------------------------------------------
# Layer-by-layer calibration


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, cos, sin):  # x [B, T, H, D]; HF rotate-half on the first 2 * cos.shape[-1] dims
    half = cos.shape[-1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return (x2.T @ x2) * (2.0 / x2.shape[0])


def _dequant_rows(qw: Q.QuantizedWeight, idx: torch.Tensor) -> torch.Tensor:
    codes = qw.codes[idx].to(torch.float32)
    s = qw.scales[idx].repeat_interleave(qw.group_size, dim=1)
    if qw.zero_points is not None:
        codes = codes - qw.zero_points[idx].to(torch.float32).repeat_interleave(qw.group_size, dim=1)
    return codes * s


@torch.no_grad()
def gptq_quantize(state: Mapping[str, torch.Tensor], qcfg, cfg, tokens: torch.Tensor, tied: bool,
                  progress: Callable[[int, int], None] | None = None, window: int = 2048,
                  timings: list | None = None) -> dict[str, Q.QuantizedWeight]:
    """All quantized weights of a decoder by GPTQ, streaming layer by layer (module docstring).
    ``cfg``: the ModelConfig; ``tokens`` int64 [n] of calibration text, cut into windows of
    ``window`` tokens (the last one dropped if short, unless it is the only one)."""
    names = Q.quantized_names(state, qcfg, tied)
    total, done = len(names), 0
    weights: dict[str, Q.QuantizedWeight] = {}
    search = True

    def bits_of(n):
        return Q.BITS[Q.precision_of(n, qcfg, tied)]

    def tick(k=1):
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    # Embedding and head: data-free (scale search).
    for n in ("embed_tokens.weight", "lm_head.weight"):
        if n in names:
            if tied and n == "lm_head.weight":
                weights[n] = weights["embed_tokens.weight"]
            else:
                weights[n] = Q.quantize_weight(state[n], qcfg.group_size, qcfg.symmetric, True,
                                               importance=Q._importance(state, n), name=n, bits=bits_of(n))
            tick()

    n_tok = tokens.numel()
    W_ = min(window, n_tok)
    n_win = max(1, n_tok // W_)
    tok = tokens[:n_win * W_].view(n_win, W_)
    if "embed_tokens.weight" in weights:
        x = _dequant_rows(weights["embed_tokens.weight"], tok.reshape(-1)).view(n_win, W_, -1)
    else:
        x = state["embed_tokens.weight"][tok].to(torch.float32)
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, W_)
    H_, Hkv, D, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps

    def get(n):
        return state[n].to(torch.float32) if n in state else None

    def quant_group(prefix, parts, X):
        """Quantize the Linears ``parts`` (sharing input X) by GPTQ; returns their dequantized weights."""
        Hm, Hi = None, None
        out = {}
        for p in parts:
            n = f"{prefix}.{p}.weight"
            w = get(n)
            if n not in names:
                out[p] = w
                continue
            if Hm is None:
                Hm = _gram(X)
                Hi = _hinv(Hm)
            qw = gptq_weight(w, Hm, qcfg.group_size, qcfg.symmetric, bits_of(n), search, name=n, Hinv=Hi)
            weights[n] = qw
            out[p] = qw.dequantize()
            tick()
        return out

    def lin(X, w, b):
        return F.linear(X, w, b)

    for i in range(cfg.n_layers):
        t0 = time.time()
        L = f"layers.{i}"
        h = _rms(x, get(f"{L}.input_layernorm.weight"), eps)
        a = f"{L}.self_attn"
        wq = quant_group(a, ["q_proj", "k_proj", "v_proj"], h)
        B, T, _ = h.shape
        q = lin(h, wq["q_proj"], get(f"{a}.q_proj.bias")).view(B, T, H_, D)
        k = lin(h, wq["k_proj"], get(f"{a}.k_proj.bias")).view(B, T, Hkv, D)
        v = lin(h, wq["v_proj"], get(f"{a}.v_proj.bias")).view(B, T, Hkv, D)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if H_ != Hkv:
            k, v = k.repeat_interleave(H_ // Hkv, dim=1), v.repeat_interleave(H_ // Hkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H_ * D)
        del q, k, v, h
        wo = quant_group(a, ["o_proj"], att)
        x = x + lin(att, wo["o_proj"], get(f"{a}.o_proj.bias"))
        del att
        h = _rms(x, get(f"{L}.post_attention_layernorm.weight"), eps)
        m = f"{L}.mlp"
        wg = quant_group(m, ["gate_proj", "up_proj"], h)
        act = F.silu(lin(h, wg["gate_proj"], get(f"{m}.gate_proj.bias"))) * lin(h, wg["up_proj"], get(f"{m}.up_proj.bias"))
        del h
        wd = quant_group(m, ["down_proj"], act)
        x = x + lin(act, wd["down_proj"], get(f"{m}.down_proj.bias"))
        del act, wq, wo, wg, wd
        if timings is not None:
            timings.append(time.time() - t0)
    return weights


def calibration_summary(tokens: torch.Tensor, window: int = 2048) -> dict:
    n = tokens.numel()
    W_ = min(window, n)
    used = max(1, n // W_) * W_
    return {**calibration.source(), "tokens": used, "window": W_}


def estimate_hessian_bytes(cols: int) -> int:
    """fp32 H plus its float64 factorisation temporaries (~3 copies) for one Linear's inputs."""
    return cols * cols * (4 + 3 * 8)

