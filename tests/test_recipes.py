"""Recipes: every shipped recipe builds a decoder; validation errors name the field and list
the valid ones; a checkpoint without a recipe takes its architecture from config.json."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from export import load_decoder
from edgellm.decoder import Decoder
from edgellm.recipes import RECIPES_DIR, RecipeError, available_recipes, load_recipe, parse_recipe
from helpers import TOL, full, hf_dict, hf_logits, hf_model, maxdiff, tokens

RECIPES = available_recipes()
# Real forwards for recipes whose one-layer model is small; the 4B/7B/13B recipes (0.27-1.35 B
# parameters even at one layer, mostly embedding; tens of seconds each to initialize) are
# checked on the meta device instead, at full depth.
REAL_FORWARD_LIMIT = 100_000_000
SMALL = [n for n in RECIPES if load_recipe(n).model_config(64, n_layers=1).num_parameters() <= REAL_FORWARD_LIMIT]


def test_recipes_present():
    assert {"tiny", "smollm2-135m", "xgen-7b-4k-base", "xgen-7b-8k-base", "xgen-7b-8k-inst", "xgen-mobile-4b",
            "xverse-7b", "xverse-7b-chat", "xverse-13b-256k"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_shapes_on_meta(name):
    """Full depth, on the meta device: parameter shapes, count, and one forward's output shape."""
    rec = load_recipe(name)
    assert rec.name == name and rec.path == f"{name}.yaml"
    cfg = rec.model_config(max_seq_len=64)
    assert cfg.max_seq_len == 64 and rec.model_config().max_seq_len == rec.max_seq_len
    with torch.device("meta"):
        model = Decoder(cfg)
        n = sum(p.numel() for p in model.parameters())  # tied weights count once
        assert n == cfg.num_parameters()
        q = model.layers[0].self_attn.q_proj.weight
        k = model.layers[0].self_attn.k_proj.weight
        assert q.shape == (cfg.n_heads * cfg.head_dim, cfg.dim) and k.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
        assert len(model.layers) == cfg.n_layers
        out = model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    assert out.shape == (1, 3, cfg.vocab_size) and out.dtype == torch.float32
    # published sizes
    expected = {"smollm2-135m": 134.5e6, "xgen-7b-4k-base": 6.9e9, "xverse-7b": 7.3e9, "xverse-13b-256k": 13.7e9,
                "xgen-mobile-4b": 3.68e9}  # its description says ~3.9B
    if name in expected:
        assert abs(n / expected[name] - 1) < 0.05, n


def test_small_recipes():
    assert set(SMALL) == {"tiny", "smollm2-135m"}


@pytest.mark.parametrize("name", SMALL)
def test_recipe_builds_and_runs(name, request):
    rec = load_recipe(name)
    if rec.checkpoint is not None:
        # the embedded default ships trained weights: reuse the session's loaded copy (conftest)
        loaded = request.getfixturevalue("smollm2")
        assert loaded.recipe.name == name and loaded.origin.endswith(".gguf")
        model = loaded.decoder()
        assert model.config.n_layers == rec.architecture["n_layers"]
    else:
        model = load_decoder(recipe=name, n_layers=1, max_seq_len=64)
        assert model.config.n_layers == 1 and model.config.max_seq_len == 64
        assert model.recipe.name == name
    toks = tokens(8, vocab=model.config.vocab_size)
    out = full(model, toks)
    assert out.shape == (1, 8, model.config.vocab_size)
    assert torch.isfinite(out).all() and out.abs().max() < 100


def test_random_weights_are_seeded():
    a = load_decoder(recipe="tiny", n_layers=1, max_seq_len=16, seed=1)
    b = load_decoder(recipe="tiny", n_layers=1, max_seq_len=16, seed=1)
    c = load_decoder(recipe="tiny", n_layers=1, max_seq_len=16, seed=2)
    toks = tokens(5, vocab=a.config.vocab_size)
    assert torch.equal(full(a, toks), full(b, toks))
    assert not torch.equal(full(a, toks), full(c, toks))


# --------------------------------------------------------------------------- validation


def _tiny_data() -> dict:
    return yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())


def _load(tmp_path, data) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    load_recipe(p)


def _mutate(fn):
    data = _tiny_data()
    fn(data)
    return data


