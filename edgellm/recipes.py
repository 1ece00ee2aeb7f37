"""Recipes: one YAML data file per model, validated field by field.

A recipe names the architecture, RoPE, tokenizer source, cache capacity, quantization,
default targets, chat template and eos ids. It holds no code. An unknown or missing field is
an error that names the field and lists the valid ones.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from edgellm import checks
from edgellm.errors import EdgeLLMError, RecipeError

from edgellm.config import MAX_SEQ_LEN, KVCacheConfig, ModelConfig
from edgellm.rope import RopeConfig

# The YAML files live in the top-level recipes/ folder; edgellm/recipes links to it, so the same
# path serves a checkout and an installed wheel (which carries the files as package data).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "smollm2-135m"




PRECISIONS = ("int4", "int8", "float")  # per tensor: 4-bit groups, 8-bit per row, or unquantized
# How codes and scales are chosen (edgellm.quantization / edgellm.quant_methods); every method
# gives the same format. gptq is calibration-based (edgellm.calibration), the others data-free.
METHODS = ("scale-search", "rtn", "hqq", "gptq")


@dataclass
class QuantConfig:
    """The shared quantization every target carries (see edgellm.quantization), with a
    precision per tensor: ``linears`` (q/k/v/o, gate/up/down), ``embedding`` and ``head``
    (None = the embedding's; a tied embedding/head is one tensor, so they must agree), and
    ``overrides`` mapping name globs (``layers.0.*``) to a precision, later entries winning."""

    scheme: str = "int4"  # int4 (= quantized, with the precisions below) | none
    group_size: int = 32  # int4 groups along the input features
    linears: str = "int4"
    embedding: str = "int4"
    head: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    symmetric: bool = True  # int4 only: 8-bit codes are always symmetric (XNNPACK qc8w)
    method: str | None = None  # one of METHODS; None = scale-search (or the legacy scale_search's)
    scale_search: bool | None = None  # legacy spelling, read only: true = scale-search, false = rtn
    calibration_tokens: int = 8192  # gptq: tokens of calibration text (edgellm.calibration), windows of 2048

    def __post_init__(self):
        if self.scheme not in ("int4", "none"):
            raise RecipeError(f"quantization.scheme {self.scheme!r} is not supported; use int4 or none")
        group = checks.integer(self.group_size, "quantization.group_size", 2, 4096)
        if group % 2:
            raise RecipeError(f"quantization.group_size must be a positive even number, got {self.group_size}")
        for name in ("linears", "embedding") + (("head",) if self.head is not None else ()):
            _check_precision(getattr(self, name), f"quantization.{name}", allow_float=name != "linears")
        if not isinstance(self.overrides, dict):
            raise RecipeError(f"quantization.overrides must be a mapping of tensor-name globs to "
                              f"{' | '.join(PRECISIONS)}, got {self.overrides!r}")
        for pattern, precision in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise RecipeError(f"quantization.overrides keys must be tensor-name globs such as 'layers.0.*', "
                                  f"got {pattern!r}")
            _check_precision(precision, f"quantization.overrides[{pattern!r}]")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"quantization.symmetric must be true or false, got {self.symmetric!r}")
        if self.scale_search is not None:  # legacy field (recipes and manifests before `method`)
            if not isinstance(self.scale_search, bool):
                raise RecipeError(f"quantization.scale_search must be true or false, got {self.scale_search!r} "
                                  f"(or use method: {' | '.join(METHODS)})")
            legacy = "scale-search" if self.scale_search else "rtn"
            if self.method is not None and self.method != legacy:
                raise RecipeError(f"quantization.scale_search: {str(self.scale_search).lower()} contradicts "
                                  f"method: {self.method}; drop scale_search (it is the old spelling of method)")
            self.method, self.scale_search = legacy, None  # consumed: `method` is the one field
        if self.method is None:
            self.method = "scale-search"
        if self.method not in METHODS:
            raise RecipeError(f"quantization.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        checks.integer(self.calibration_tokens, "quantization.calibration_tokens", 16, 1 << 20)

    @property
    def head_precision(self) -> str:
        return self.head if self.head is not None else self.embedding

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Validated construction; also reads manifests written before per-tensor precision
        (``embedding_bits: 4 | null``)."""
        data = dict(data)
        if "embedding_bits" in data:
            bits = data.pop("embedding_bits")
            if bits not in (None, 4) or isinstance(bits, bool):
                raise RecipeError(f"quantization.embedding_bits must be 4 or null, got {bits!r} "
                                  f"(or use embedding: int4 | int8 | float)")
            data.setdefault("embedding", "int4" if bits == 4 else "float")
        _check_keys("quantization", data, _QUANT_FIELDS)
        return cls(**data)


def _check_precision(value, where: str, allow_float: bool = True):
    valid = PRECISIONS if allow_float else PRECISIONS[:2]
    if value not in valid:
        raise RecipeError(f"{where} must be one of {', '.join(valid)}, got {value!r}")


@dataclass
class Recipe:
    name: str
    description: str
    architecture: dict[str, Any] | None  # ModelConfig fields; None = from the checkpoint's config
    rope: dict[str, Any] | None
    max_seq_len: int
    tokenizer: dict[str, Any]
    quantization: QuantConfig
    targets: list[str] | None  # what --target all exports; None = every registered target
    chat_template: dict[str, Any] | None
    bos_id: int | None
    eos_ids: list[int]
    checkpoint: dict[str, Any] | None = None  # {"source": "gguf-asset", "asset": ...} or None
    weights_note: str | None = None
    kv_cache: dict[str, Any] | None = None  # KVCacheConfig keys (dtype, window, sinks); None = fp32, plain
    path: str | None = field(default=None, repr=False)

    def model_config(self, max_seq_len: int | None = None, **overrides) -> ModelConfig:
        if self.architecture is None:
            raise RecipeError(f"recipe {self.name!r} has no architecture; pass --checkpoint")
        arch = dict(self.architecture)
        arch.update(overrides)
        return ModelConfig(**arch, max_seq_len=max_seq_len or self.max_seq_len,
                           rope=RopeConfig(**(self.rope or {})))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "path"}
        d["quantization"] = {k: v for k, v in copy.deepcopy(vars(self.quantization)).items()
                             if not (k == "scale_search" and v is None)}  # legacy input, consumed
        return d


