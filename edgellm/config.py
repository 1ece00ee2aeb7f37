"""The resolved architecture of a LLaMA-family decoder.

Recipes, HF ``config.json`` files and GGUF metadata (read by ``edgellm.architectures``) all
end up as one ``ModelConfig``; the decoder never looks at where its numbers came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm import checks
from edgellm.errors import EdgeLLMError
from edgellm.rope import RopeConfig

# Sanity ceilings on the architecture's sizes (well above any published decoder): a typo such as
# ``dim: 40960000`` is refused here instead of by an allocation minutes later.
_SIZE_LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "hidden_dim": 1 << 18,
                "n_kv_heads": 1024, "head_dim": 1024}
MAX_SEQ_LEN = 1 << 20  # cache slots; the RoPE tables and mask are built for all of them
KV_DTYPES = ("fp32", "fp16", "int8")
MIN_RING = 8  # slots of a window's ring: a call then takes at least 2 tokens (``ModelConfig.max_chunk``)


@dataclass
class KVCacheConfig:
    """How the KV cache stores and reuses its slots (the recipe's ``kv_cache``).

    ``dtype``: fp32, fp16, or int8 (codes with one fp16 scale per token and KV head, symmetric).
    ``window``: absent = the plain static cache of ``max_seq_len`` slots (positions end at the
    capacity); W = a cache of W slots whose first ``sinks`` hold positions 0..sinks-1 forever and
    whose other W - sinks are a ring written at the position modulo the ring, so positions grow
    without bound (RoPE is then computed from the position, not looked up in a table)."""

    dtype: str = "fp32"
    window: int | None = None
    sinks: int = 0

    def __post_init__(self):
        if self.dtype not in KV_DTYPES:
            raise EdgeLLMError(f"kv_cache.dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        if self.window is not None:
            self.window = checks.integer(self.window, "kv_cache.window", MIN_RING, MAX_SEQ_LEN,
                                         fix="the window is the cache's slot count")
        self.sinks = checks.integer(self.sinks, "kv_cache.sinks", 0, MAX_SEQ_LEN)
        if self.sinks and self.window is None:
            raise EdgeLLMError("kv_cache.sinks needs kv_cache.window: sinks are the kept first positions of a "
                               "sliding window; set a window or drop the sinks")
        if self.window is not None and self.window - self.sinks < MIN_RING:
            raise EdgeLLMError(f"kv_cache.window ({self.window}) must exceed kv_cache.sinks ({self.sinks}) by at least "
                               f"{MIN_RING}: the ring needs room for the recent tokens")

    @property
    def ring(self) -> int | None:
        """Slots of the ring (window - sinks), None for a plain cache."""
        return None if self.window is None else self.window - self.sinks

    def slot_bytes(self, head_dim: int) -> int:
        """Bytes one KV head's key (or value) takes in one slot: codes plus the int8 scale."""
        return head_dim * {"fp32": 4, "fp16": 2, "int8": 1}[self.dtype] + (2 if self.dtype == "int8" else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    n_kv_heads: int | None = None  # None = multi-head (n_kv_heads == n_heads)
    head_dim: int | None = None  # None = dim // n_heads
    norm_eps: float = 1e-5
    max_seq_len: int = 2048  # static KV cache capacity
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    o_bias: bool = False  # output-projection bias
    mlp_bias: bool = False
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)

    def __post_init__(self):
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        if isinstance(self.kv_cache, dict):
            self.kv_cache = KVCacheConfig(**self.kv_cache)
        for name, hi in _SIZE_LIMITS.items():
            if getattr(self, name) is not None or name not in ("n_kv_heads", "head_dim"):
                setattr(self, name, checks.integer(getattr(self, name), name, 1, hi))
        self.max_seq_len = checks.integer(self.max_seq_len, "max_seq_len", 2, MAX_SEQ_LEN,
                                          fix="the KV cache needs at least 2 slots")
        self.norm_eps = checks.number(self.norm_eps, "norm_eps", 0, 1, lo_open=True, hi_open=True)
        for name in ("tie_embeddings", "attention_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeLLMError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.kv_cache.window is not None and self.kv_cache.window != self.max_seq_len:
            raise EdgeLLMError(f"a windowed KV cache has window slots: kv_cache.window {self.kv_cache.window} and "
                               f"max_seq_len {self.max_seq_len} differ; give one of them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    @property
    def max_chunk(self) -> int:
        """Most tokens one forward takes: capacity - 1 (the exports' dynamic length); in a windowed
        cache a quarter of the ring (a call's positions must land in distinct slots, and a query
        sees the window minus the later tokens of its own call: at least 3/4 of it)."""
        if self.kv_cache.ring is not None:
            return max(1, min(self.max_seq_len - 1, self.kv_cache.ring // 4))
        return self.max_seq_len - 1

    def kv_cache_bytes(self, dtype: str | None = None) -> int:
        """The static KV cache: keys and values of every layer, every KV head, every slot, stored as
        ``dtype`` (default: the configured one; int8 counts its per-token-and-head scales)."""
        spec = self.kv_cache if dtype is None else KVCacheConfig(dtype=dtype)
        return 2 * self.n_layers * self.n_kv_heads * self.max_seq_len * spec.slot_bytes(self.head_dim)

    def num_parameters(self) -> int:
        d, h, kv, hd, f, v = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim, self.vocab_size
        per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d
