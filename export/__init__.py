"""edgellm export: the one decoder, lowered to every registered target.

Public API: ``load_decoder``; ``export.pipeline.run_export``; the CLI is ``python -m export``.
"""

from __future__ import annotations

from pathlib import Path

from edgellm.decoder import Decoder
from edgellm.model import resolve_model

__all__ = ["load_decoder"]


def load_decoder(checkpoint: str | Path | None = None, recipe: str | Path | None = None, *,
                 max_seq_len: int | None = None, seed: int = 0, n_layers: int | None = None) -> Decoder:
    """The eager decoder (``forward(tokens[1, T], input_pos[T]) -> logits[1, T, V]``).

    With neither argument, the embedded default (SmolLM2-135M-Instruct). ``checkpoint`` is an
    HF folder or a .gguf file; ``recipe`` a recipe name or YAML path; a recipe without a
    checkpoint gets seeded random weights (``seed``).
    """
    loaded = resolve_model(checkpoint, recipe, max_seq_len=max_seq_len, seed=seed, n_layers=n_layers)
    model = loaded.decoder()
    model.recipe = loaded.recipe
    return model