_REQUIRED = ("name", "description", "max_seq_len", "tokenizer", "quantization", "eos_ids")
_OPTIONAL = ("architecture", "rope", "chat_template", "bos_id", "checkpoint", "weights_note", "targets", "kv_cache")
_ARCH_FIELDS = {f.name for f in fields(ModelConfig)} - {"max_seq_len", "rope", "kv_cache"}
_KV_FIELDS = {f.name for f in fields(KVCacheConfig)}
_ROPE_FIELDS = {f.name for f in fields(RopeConfig)}
_QUANT_FIELDS = {f.name for f in fields(QuantConfig)}
_TOKENIZER_SOURCES = {"xgen": set(), "gguf": {"asset", "path"}, "hf": {"path"}}
_CHAT_FIELDS = {"header", "default_system", "system", "user", "assistant", "generation_prompt"}


def _check_keys(where: str, got: dict, valid: set[str], required: set[str] = frozenset()):
    if not isinstance(got, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(got).__name__}")
    unknown = sorted(set(got) - valid)
    if unknown:
        raise RecipeError(f"unknown field {unknown[0]!r} in {where}; valid fields: {', '.join(sorted(valid))}")
    missing = sorted(required - set(got))
    if missing:
        raise RecipeError(f"missing field {missing[0]!r} in {where}; required: {', '.join(sorted(required))}")


