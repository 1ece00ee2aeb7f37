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

    def __post_init__(self):
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    def kv_cache_bytes(self, element_bytes: int = 4) -> int:
        """The static KV cache: keys and values of every layer, every KV head, every slot."""
        return 2 * self.n_layers * self.n_kv_heads * self.max_seq_len * self.head_dim * element_bytes

    def num_parameters(self) -> int:
        d, h, kv, hd, f, v = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim, self.vocab_size
        per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d