VALIDATION = {
    "unknown top-level field": (
        lambda d: d.update(temperature=0.7),
        ["'temperature'", "valid fields:", "architecture", "tokenizer", "eos_ids"]),
    "unknown architecture field": (
        lambda d: d["architecture"].update(n_experts=8),
        ["'n_experts'", "architecture", "valid fields:", "n_kv_heads", "head_dim", "tie_embeddings"]),
    "missing required field": (
        lambda d: d.pop("eos_ids"),
        ["missing field 'eos_ids'", "required:", "max_seq_len", "tokenizer"]),
    "missing architecture field": (
        lambda d: d["architecture"].pop("dim"),
        ["missing field 'dim'", "architecture", "required:", "n_heads", "vocab_size"]),
    "bad rope type": (
        lambda d: d["rope"].update(type="longrope"),
        ["RoPE scaling type 'longrope'", "supported: default, linear, ntk, dynamic, yarn, llama3"]),
    "rope missing parameter": (
        lambda d: d["rope"].pop("factor"),
        ["'linear' needs 'factor'"]),
    "unknown rope field": (
        lambda d: d["rope"].update(scale=2.0),
        ["'scale'", "rope", "valid fields:", "factor", "theta", "type"]),
    "bad tokenizer source": (
        lambda d: d["tokenizer"].update(source="sentencepiece"),
        ["tokenizer.source 'sentencepiece'", "xgen, gguf, hf"]),
    "unknown tokenizer field": (
        lambda d: d["tokenizer"].update(vocab_file="x.model"),
        ["'vocab_file'", "tokenizer", "valid fields: asset, path, source"]),
    "targets not a list": (
        lambda d: d.update(targets="executorch"),
        ["targets must be a non-empty list"]),
    "unknown quantization field": (
        lambda d: d["quantization"].update(bits=3),
        ["'bits'", "quantization", "valid fields:", "group_size", "scheme"]),
    "bad quantization scheme": (
        lambda d: d["quantization"].update(scheme="int8"),
        ["quantization.scheme 'int8'", "int4 or none"]),
    "chat template missing field": (
        lambda d: d["chat_template"].pop("assistant"),
        ["missing field 'assistant'", "chat_template", "required: assistant, generation_prompt, user"]),
    "bad max_seq_len": (
        lambda d: d.update(max_seq_len="long"),
        ["max_seq_len", "'long'"]),
    "empty eos_ids": (
        lambda d: d.update(eos_ids=[]),
        ["eos_ids must be a non-empty list"]),
    "heads do not divide": (
        lambda d: d["architecture"].update(n_heads=4, n_kv_heads=3),
        ["n_heads 4 is not a multiple of n_kv_heads 3"]),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_validation_errors(tmp_path, case):
    mutate, fragments = VALIDATION[case]
    data = _mutate(mutate)
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, data)
    msg = str(err.value)
    assert "bad.yaml" in msg, msg  # the file is named
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_tiny_recipe_is_valid_as_is(tmp_path):
    _load(tmp_path, _tiny_data())  # the base of the mutations above is itself valid
    rec = parse_recipe(copy.deepcopy(_tiny_data()), origin="x")
    assert rec.to_dict()["quantization"]["group_size"] == 32


def test_unknown_recipe_lists_available():
    with pytest.raises(RecipeError) as err:
        load_recipe("llama-9000")
    msg = str(err.value)
    assert "'llama-9000'" in msg and all(r in msg for r in RECIPES)


def test_recipe_without_architecture_needs_checkpoint(tmp_path):
    data = _tiny_data()
    del data["architecture"]
    p = tmp_path / "noarch.yaml"
    p.write_text(yaml.safe_dump(data))
    rec = load_recipe(p)
    with pytest.raises(RecipeError, match="no architecture; pass --checkpoint"):
        rec.model_config()


# --------------------------------------------------------------------------- checkpoint without recipe


def test_checkpoint_folder_without_recipe(tmp_path):
    d = hf_dict(num_hidden_layers=3, num_key_value_heads=1, max_position_embeddings=96, rms_norm_eps=1e-6,
                rope_scaling={"type": "linear", "factor": 2.0}, bos_token_id=5, eos_token_id=[6, 7])
    hf = hf_model(d, seed=4)
    hf.save_pretrained(tmp_path)
    model = load_decoder(checkpoint=tmp_path)
    cfg = model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.hidden_dim, cfg.vocab_size) == (3, 4, 1, 64, 96, 256)
    assert cfg.max_seq_len == 96 and cfg.norm_eps == 1e-6
    assert cfg.rope.type == "linear" and cfg.rope.factor == 2.0
    rec = model.recipe
    assert rec.architecture is None and rec.name == tmp_path.name
    assert rec.tokenizer == {"source": "hf", "path": str(tmp_path)}
    assert rec.bos_id == 5 and rec.eos_ids == [6, 7]
    assert rec.targets is None  # --target all: every registered target
    toks = tokens(40)
    assert maxdiff(full(model, toks), hf_logits(hf, toks)) <= TOL


def test_checkpoint_with_recipe_takes_architecture_from_checkpoint(tmp_path):
    d = hf_dict(max_position_embeddings=96)
    hf = hf_model(d, seed=6)
    hf.save_pretrained(tmp_path)
    model = load_decoder(checkpoint=tmp_path, recipe="tiny")
    assert model.recipe.name == "tiny"  # tokenizer, quantization, chat template from the recipe
    assert model.config.dim == 64 and model.config.vocab_size == 256  # shapes from the checkpoint
    assert model.config.max_seq_len == load_recipe("tiny").max_seq_len  # the recipe's cache capacity
    toks = tokens(40)
    assert maxdiff(full(model, toks), hf_logits(hf, toks)) <= TOL


def test_unknown_target_in_a_recipe_is_refused_before_export(tmp_path):
    """Target names are checked against the registered targets when an export starts."""
    from edgellm.model import resolve_model
    from export.pipeline import resolve_targets

    data = _mutate(lambda d: d.update(targets=["executorch", "tflite"]))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = resolve_model(recipe=str(path))
    with pytest.raises(ValueError, match="unknown target 'tflite'; valid: coreml, executorch, onnx"):
        resolve_targets("all", loaded)
