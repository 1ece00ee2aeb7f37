"""The one quantization every export target carries: codes, scales (and zero points).

Each tensor has a precision (``QuantConfig``: ``linears``, ``embedding``, ``head``,
``overrides``): int4, int8 or float (left unquantized). int4 weights are quantized group-wise
along the input features (``block_size = (1, group_size)``, torchao's convention), to 4-bit
codes with one scale per group:

* symmetric (default; what XNNPACK 8da4w needs): codes in [-8, 7], zero point 0,
  ``w ≈ codes * scale``;
* asymmetric (``symmetric: false``; for targets with a per-group offset such as ONNX
  MatMulNBits and Core ML): codes in [0, 15], an integer zero point in [0, 15] per group,
  ``w ≈ (codes - zero_point) * scale``.

int8 weights are symmetric with one scale per row (``group_size`` = the row's length, codes in
[-128, 127]): XNNPACK's 8-bit linear kernels (qc8w) are per output channel, and a per-row scale
of a tied embedding is the same tensor as a per-channel scale of its head.

Every scale lies on the grid shared by bf16 and fp16 (8 significant bits, fp16's normal range;
stored as fp32): XNNPACK stores blockwise scales as bf16 and Core ML as fp16, so with this grid
every target carries bit-identical scales (an fp16-only scale would be rounded a second time by
ExecuTorch's lowering, ~0.2 % per group, which alone cost 9 points of top-1 agreement), and
``QuantizedWeight.dequantize`` equals torchao's ``dequantize_affine`` bit for bit — the
reference weights every target is compared against.

Scale choice (``method``: ``scale-search``, the default; ``rtn`` is the plain max-abs scale;
``hqq`` and the calibrated ``gptq`` are in ``edgellm.quant_methods``): per group, a grid of candidate scales
``max|w| / a`` for a few a (and for asymmetric, candidate ranges shrunk from both ends) is scored by the
(optionally importance-weighted) squared reconstruction error; the best one is then refined by
alternating least squares (codes fixed → optimal scale → codes), keeping a refinement only if
it lowers the error. The plain max-abs round-to-nearest scale (torchao's ``choose_qparams_affine``)
is always one of the candidates, so the search never reconstructs a group worse than RTN.
Importance: for a Linear that directly follows an RMSNorm (q/k/v, gate/up, lm_head) the
squared norm gain of each input channel weights the error (a data-free proxy of how large
that input is); other weights use uniform weights.

Tied embeddings: ``embed_tokens.weight`` and ``lm_head.weight`` are one tensor with one
precision; when quantized both names map to the same ``QuantizedWeight`` (both group along the
model dim). A tied model with ``embedding: float`` quantizes neither (a float embedding implies
a float head, because they are the same tensor).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    quantize_affine,
)

from edgellm import quant_methods  # hqq, gptq; it imports this module back, used at call time only
from edgellm.recipes import QuantConfig

SYM_QMIN, SYM_QMAX = -8, 7
ASYM_QMIN, ASYM_QMAX = 0, 15
INT8_QMIN, INT8_QMAX = -128, 127
BITS = {"int4": 4, "int8": 8}
SCALE_MAX = 65280.0  # largest value exact in both bf16 and fp16
SCALE_TINY = 2.0 ** -14  # smallest normal fp16: scales never go below it (nor to 0)

LINEAR_RE = re.compile(r"^layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
_CHUNK_ELEMS = 1 << 21  # groups are processed in chunks of ~2M weights (cache friendly, bounded memory)


def _scale_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest value exact in both bf16 and fp16 (bf16 rounding inside fp16's normal
    range), returned as fp32."""
    return x.clamp(SCALE_TINY, SCALE_MAX).to(torch.bfloat16).to(torch.float32)


