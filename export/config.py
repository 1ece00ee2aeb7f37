"""The resolved architecture of a LLaMA-family decoder, and how to read it from an HF config.

Recipes, HF ``config.json`` files and GGUF metadata all end up as one ``ModelConfig``; the
decoder never looks at where its numbers came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from export.rope import RopeConfig


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


# HF config keys we read for model_type llama / xverse / mistral-like configs.
SUPPORTED_MODEL_TYPES = ("llama", "xverse", "mistral")


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """Build a ``ModelConfig`` from an HF ``config.json`` dict (llama or xverse)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; "
                         f"edgellm supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    n_heads = hf["num_attention_heads"]
    # XVERSE's config class has no num_key_value_heads (plain multi-head); the LLaMA, Mistral
    # and XVERSE config classes all default rms_norm_eps to 1e-6.
    n_kv = hf.get("num_key_value_heads") or n_heads
    default_eps = 1e-6
    ctx = hf.get("max_position_embeddings", 2048)
    cap = max_seq_len or ctx
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", default_eps),
        max_seq_len=cap,
        rope=RopeConfig.from_hf(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )
