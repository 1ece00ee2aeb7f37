"""Rotary position embedding with every scaling the LLaMA family ships, as static tables.

All scalings reduce to one thing: a vector of inverse frequencies plus an attention factor
that multiplies cos/sin. Computing them here once, in float32 exactly as transformers does,
lets every export target carry the same cos/sin tables as constants (no trig at run time).
Dynamic NTK depends on the sequence length; a static cache has a fixed capacity, so it is
frozen at that capacity (recorded in the manifest as ``rope_frozen_at``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edgellm import checks

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")

REQUIRED = object()
OPTIONAL = None
# Keys each scaling type reads (beyond "type"), with defaults.
_PARAMS: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"factor": REQUIRED},
    "ntk": {"alpha": REQUIRED},  # static NTK-aware: base *= alpha ** (d / (d - 2))
    "dynamic": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED},
    "yarn": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale": OPTIONAL, "mscale_all_dim": OPTIONAL,
             "attention_factor": OPTIONAL, "truncate": True},
    "llama3": {"factor": REQUIRED, "low_freq_factor": REQUIRED, "high_freq_factor": REQUIRED,
               "original_max_position_embeddings": REQUIRED},
}


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float | None = None
    alpha: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")
        self.theta = checks.number(self.theta, "rope.theta", 0, lo_open=True)
        self.partial_rotary_factor = checks.number(self.partial_rotary_factor, "rope.partial_rotary_factor", 0, 1,
                                                   lo_open=True)
        for key in ("factor", "alpha", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                    "low_freq_factor", "high_freq_factor"):
            if getattr(self, key) is not None:
                setattr(self, key, checks.number(getattr(self, key), f"rope.{key}"))
        if self.original_max_position_embeddings is not None:
            self.original_max_position_embeddings = checks.integer(
                self.original_max_position_embeddings, "rope.original_max_position_embeddings", 1)
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise ValueError(f"rope.truncate must be true or false, got {self.truncate!r}")
        for key, default in _PARAMS[self.type].items():
            if getattr(self, key) is None:
                if default is REQUIRED:
                    raise ValueError(f"RoPE scaling {self.type!r} needs {key!r}")
                setattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        """Read RoPE from an HF config: ``rope_theta`` + ``rope_scaling`` (``type`` or
        ``rope_type``), or transformers 5's ``rope_parameters``."""
        params = dict(hf.get("rope_parameters") or {})
        theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        scaling = hf.get("rope_scaling") or {}
        if not params or ("rope_type" not in params and "type" not in params):
            params.update(scaling)
        params.pop("rope_theta", None)
        kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if kind == "su" or kind == "longrope":
            raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        if kind in ("ntk", "static_ntk"):
            kind = "ntk"
            if "alpha" not in params and "factor" in params:
                params["alpha"] = params.pop("factor")
        if kind in ("dynamic", "yarn", "llama3") and not params.get("original_max_position_embeddings"):
            params["original_max_position_embeddings"] = hf.get("max_position_embeddings")
        if "partial_rotary_factor" in hf:
            params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        known = set(cls.__dataclass_fields__) - {"theta", "type"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown RoPE parameter(s) {sorted(unknown)} for type {kind!r}; "
                             f"known: {sorted(known)}")
        return cls(theta=float(theta), type=kind, **params)


def inv_freq_and_scale(rope: RopeConfig, head_dim: int, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, [rot_dim/2]) and the cos/sin attention factor."""
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.type == "ntk":
        base = base * rope.alpha ** (dim / (dim - 2))
    if rope.type == "dynamic" and max_seq_len > rope.original_max_position_embeddings:
        # float32, as transformers computes it at run time (its length there is a tensor);
        # python-float arithmetic lands one float32 ulp off in inv_freq
        f, seq = rope.factor, torch.tensor(max_seq_len)
        base = float(base * ((f * seq / rope.original_max_position_embeddings) - (f - 1)) ** (dim / (dim - 2)))
    inv_freq = 1.0 / (base ** exps)
    scale = 1.0
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "yarn":
        inv_freq, scale = _yarn(rope, dim, base)
    elif rope.type == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    return inv_freq, scale


def _yarn(rope: RopeConfig, dim: int, base: float) -> tuple[torch.Tensor, float]:
    factor = rope.factor

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = rope.attention_factor
    if scale is None:
        if rope.mscale and rope.mscale_all_dim:
            scale = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            scale = get_mscale(factor)

    def correction_dim(rot):
        return (dim * math.log(rope.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, float(scale)


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(rope: RopeConfig, head_dim: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, float32 [max_seq_len, rot_dim // 2], attention factor applied."""
    inv_freq, scale = inv_freq_and_scale(rope, head_dim, max_seq_len)
    pos = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos() * scale, freqs.sin() * scale


def frozen_note(rope: RopeConfig, max_seq_len: int) -> dict[str, Any] | None:
    """What the manifest says about a length-dependent scaling frozen at export time."""
    if rope.type == "dynamic":
        return {"rope_frozen_at": max_seq_len,
                "note": "dynamic NTK scaling is frozen at the cache capacity"}
    return None