# A recipe's name becomes part of the artifact folder's name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def parse_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping and return a ``Recipe`` (errors name the bad field)."""
    try:
        return _parse_recipe(data, origin)
    except RecipeError:
        raise
    except EdgeLLMError as e:  # a value check of edgellm.checks: say where it was
        raise RecipeError(f"{origin}: {e}") from None


def _parse_recipe(data: dict[str, Any], origin: str) -> Recipe:
    _check_keys(f"recipe {origin}", data, set(_REQUIRED) | set(_OPTIONAL), set(_REQUIRED))
    if not isinstance(data["name"], str) or not _NAME.fullmatch(data["name"]):
        raise RecipeError(f"{origin}: name must be letters, digits, '.', '_' or '-' (it names the artifact "
                          f"folder), got {data['name']!r}")
    if not isinstance(data["description"], str):
        raise RecipeError(f"{origin}: description must be a string, got {data['description']!r}")
    if data.get("bos_id") is not None:
        checks.integer(data["bos_id"], f"{origin}: bos_id", 0)
    arch = data.get("architecture")
    if arch is not None:
        _check_keys(f"{origin}: architecture", arch, _ARCH_FIELDS,
                    {"vocab_size", "dim", "n_layers", "n_heads", "hidden_dim"})
    if data.get("rope") is not None:
        _check_keys(f"{origin}: rope", data["rope"], _ROPE_FIELDS)
    if data.get("kv_cache") is not None:
        _check_keys(f"{origin}: kv_cache", data["kv_cache"], _KV_FIELDS)
        KVCacheConfig(**data["kv_cache"])
    _check_keys(f"{origin}: quantization", data["quantization"], _QUANT_FIELDS | {"embedding_bits"})
    tok = data["tokenizer"]
    _check_keys(f"{origin}: tokenizer", tok, {"source", "asset", "path"}, {"source"})
    if tok["source"] not in _TOKENIZER_SOURCES:
        raise RecipeError(f"{origin}: tokenizer.source {tok['source']!r} is not one of "
                          f"{', '.join(_TOKENIZER_SOURCES)}")
    if data.get("chat_template") is not None:
        _check_keys(f"{origin}: chat_template", data["chat_template"], _CHAT_FIELDS,
                    {"user", "assistant", "generation_prompt"})
    if data.get("checkpoint") is not None:
        _check_keys(f"{origin}: checkpoint", data["checkpoint"], {"source", "asset", "path"}, {"source"})
    targets = data.get("targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise RecipeError(f"{origin}: targets must be a non-empty list of target names (the export pipeline "
                          f"checks the names), got {targets!r}")
    checks.integer(data["max_seq_len"], "max_seq_len", 2, MAX_SEQ_LEN)
    if (not isinstance(data["eos_ids"], list) or not data["eos_ids"]
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in data["eos_ids"])):
        raise RecipeError(f"{origin}: eos_ids must be a non-empty list of integers")
    try:
        quant = QuantConfig.from_dict(data["quantization"])
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None
    recipe = Recipe(
        name=data["name"], description=data["description"], architecture=arch,
        rope=data.get("rope"), max_seq_len=data["max_seq_len"], tokenizer=tok,
        quantization=quant, targets=list(targets) if targets is not None else None,
        chat_template=data.get("chat_template"), bos_id=data.get("bos_id"),
        eos_ids=list(data["eos_ids"]), checkpoint=data.get("checkpoint"),
        weights_note=data.get("weights_note"), kv_cache=data.get("kv_cache"), path=origin,
    )
    if arch is not None:
        try:
            recipe.model_config()
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{origin}: {e}") from None
    return recipe


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | None = None) -> Recipe:
    """Load a recipe by name (``recipes/<name>.yaml``) or by path; None = the embedded default."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available_recipes())} "
                              f"(or pass a path to a .yaml file)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                          f"fix the file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text (UTF-8 YAML) file") from None
    except OSError as e:
        raise RecipeError(f"recipe {path} cannot be read ({e.strerror})") from None
    return parse_recipe(data, origin=path.name)
