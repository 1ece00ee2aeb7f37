"""The resolved architecture of a LLaMA-family decoder.

Recipes, HF ``config.json`` files and GGUF metadata (read by ``edgellm.architectures``) all
end up as one ``ModelConfig``; the decoder never looks at where its numbers came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.rope import RopeConfig


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
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    def num_parameters(self) -> int:
        d, h, kv, hd, f, v = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim, self.vocab_size
        per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d
