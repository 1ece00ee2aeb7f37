"""Quantization methods (QuantConfig.method: scale-search | rtn | hqq | gptq) and the calibration
text: same format, deterministic, better than RTN where they should be, disjoint texts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from edgellm import quant_methods as M
from edgellm.errors import EdgeLLMError
from edgellm.quantization import quantize, quantize_weight
from edgellm.recipes import QuantConfig, RecipeError
from helpers import rand_weight as _rand_weight, scale_exact as _scale_exact


def _check_format(qw, shape, symmetric, bits=4):
    assert qw.codes.shape == shape and qw.codes.dtype == torch.int8 and qw.bits == bits
    lo, hi = (-128, 127) if bits == 8 else ((-8, 7) if symmetric else (0, 15))
    assert lo <= int(qw.codes.min()) and int(qw.codes.max()) <= hi
    assert (qw.scales > 0).all() and _scale_exact(qw.scales)
    if symmetric or bits == 8:
        assert qw.zero_points is None
    else:
        assert qw.zero_points.dtype == torch.int8 and 0 <= int(qw.zero_points.min()) <= int(qw.zero_points.max()) <= 15


# ---------------------------------------------------------------------------------------------- recipe field


def test_method_default_and_legacy_spelling():
    assert QuantConfig().method == "scale-search"
    assert QuantConfig(scale_search=True).method == "scale-search"
    assert QuantConfig(scale_search=False).method == "rtn"
    assert QuantConfig.from_dict({"scale_search": False}).method == "rtn"
    assert QuantConfig.from_dict({"method": "gptq"}).method == "gptq"
    c = QuantConfig(method="hqq")
    assert dataclasses.replace(c, method="rtn").method == "rtn"  # the legacy field is consumed
    assert c.scale_search is None


@pytest.mark.parametrize("data,match", [
    ({"method": "awq"}, "quantization.method must be one of scale-search, rtn, hqq, gptq"),
    ({"method": "hqq", "scale_search": True}, "contradicts method: hqq"),
    ({"scale_search": "yes"}, "quantization.scale_search must be true or false"),
    ({"calibration_tokens": 3}, "quantization.calibration_tokens"),
])
def test_method_validation(data, match):
    with pytest.raises((RecipeError, EdgeLLMError), match=match):
        QuantConfig.from_dict(data)


def test_recipe_round_trip_drops_consumed_legacy_field():
    from edgellm.recipes import load_recipe

    r = load_recipe("tiny")
    d = r.to_dict()["quantization"]
    assert d["method"] == "scale-search" and "scale_search" not in d
    d = load_recipe("smollm2-135m").to_dict()["quantization"]  # the measured default (issue 13)
    assert d["method"] == "gptq" and d["calibration_tokens"] == 8192 and d["embedding"] == "int8"


# ---------------------------------------------------------------------------------------------- HQQ


@pytest.mark.parametrize("symmetric,bits", [(True, 4), (False, 4), (True, 8)])
def test_hqq_format_deterministic_and_not_worse_than_rtn(symmetric, bits):
    w = _rand_weight()
    a, b = M.hqq_weight(w, 32, symmetric, bits=bits), M.hqq_weight(w, 32, symmetric, bits=bits)
    _check_format(a, w.shape, symmetric, bits)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    rtn = quantize_weight(w, 32, symmetric, scale_search=False, bits=bits)
    e_h = (a.dequantize() - w).square().sum().item()
    e_r = (rtn.dequantize() - w).square().sum().item()
    assert e_h <= e_r * (1 + 1e-6)  # per group never worse than RTN
    if symmetric and bits == 4:
        assert e_h <= 0.95 * e_r, (e_h, e_r)  # scale-only HQQ buys > 5 % on Gaussian groups


def test_hqq_digest_deterministic_via_quantize():
    state = {"layers.0.mlp.up_proj.weight": _rand_weight(16, 64), "lm_head.weight": _rand_weight(32, 64, 1)}
    cfg = QuantConfig(method="hqq", head="int8")
    a, b = quantize(state, cfg, tied=False).summary(), quantize(state, cfg, tied=False).summary()
    assert a["sha256"] == b["sha256"] and a["method"] == "hqq" and a["calibration"] is None
    assert a["sha256"] != quantize(state, QuantConfig(head="int8"), tied=False).summary()["sha256"]


# ---------------------------------------------------------------------------------------------- GPTQ


def _correlated_inputs(n=1024, cols=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    return (torch.randn(n, cols, generator=g) @ A) * torch.linspace(0.2, 3, cols)


@pytest.mark.parametrize("symmetric,bits", [(True, 4), (False, 4), (True, 8)])
def test_gptq_output_error_beats_rtn_and_search(symmetric, bits):
    w, X = _rand_weight(), _correlated_inputs()
    H = M._gram(X)
    g = M.gptq_weight(w, H, 32, symmetric, bits)
    _check_format(g, w.shape, symmetric, bits)
    g2 = M.gptq_weight(w, H, 32, symmetric, bits)
    assert torch.equal(g.codes, g2.codes) and torch.equal(g.scales, g2.scales)

    def out_err(qw):
        return (X @ (qw.dequantize() - w).T).square().sum().item()

    e_g = out_err(g)
    e_r = out_err(quantize_weight(w, 32, symmetric, scale_search=False, bits=bits))
    e_s = out_err(quantize_weight(w, 32, symmetric, scale_search=True, bits=bits))
    assert e_g <= 0.8 * e_r and e_g <= 0.9 * e_s, (e_g, e_r, e_s)


def test_gptq_streamed_model_deterministic_and_summarised(tiny):
    cfg = dataclasses.replace(tiny.recipe.quantization, method="gptq", head="int8")
    tokens = torch.randint(0, tiny.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    a = quantize(tiny.weights, cfg, tied=False, model_config=tiny.config, calibration=tokens)
    b = quantize(tiny.weights, cfg, tied=False, model_config=tiny.config, calibration=lambda: tokens)
    sa, sb = a.summary(), b.summary()
    assert sa["sha256"] == sb["sha256"]
    assert sa["method"] == "gptq" and sa["calibration"]["asset"] == "lee_background.cor"
    assert sa["calibration"]["tokens"] == 300
    base = quantize(tiny.weights, dataclasses.replace(cfg, method="scale-search"), tied=False)
    assert sorted(a.weights) == sorted(base.weights)
    for n, qw in a.weights.items():
        ref = base.weights[n]
        _check_format(qw, ref.shape, True, ref.bits)
        assert qw.bits == ref.bits and qw.group_size == ref.group_size
    # embedding and head are data-free: the scale-search bits
    assert torch.equal(a.weights["lm_head.weight"].codes, base.weights["lm_head.weight"].codes)
    assert sa["sha256"] != base.summary()["sha256"]


def test_gptq_needs_calibration(tiny):
    cfg = dataclasses.replace(tiny.recipe.quantization, method="gptq")
    with pytest.raises(ValueError, match="needs model_config and calibration tokens"):
        quantize(tiny.weights, cfg, tied=False)


def test_gptq_streamed_inputs_match_the_decoder(tiny):
    """The calibration forward (edgellm.quant_methods) is the decoder's: the Hessian it builds for
    a second-layer Linear equals the one from the eager decoder's inputs (linears at int8, so
    the quantized prefix barely moves them)."""
    grams = []
    tokens = torch.randint(0, tiny.config.vocab_size, (128,), generator=torch.Generator().manual_seed(1))
    cfg = dataclasses.replace(tiny.recipe.quantization, method="gptq", linears="int8", embedding="float")
    orig = M._gram
    try:
        M._gram = lambda x: (grams.append(orig(x)), grams[-1])[1]
        M.gptq_quantize(tiny.weights, cfg, tiny.config, tokens, tied=False)
    finally:
        M._gram = orig
    model, caps = tiny.decoder(), {}
    mods = dict(model.named_modules())
    order = ["layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
             "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj"]
    for n in order:
        mods[n].register_forward_pre_hook(lambda m, a, n=n: (caps.setdefault(n, orig(a[0][0])), None)[1])
    with torch.no_grad():
        model(tokens[None], torch.arange(128))
    for i, n in enumerate(order):
        rel = ((grams[i] - caps[n]).norm() / caps[n].norm()).item()
        assert rel < (1e-5 if i == 0 else 2e-2), (n, rel)


# ---------------------------------------------------------------------------------------------- calibration text


def test_calibration_and_evaluation_texts_disjoint():
    from edgellm import calibration as C

    cal = C.calibration_text()
    for name, ev in C.evaluation_texts().items():
        C.check_disjoint(cal, ev)  # raises on any shared 8-word run
        assert not C.overlap(cal, ev)
    with pytest.raises(ValueError, match="shares"):
        C.check_disjoint(cal[:5000], "preamble " + cal[1000:1400] + " end")
    assert C.source()["asset"] == "lee_background.cor" and len(C.source()["sha256"]) == 64


def test_calibration_tokens_deterministic(smollm2):
    from edgellm.calibration import calibration_tokens

    enc = smollm2.tokenizer().encode
    a, b = calibration_tokens(enc, 4096), calibration_tokens(enc, 4096)
    assert a.shape == (4096,) and torch.equal(a, b)
    with pytest.raises(ValueError, match="fewer than"):
        calibration_tokens(enc, 1 << 20, check=False)


# ---------------------------------------------------------------------------------------------- quality (slow)


# The regression bound on the best configuration <= 95 MB is on the recipe's default, which is
# that configuration: tests/test_quantize.py::test_default_quantization_quality_bound.