class QuantizedWeight:
    """One quantized tensor. int4 is held at 4 bits per code (two codes a byte), so a streamed
    7B quantization stays ~0.55 bytes per parameter; ``codes`` unpacks on access.

    bits: 4 or 8
    codes: int8 [rows, cols]; int4 symmetric [-8, 7], asymmetric [0, 15]; int8 [-128, 127]
    scales: float32 [rows, cols // group_size], exact in bf16 and fp16 (int8: group_size = cols)
    zero_points: int8 [rows, cols // group_size] (asymmetric int4) or None
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, group_size: int,
                 bits: int = 4):
        if bits not in (4, 8):
            raise ValueError(f"quantized weights have 4 or 8 bits, got {bits}")
        if bits == 8 and zero_points is not None:
            raise ValueError("int8 weights are symmetric: they have no zero points")
        if codes.dim() != 2 or (bits == 4 and codes.shape[1] % 2):
            raise ValueError(f"int{bits} codes must be 2-D with an even number of columns, got {tuple(codes.shape)}")
        self.scales, self.zero_points, self.group_size, self.bits = scales, zero_points, group_size, bits
        self._shape = codes.shape
        if bits == 8:
            self.packed = codes.to(torch.int8).contiguous()  # one code a byte: nothing to pack
            return
        u = (codes.to(torch.int16) + (8 if zero_points is None else 0)).to(torch.uint8)
        self.packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()  # element 2j in the low nibble

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    group_size: int, bits: int, shape: tuple[int, int]) -> "QuantizedWeight":
        """A weight from its stored form (``packed`` as this class holds it), e.g. read back from disk."""
        rows, cols = shape
        want = (rows, cols // 2) if bits == 4 else (rows, cols)
        if tuple(packed.shape) != want or scales.shape[0] != rows:
            raise ValueError(f"stored int{bits} weight of shape {tuple(shape)} has packed {tuple(packed.shape)}, "
                             f"scales {tuple(scales.shape)}")
        qw = cls.__new__(cls)
        qw.packed, qw.scales, qw.zero_points = packed.contiguous(), scales, zero_points
        qw.group_size, qw.bits, qw._shape = group_size, bits, torch.Size(shape)
        return qw

    @property
    def codes(self) -> torch.Tensor:
        """int8 [rows, cols] (int8 weights: the stored tensor itself; treat it as read-only)."""
        if self.packed is None:
            raise RuntimeError("this quantized weight was released by its last consumer (QuantizedWeight.release)")
        if self.bits == 8:
            return self.packed
        # Unpacked straight into int8 (nibbles 0..15 fit): 1.5 bytes per code at the peak rather
        # than the 5 of an int16 detour, which matters for a 7B's 210M-code embedding and head.
        out = torch.empty(self._shape, dtype=torch.int8)
        out[:, 0::2] = (self.packed & 0xF).view(torch.int8)
        out[:, 1::2] = (self.packed >> 4).view(torch.int8)
        if self.zero_points is None:
            out -= 8
        return out

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def block_size(self) -> tuple[int, int]:
        return (1, self.group_size)

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.bits == 8:
            return (INT8_QMIN, INT8_QMAX)
        return (SYM_QMIN, SYM_QMAX) if self.symmetric else (ASYM_QMIN, ASYM_QMAX)

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], bit for bit torchao ``dequantize_affine(codes, (1, g), scales,
        zero_points)`` (the tests hold it to that), computed from the packed nibbles in row chunks:
        2-3× faster, which a streamed 7B reference pays on every weight of every step."""
        if self.packed is None:
            raise RuntimeError("this quantized weight was released by its last consumer (QuantizedWeight.release)")
        rows, cols = self._shape
        g = self.group_size
        out = torch.empty(rows, cols, dtype=torch.float32)
        groups = out.view(rows, cols // g, g)
        step = max(1, _CHUNK_ELEMS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            packed, dst = self.packed[r0:r1], out[r0:r1]
            if self.bits == 8:
                dst.copy_(packed)
            else:
                dst[:, 0::2] = packed & 0xF
                dst[:, 1::2] = packed >> 4
                zero = 8.0 if self.zero_points is None else self.zero_points[r0:r1].to(torch.float32).unsqueeze(-1)
                groups[r0:r1] -= zero
            groups[r0:r1] *= self.scales[r0:r1].unsqueeze(-1)
        return out

    def release(self) -> None:
        """Drop codes and scales: an export's last target frees each weight once it holds its own
        form of it (a 7B's packed codes are 3.4 GB; see ``ExportJob.last_use``)."""
        self.packed = self.scales = self.zero_points = None

    def nbytes(self) -> int:
        """Stored size: 4 (int4) or 8 bits per code, 2 bytes (fp16) per scale, 4 bits per zero point."""
        n = self.packed.numel() + self.scales.numel() * 2
        if self.zero_points is not None:
            n += (self.zero_points.numel() + 1) // 2
        return n


@dataclass
class Quantization:
    config: QuantConfig
    weights: dict[str, QuantizedWeight]
    calibration: dict | None = None  # calibrated methods: source asset, sha256, token count
    _summary: dict | None = field(default=None, init=False, repr=False, compare=False)

    def unique(self) -> list[tuple[str, QuantizedWeight]]:
        """(name, weight) pairs, each tensor once (a tied embedding/head counted once), sorted by name."""
        seen, out = set(), []
        for name in sorted(self.weights):
            qw = self.weights[name]
            if id(qw) not in seen:
                seen.add(id(qw))
                out.append((name, qw))
        return out

    def summary(self) -> dict:
        """JSON-able description for the artifact manifest (the sha256 identifies the quantization).
        Computed once: a target that releases the weights as it consumes them asks first."""
        if self._summary is None:
            self._summary = self._describe()
        return dict(self._summary)

    def _describe(self) -> dict:
        h = hashlib.sha256()
        n_bytes = 0
        precisions: dict[str, int] = {}
        for name, qw in self.unique():
            h.update(name.encode())
            if qw.bits != 4:  # int4-only quantizations keep the digests they always had
                h.update(f"bits={qw.bits}".encode())
            precisions[qw.precision] = precisions.get(qw.precision, 0) + 1
            for t in (qw.codes, qw.scales, qw.zero_points):
                if t is not None:
                    h.update(str(tuple(t.shape)).encode())
                    h.update(t.contiguous().numpy().tobytes())
            n_bytes += qw.nbytes()
        c = self.config
        return {
            "scheme": c.scheme, "group_size": c.group_size, "symmetric": c.symmetric,
            "linears": c.linears, "embedding": c.embedding, "head": c.head_precision,
            "overrides": dict(c.overrides), "precisions": precisions,
            "method": c.method, "calibration": self.calibration,
            "quant_range": [SYM_QMIN, SYM_QMAX] if c.symmetric else [ASYM_QMIN, ASYM_QMAX],
            "scale_grid": "exact-in-bf16-and-fp16",  # every scale exact in both (see module docstring)
            "n_tensors": len(self.unique()),
            "names": sorted(self.weights),
            "bytes": n_bytes,
            "sha256": h.hexdigest(),
        }


# ----------------------------------------------------------------------------------------------
# Per-group scale search (vectorized over groups; G is [N, g], weights W broadcastable to G)


def _err(G, q, s, z, W):
    d = (q - z).mul_(s) if z is not None else q * s
    d.sub_(G).square_()
    return (d.mul_(W) if W is not None else d).sum(1, keepdim=True)


def _q_sym(G, s, qmin=SYM_QMIN, qmax=SYM_QMAX):
    return torch.mul(G, 1.0 / s).round_().clamp_(qmin, qmax)


def _q_asym(G, s, z):
    return torch.clamp(torch.round(G * (1.0 / s)) + z, ASYM_QMIN, ASYM_QMAX)


def _rtn_sym(G, qmin=SYM_QMIN, qmax=SYM_QMAX):
    amax = G.abs().amax(1, keepdim=True)
    return _scale_grid(amax / ((qmax - qmin) / 2))  # torchao SYMMETRIC: max|w| / 7.5 (int8: / 127.5)


def _rtn_asym(G):
    lo = G.amin(1, keepdim=True).clamp(max=0)
    hi = G.amax(1, keepdim=True).clamp(min=0)
    s = _scale_grid((hi - lo) / (ASYM_QMAX - ASYM_QMIN))
    z = torch.clamp(ASYM_QMIN - torch.round(lo / s), ASYM_QMIN, ASYM_QMAX)
    return s, z


SYM_DIVISORS = [6.0, 6.5, 7.0, 8.0]  # candidate scales max|w| / a for int4 (7.5 = max-abs RTN is always
# tried); int8 scales them by 127.5 / 7.5
ASYM_SHRINK = [0.75, 0.85, 0.93]  # candidate ranges (hi - lo) * f
REFINE_ITERS = 3


def _search_sym(G, W, qmin=SYM_QMIN, qmax=SYM_QMAX):
    s_best = _rtn_sym(G, qmin, qmax)
    e_best = _err(G, _q_sym(G, s_best, qmin, qmax), s_best, None, W)
    amax = G.abs().amax(1, keepdim=True)
    widen = (qmax - qmin) / (SYM_QMAX - SYM_QMIN)
    for a in SYM_DIVISORS:
        s = _scale_grid(amax / (a * widen))
        e = _err(G, _q_sym(G, s, qmin, qmax), s, None, W)
        better = e < e_best
        s_best, e_best = torch.where(better, s, s_best), torch.where(better, e, e_best)
    for _ in range(REFINE_ITERS):  # alternating least squares: codes fixed -> optimal scale
        q = _q_sym(G, s_best, qmin, qmax)
        qw = q * W if W is not None else q
        num, den = (qw * G).sum(1, keepdim=True), (qw * q).sum(1, keepdim=True)
        s = _scale_grid(torch.where(den > 0, num / den.clamp_min(1e-30), s_best))
        e = _err(G, _q_sym(G, s, qmin, qmax), s, None, W)
        better = e < e_best
        s_best, e_best = torch.where(better, s, s_best), torch.where(better, e, e_best)
    return s_best, None


def _search_asym(G, W):
    s_best, z_best = _rtn_asym(G)
    e_best = _err(G, _q_asym(G, s_best, z_best), s_best, z_best, W)
    lo, hi = G.amin(1, keepdim=True), G.amax(1, keepdim=True)
    mid = (lo + hi) / 2
    for f in ASYM_SHRINK:
        s = _scale_grid((hi - lo) * f / (ASYM_QMAX - ASYM_QMIN))
        for shift in (0.0,):  # range centred on the group
            lo_c = mid - s * (ASYM_QMAX - ASYM_QMIN) / 2 + shift * s
            z = torch.clamp(ASYM_QMIN - torch.round(lo_c / s), ASYM_QMIN, ASYM_QMAX)
            e = _err(G, _q_asym(G, s, z), s, z, W)
            better = e < e_best
            s_best = torch.where(better, s, s_best)
            z_best = torch.where(better, z, z_best)
            e_best = torch.where(better, e, e_best)
    for _ in range(REFINE_ITERS):  # codes fixed -> least-squares scale for the integer zero point
        q = _q_asym(G, s_best, z_best) - z_best
        qw = q * W if W is not None else q
        num, den = (qw * G).sum(1, keepdim=True), (qw * q).sum(1, keepdim=True)
        s = _scale_grid(torch.where(den > 0, num / den.clamp_min(1e-30), s_best))
        for dz in (0.0, -1.0, 1.0):
            z = torch.clamp(z_best + dz, ASYM_QMIN, ASYM_QMAX)
            e = _err(G, _q_asym(G, s, z), s, z, W)
            better = e < e_best
            s_best = torch.where(better, s, s_best)
            z_best = torch.where(better, z, z_best)
            e_best = torch.where(better, e, e_best)
    return s_best, z_best


def code_format(bits: int, group_size: int, symmetric: bool, cols: int) -> tuple[int, bool, tuple[int, int]]:
    """(group size, symmetric, code range) of a ``bits``-bit weight with ``cols`` inputs: int8 is
    always symmetric with one group per row; int4 keeps the recipe's group and symmetry."""
    if bits == 8:
        return cols, True, (INT8_QMIN, INT8_QMAX)
    return group_size, symmetric, ((SYM_QMIN, SYM_QMAX) if symmetric else (ASYM_QMIN, ASYM_QMAX))


def _check_divisible(name: str, cols: int, group_size: int):
    if cols % group_size:
        divisors = [d for d in range(2, cols + 1, 2) if cols % d == 0]
        near = min(divisors, key=lambda d: (abs(d - group_size), -d)) if divisors else None
        hint = f"; use a group size that divides {cols}, e.g. {near}" if near else ""
        raise ValueError(f"cannot quantize {name}: its in-features ({cols}) are not divisible by the "
                         f"quantization group size {group_size}{hint} "
                         f"(quantization.group_size in a recipe YAML given with --recipe)")


@torch.no_grad()
def quantize_weight(w: torch.Tensor, group_size: int, symmetric: bool = True, scale_search: bool = True,
                    importance: torch.Tensor | None = None, name: str = "weight", bits: int = 4) -> QuantizedWeight:
    """Quantize a 2-D weight [rows, cols] group-wise along cols to int4, or (``bits=8``) per
    row to symmetric int8 (``group_size`` and ``symmetric`` are then ignored).

    ``importance`` (optional, [cols], non-negative) weights the per-column squared error in the
    scale search. Raises ValueError if ``cols`` is not divisible by ``group_size``.
    """
    if w.dim() != 2:
        raise ValueError(f"cannot quantize {name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    group_size, symmetric, (qmin, qmax) = code_format(bits, group_size, symmetric, cols)
    _check_divisible(name, cols, group_size)
    n_groups = cols // group_size
    Wimp = None
    if importance is not None and scale_search:
        imp = importance.detach().to(torch.float32).reshape(n_groups, group_size)
        Wimp = imp / imp.mean().clamp_min(1e-30)
    # Row chunks, each taken to fp32 on its own: a weight stays in its stored dtype and only one
    # chunk's fp32 temporaries exist at a time (groups never span rows, so the result is the same).
    scales = torch.empty(rows, n_groups)
    zp = None if symmetric else torch.empty(rows, n_groups, dtype=torch.int8)
    codes = torch.empty(rows, cols, dtype=torch.int8)
    block = (1, group_size)
    chunk_rows = max(1, _CHUNK_ELEMS // cols)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        wc = w[r0:r1].detach().to(torch.float32).contiguous()
        if not torch.isfinite(wc).all():
            raise ValueError(f"cannot quantize {name}: it contains non-finite values")
        G = wc.view((r1 - r0) * n_groups, group_size)
        W = Wimp.repeat(r1 - r0, 1) if Wimp is not None else None
        if symmetric:
            s, _ = _search_sym(G, W, qmin, qmax) if scale_search else (_rtn_sym(G, qmin, qmax), None)
            s = s.view(r1 - r0, n_groups)
            codes[r0:r1] = quantize_affine(wc, block, s, torch.zeros_like(s, dtype=torch.int8), torch.int8,
                                           qmin, qmax)
        else:
            s, z = _search_asym(G, W) if scale_search else _rtn_asym(G)
            s, z = s.view(r1 - r0, n_groups), z.view(r1 - r0, n_groups).to(torch.int8)
            codes[r0:r1] = quantize_affine(wc, block, s, z, torch.int8, ASYM_QMIN, ASYM_QMAX)
            zp[r0:r1] = z
        scales[r0:r1] = s
    return QuantizedWeight(codes.contiguous(), scales.contiguous(), zp, group_size, bits)


def rtn_torchao(w: torch.Tensor, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Plain max-abs round-to-nearest via torchao's own ``choose_qparams_affine`` (a baseline)."""
    block = (1, group_size)
    if symmetric:
        s, _ = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, SYM_QMIN, SYM_QMAX)
        s = _scale_grid(s)
        codes = quantize_affine(w, block, s, torch.zeros_like(s, dtype=torch.int8), torch.int8, SYM_QMIN, SYM_QMAX)
        return QuantizedWeight(codes, s, None, group_size)
    s, z = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.int8, ASYM_QMIN, ASYM_QMAX,
                                 zero_point_dtype=torch.int8)
    s = _scale_grid(s)
    return QuantizedWeight(quantize_affine(w, block, s, z, torch.int8, ASYM_QMIN, ASYM_QMAX), s, z, group_size)


# ----------------------------------------------------------------------------------------------


def _importance(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """Squared gain of the RMSNorm feeding this Linear (None when it is not fed by a norm)."""
    m = re.match(r"^layers\.(\d+)\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$", name)
    norm = None
    if m:
        norm = f"layers.{m.group(1)}." + ("input_layernorm.weight" if m.group(3) else "post_attention_layernorm.weight")
    elif name in ("lm_head.weight", "embed_tokens.weight"):
        norm = "norm.weight"
    g = state.get(norm) if norm else None
    return None if g is None else g.detach().float() ** 2 + 1e-6



def precision_of(name: str, qcfg: QuantConfig, tied: bool = False) -> str:
    """int4 | int8 | float for one state-dict tensor: its kind's setting, then ``overrides``
    (later patterns win). A tied head is its embedding's tensor and precision."""
    if tied and name == "lm_head.weight":
        name = "embed_tokens.weight"
    if name == "embed_tokens.weight":
        p = qcfg.embedding
    elif name == "lm_head.weight":
        p = qcfg.head_precision
    elif LINEAR_RE.match(name):
        p = qcfg.linears
    else:
        return "float"  # norms and anything else stay in float
    for pattern, override in qcfg.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            p = override
    return p


def check_tied(qcfg: QuantConfig) -> None:
    """A tied embedding/head is one tensor, so it has one precision."""
    head = qcfg.head_precision
    for pattern, override in qcfg.overrides.items():
        if fnmatch.fnmatchcase("lm_head.weight", pattern) and not fnmatch.fnmatchcase("embed_tokens.weight", pattern):
            head = override
    embed = precision_of("embed_tokens.weight", qcfg)
    if head != embed:
        raise ValueError(f"this model ties its embedding and head (one tensor), but the recipe gives the embedding "
                         f"{embed} and the head {head}; set quantization.head to {embed} (or leave it out)")


def quantized_names(state: Mapping[str, torch.Tensor], qcfg: QuantConfig, tied: bool) -> list[str]:
    names = sorted(n for n in state if LINEAR_RE.match(n))
    if tied:
        names += ["embed_tokens.weight", "lm_head.weight"]
    else:
        names += [n for n in ("lm_head.weight", "embed_tokens.weight") if n in state]
    return [n for n in names if precision_of(n, qcfg, tied) != "float"]


@torch.no_grad()
def quantize(state: Mapping[str, torch.Tensor], qcfg: QuantConfig, tied: bool,
             progress: Callable[[int, int], None] | None = None, model_config=None,
             calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> Quantization:
    """The shared quantization of a decoder state dict (see the module docstring), one tensor
    at a time, each at its precision (``precision_of``); ``progress(done, total)`` (tensors)
    after each. ``qcfg.method`` chooses the codes and scales (edgellm.quant_methods for hqq and
    gptq); gptq also needs ``model_config`` (the ModelConfig) and ``calibration``: int64 token
    ids of the calibration text (``edgellm.calibration.calibration_tokens``), or a callable
    returning them (called only when needed)."""
    if qcfg.scheme != "int4":
        raise ValueError(f"quantize() needs scheme int4, got {qcfg.scheme!r}")
    if tied:
        check_tied(qcfg)
    names = quantized_names(state, qcfg, tied)
    for n in names:  # fail before doing any work
        src = "embed_tokens.weight" if (tied and n == "lm_head.weight") else n
        shape = state.shapes[src] if hasattr(state, "shapes") else tuple(state[src].shape)
        if precision_of(n, qcfg, tied) == "int4":
            _check_divisible(n, shape[1], qcfg.group_size)
    if qcfg.method == "gptq":
        if model_config is None or calibration is None:
            raise ValueError("quantization.method gptq is calibrated: quantize() needs model_config and "
                             "calibration tokens (edgellm.calibration.calibration_tokens)")
        tokens = calibration() if callable(calibration) else calibration
        weights = quant_methods.gptq_quantize(state, qcfg, model_config, tokens, tied, progress)
        return Quantization(qcfg, {n: weights[n] for n in names}, quant_methods.calibration_summary(tokens))
    weights: dict[str, QuantizedWeight] = {}
    for i, n in enumerate(names):
        bits = BITS[precision_of(n, qcfg, tied)]
        if tied and n == "lm_head.weight":
            weights[n] = weights["embed_tokens.weight"]
        elif qcfg.method == "hqq":
            weights[n] = quant_methods.hqq_weight(state[n], qcfg.group_size, qcfg.symmetric, name=n, bits=bits)
        else:  # scale-search | rtn
            weights[n] = quantize_weight(state[n], qcfg.group_size, qcfg.symmetric, qcfg.method == "scale-search",
                                         importance=_importance(state, n), name=n, bits=bits)
        if progress is not None:
            progress(i + 1, len(names))
    return Quantization(qcfg, weights)


# ----------------------------------------------------------------------------------------------
# The reference model


# The int8 dynamic activation arithmetic each runtime applies in front of its int4 linears; the
# reference model can carry it, so that a parity run measures what the artifact adds on top.
ACTIVATION_SCHEMES = {
    "int8-token-asym": "int8 per token, asymmetric (torchao 8da4w = XNNPACK qd8, ExecuTorch)",
    "int8-block-sym": "int8 per block of group_size inputs, symmetric max|x|/127 "
                      "(ONNX Runtime MatMulNBits accuracy_level 4)",
}


def _token_asym(x: torch.Tensor) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    return _apply_int8_act_asym_per_token_quant_dequant(x)


def _block_sym(x: torch.Tensor, block: int) -> torch.Tensor:
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(xb / scale.clamp_min(1e-30)), torch.zeros_like(xb))
    return (q * scale).reshape(x.shape)


def fake_quantize_activation(x: torch.Tensor, scheme: str = "int8-token-asym", block: int = 32) -> torch.Tensor:
    """quantize→dequantize a Linear's input the way ``scheme`` (see ACTIVATION_SCHEMES) does."""
    if scheme == "int8-token-asym":
        return _token_asym(x)
    if scheme == "int8-block-sym":
        return _block_sym(x, block)
    raise ValueError(f"unknown activation scheme {scheme!r}; valid: {', '.join(ACTIVATION_SCHEMES)}")


def _activation_hook(scheme: str, block: int):
    def hook(module, args):
        (x, *rest) = args
        return (fake_quantize_activation(x, scheme, block), *rest)

    return hook


def resolve_activation_scheme(activations: bool | str | None) -> str | None:
    """``True`` (8da4w, the historical spelling) / a scheme name / falsy -> scheme name or None."""
    if not activations:
        return None
    scheme = "int8-token-asym" if activations is True else activations
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(f"unknown activation scheme {scheme!r}; valid: {', '.join(ACTIVATION_SCHEMES)}")
    return scheme


@torch.no_grad()
def apply_reference(model: nn.Module, quant: Quantization, activations: bool | str = False) -> nn.Module:
    """In place: every quantized weight := its dequantization (tying kept); optionally add a
    runtime's int8 dynamic activation fake-quant (``True`` = 8da4w, or a name from
    ACTIVATION_SCHEMES) as forward pre-hooks on the quantized Linears (parameter names
    unchanged). Returns the model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done: dict[int, torch.Tensor] = {}
    for name, qw in quant.weights.items():
        if name not in params:
            raise KeyError(f"quantized weight {name} is not a parameter of the model")
        p = params[name]
        if tuple(p.shape) != tuple(qw.shape):
            raise ValueError(f"{name}: model shape {tuple(p.shape)} != quantized shape {tuple(qw.shape)}")
        if id(qw) not in done:
            done[id(qw)] = qw.dequantize()
        p.data = done[id(qw)].to(p.dtype)  # tied parameters are one object: set once, seen twice
    return _hook_activations(model, quant, activations)


class _DequantizeOnRead(nn.Module):
    """A parametrization: the weight is its int4 tensor dequantized when read, so the reference
    holds ~0.55 bytes per parameter and one weight in fp32 at a time (a 7B model's fp32 reference
    would need 27 GB)."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.qw = qw

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        return self.qw.dequantize()


def stream_reference(model: nn.Module, quant: Quantization, activations: bool | str = False) -> nn.Module:
    """In place: like ``apply_reference``, but every quantized weight is dequantized on each read
    (the same values, so the same logits) instead of stored in fp32. ``model``'s quantized
    weights may be placeholders of any shape (e.g. empty): they are never read."""
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    for name, qw in quant.weights.items():
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None or not hasattr(mod, attr):
            raise KeyError(f"quantized weight {name} is not a parameter of the model")
        if parametrize.is_parametrized(mod, attr):
            continue
        setattr(mod, attr, nn.Parameter(torch.empty(0), requires_grad=False))  # a tied head gets its own
        parametrize.register_parametrization(mod, attr, _DequantizeOnRead(qw), unsafe=True)
    return _hook_activations(model, quant, activations)


def activation_block(qw: QuantizedWeight, qcfg: QuantConfig) -> int:
    """The input block of 'int8-block-sym' activations in front of ``qw``: its int4 group, or
    for an int8 weight (one scale per row) the recipe's ``group_size``: ONNX carries it as
    MatMulNBits bits=8 with ``block_size`` = this (the row's scale replicated per block), and
    accuracy_level 4 quantizes the input per ``block_size`` (measured on ORT 1.31)."""
    return qw.group_size if qw.bits == 4 else qcfg.group_size


def _hook_activations(model: nn.Module, quant: Quantization, activations: bool | str) -> nn.Module:
    scheme = resolve_activation_scheme(activations)
    if scheme:
        modules = dict(model.named_modules())
        for name, qw in quant.weights.items():
            mod = modules[name.rsplit(".", 1)[0] if "." in name else ""]
            if isinstance(mod, nn.Linear) and not getattr(mod, "_edgellm_act_quant", False):
                mod.register_forward_pre_hook(_activation_hook(scheme, activation_block(qw, quant.config)))
                mod._edgellm_act_quant = True
    return model
