"""Where a tokenizer comes from: an artifact, a checkpoint, a GGUF, a recipe's source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.assets import fetch
from edgellm.errors import EdgeLLMError
from edgellm.recipes import load_recipe
from edgellm.tokenizer import builders as tb
from edgellm.tokenizer.core import RANKS_FILE, Tokenizer

def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Tokenizer from an artifact dir, a checkpoint dir/tokenizer.json, a .gguf, or a recipe name/path.

    Loading never builds a model. Recipes contribute their chat template and bos/eos ids.
    """
    p = Path(spec)
    if p.is_dir() and (p / RANKS_FILE).exists():
        return Tokenizer.load(p)
    if p.is_dir() and (p / "tokenizer.json").exists():
        return tb.build_from_hf_json(p / "tokenizer.json")
    if p.is_file() and p.suffix == ".gguf":
        return tb.build_from_gguf(p)
    if p.is_file() and p.name.endswith(".json") and p.suffix != ".yaml":
        return tb.build_from_hf_json(p)
    if p.is_dir():
        raise ValueError(f"{p} has neither {RANKS_FILE} nor tokenizer.json; pass an artifact "
                         f"directory, a checkpoint folder, a .gguf file or a recipe name")
    recipe = load_recipe(str(spec))
    tok = tokenizer_from_source(recipe.tokenizer)
    if getattr(recipe, "chat_template", None) is not None:
        tok.chat_template = dict(recipe.chat_template)
    if getattr(recipe, "bos_id", None) is not None:
        tok.bos_id = recipe.bos_id
    if getattr(recipe, "eos_ids", None):
        tok.eos_ids = list(recipe.eos_ids)
    tok.source = f"recipe:{recipe.name} ({tok.source})"
    return tok


def tokenizer_from_source(src: dict[str, Any]) -> Tokenizer:
    """Build from a recipe's ``tokenizer`` mapping: {source: xgen | gguf (asset|path) | hf (path)}."""
    kind = src.get("source")
    if kind == "xgen":
        return tb.build_xgen()
    if kind == "gguf":
        if src.get("asset"):
            return tb.build_from_gguf(fetch(src["asset"]))
        if src.get("path"):
            path = Path(src["path"]).expanduser()
            if not path.is_file():
                raise EdgeLLMError(f"tokenizer GGUF {path} does not exist; fix the recipe's tokenizer.path")
            return tb.build_from_gguf(path)
        raise ValueError("tokenizer source gguf needs 'asset' or 'path'; add one to the recipe")
    if kind == "hf":
        if not src.get("path"):
            raise ValueError("tokenizer source hf needs 'path' (a checkpoint folder or tokenizer.json); "
                             "pass the checkpoint folder instead of the recipe")
        path = Path(src["path"]).expanduser()
        if path.is_dir() and not (path / "tokenizer.json").exists() and (path / RANKS_FILE).exists():
            return Tokenizer.load(path)  # ranks no tokenizer.json can express (make_checkpoint's XGen)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise EdgeLLMError(f"{path} does not exist: the checkpoint has no tokenizer.json; add it to the folder "
                               f"or pass a --recipe whose tokenizer fits the model")
        return tb.build_from_hf_json(path)
    raise ValueError(f"unknown tokenizer source {kind!r}; use xgen, gguf or hf")
