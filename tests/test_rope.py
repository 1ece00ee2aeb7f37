"""RoPE scalings against transformers, and reading them from every HF config spelling.

Each scaling type runs 128 positions with a 32-position original context (4x past it) and
must give transformers' logits (≤ 1e-5); the same weights with plain RoPE must not (so a
scaling silently dropped fails). Two types have no exact transformers counterpart:

* ``dynamic`` (NTK): transformers recomputes the base from the current sequence length;
  ours is frozen at the cache capacity. They agree when transformers' forward covers
  exactly the capacity, which is what is compared here.
* ``ntk`` (static NTK-aware, XVERSE-13B-256K): transformers has no such type; it equals
  transformers' default RoPE with ``rope_theta = theta * alpha ** (d / (d - 2))``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from edgellm.architectures import config_from_hf
from edgellm.decoder import Decoder
from edgellm.rope import RopeConfig, frozen_note, inv_freq_and_scale, rope_tables
from helpers import TOL, full, hf_dict, hf_logits, hf_model, maxdiff, ours_from_hf, tokens

SEQ = 128  # 4x the original context of 32

CASES = {
    "default": ({}, None),
    "linear": ({}, {"type": "linear", "factor": 4.0}),
    "dynamic": ({}, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": ({}, {"rope_type": "yarn", "factor": 4.0}),
    "yarn-original-ctx": ({"max_position_embeddings": 128},
                          {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn-mscale": ({}, {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn-mscale-only": ({}, {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707}),
    "yarn-attention_factor": ({}, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                                   "beta_fast": 16.0, "beta_slow": 2.0}),
    "yarn-no-truncate": ({}, {"rope_type": "yarn", "factor": 4.0, "truncate": False}),
    "llama3": ({"max_position_embeddings": 128},
               {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}),
}


def _case_dict(name: str) -> dict:
    over, scaling = CASES[name]
    d = hf_dict(**over)
    if scaling is not None:
        d["rope_scaling"] = dict(scaling)
    return d


@pytest.mark.parametrize("name", list(CASES))
def test_scaling_matches_transformers(name):
    d = _case_dict(name)
    # dynamic NTK is frozen at the capacity: compare with a forward whose length is the capacity
    cap = SEQ if "dynamic" in name else SEQ + 32
    hf = hf_model(d)
    ours = ours_from_hf(hf, d, max_seq_len=cap)
    toks = tokens(SEQ)
    ref = hf_logits(hf, toks)
    got = full(ours, toks)
    assert maxdiff(got, ref) <= TOL, maxdiff(got, ref)
    if name != "default":
        plain = Decoder(config_from_hf({**copy.deepcopy(d), "rope_scaling": None}, max_seq_len=cap)).eval()
        plain.load_state_dict(ours.state_dict())
        assert maxdiff(full(plain, toks), ref) > 1e-3, "scaling has no effect on these positions"


@pytest.mark.parametrize("name", [n for n in CASES if n != "default"])
def test_inv_freq_matches_transformers(name):
    """The frequency tables themselves: transformers' init functions, float32, bit for bit
    (dynamic evaluated at the capacity, with the length as a tensor as in its forward)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = _case_dict(name)
    hf_cfg = LlamaConfig(**copy.deepcopy(d))
    kind = hf_cfg.rope_parameters["rope_type"]
    kw = {"seq_len": torch.tensor(SEQ)} if kind == "dynamic" else {}
    ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", **kw)
    rope = config_from_hf(copy.deepcopy(d)).rope
    inv, scale = inv_freq_and_scale(rope, 16, SEQ)
    assert inv.dtype == torch.float32
    assert torch.equal(inv, ref), (inv - ref).abs().max()
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    if "mscale" in name or "attention_factor" in name:
        assert scale != pytest.approx(1.0)  # the case exercises the attention factor


def test_dynamic_is_frozen_at_capacity():
    d = _case_dict("dynamic")
    rope = config_from_hf(copy.deepcopy(d)).rope
    assert rope.original_max_position_embeddings == 32
    small, _ = inv_freq_and_scale(rope, 16, 32)  # capacity within the original context: unscaled
    plain, _ = inv_freq_and_scale(RopeConfig(theta=rope.theta), 16, 32)
    assert torch.equal(small, plain)
    big, _ = inv_freq_and_scale(rope, 16, 256)
    assert (big[1:] < plain[1:]).all()
    assert frozen_note(rope, 256)["rope_frozen_at"] == 256
    assert frozen_note(RopeConfig(), 256) is None


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_static_ntk_equals_default_with_raised_base(spelling):
    theta, alpha, dh = 10000.0, 8.0, 16
    if spelling == "rope_scaling":
        ntk = hf_dict(rope_scaling={"type": "ntk", "alpha": alpha})
    else:
        ntk = hf_dict(rope_parameters={"rope_type": "ntk", "rope_theta": theta, "alpha": alpha})
        del ntk["rope_theta"]
    raised = hf_dict(rope_theta=theta * alpha ** (dh / (dh - 2)))
    hf = hf_model(raised)
    ours = ours_from_hf(hf, ntk, max_seq_len=SEQ + 32)
    assert ours.config.rope.type == "ntk" and ours.config.rope.alpha == alpha
    toks = tokens(SEQ)
    ref = hf_logits(hf, toks)
    assert maxdiff(full(ours, toks), ref) <= TOL
    plain = ours_from_hf(hf, hf_dict(), max_seq_len=SEQ + 32)
    assert maxdiff(full(plain, toks), ref) > 1e-3


# --------------------------------------------------------------------------- config spellings

SPELLING_CASES = {
    "default": ("default", {}),
    "linear": ("linear", {"factor": 2.0}),
    "dynamic": ("dynamic", {"factor": 2.0}),
    "yarn": ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
                      "mscale": 0.707, "mscale_all_dim": 1.0}),
    "llama3": ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}),
    "ntk": ("ntk", {"alpha": 8.0}),
}


def _spellings(kind: str, params: dict, theta: float = 500000.0) -> dict[str, dict]:
    base = {"max_position_embeddings": 128}
    out = {
        "rope_theta+rope_scaling.type": {**base, "rope_theta": theta,
                                         "rope_scaling": None if kind == "default" else {"type": kind, **params}},
        "rope_theta+rope_scaling.rope_type": {**base, "rope_theta": theta,
                                              "rope_scaling": {"rope_type": kind, **params}},
        "rope_parameters": {**base, "rope_parameters": {"rope_type": kind, "rope_theta": theta, **params}},
    }
    return out


@pytest.mark.parametrize("case", list(SPELLING_CASES))
def test_hf_spellings_agree(case):
    kind, params = SPELLING_CASES[case]
    configs = _spellings(kind, params)
    if kind != "ntk":  # what transformers 5 itself writes to config.json
        from transformers import LlamaConfig

        saved = LlamaConfig(**hf_dict(**copy.deepcopy(configs["rope_theta+rope_scaling.rope_type"]))).to_dict()
        assert "rope_parameters" in saved
        configs["transformers-5 save"] = saved
    ropes = {name: RopeConfig.from_hf(copy.deepcopy(c)) for name, c in configs.items()}
    first = ropes["rope_parameters"]
    assert first.type == kind and first.theta == 500000.0
    for key, value in params.items():
        assert getattr(first, key) == value, key
    if kind in ("dynamic", "yarn", "llama3"):
        expected_ctx = params.get("original_max_position_embeddings", 128)
        assert first.original_max_position_embeddings == expected_ctx
    for name, rope in ropes.items():
        assert rope == first, f"{name}: {rope} != {first}"
    # and through the whole config
    models = {name: config_from_hf(hf_dict(**copy.deepcopy(c))) for name, c in configs.items()}
    assert all(m.rope == first for m in models.values())


def test_old_and_new_type_keys_with_theta_default():
    assert RopeConfig.from_hf({}) == RopeConfig(theta=10000.0)
    assert RopeConfig.from_hf({"rope_theta": 1e6}).theta == 1e6
    assert RopeConfig.from_hf({"rope_parameters": {"rope_theta": 2e5}, "rope_scaling": {"type": "linear", "factor": 2.0}}) \
        == RopeConfig(theta=2e5, type="linear", factor=2.0)


@pytest.mark.parametrize("bad", ["longrope", "su", "foo", "mrope"])
@pytest.mark.parametrize("where", ["rope_scaling.type", "rope_scaling.rope_type", "rope_parameters"])
def test_unsupported_scaling_is_an_error(bad, where):
    params = {"factor": 2.0, "original_max_position_embeddings": 32}
    if where == "rope_scaling.type":
        hf = {"rope_theta": 1e4, "rope_scaling": {"type": bad, **params}}
    elif where == "rope_scaling.rope_type":
        hf = {"rope_theta": 1e4, "rope_scaling": {"rope_type": bad, **params}}
    else:
        hf = {"rope_parameters": {"rope_type": bad, "rope_theta": 1e4, **params}}
    with pytest.raises(ValueError, match=f"'{bad}'.*supported: default, linear, ntk, dynamic, yarn, llama3"):
        RopeConfig.from_hf(hf)
    with pytest.raises(ValueError, match=f"'{bad}'"):
        config_from_hf(hf_dict(**hf))


def test_bad_rope_parameters_are_errors():
    with pytest.raises(ValueError, match="unknown RoPE parameter.*short_factor"):
        RopeConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0, "short_factor": [1.0]}})
    with pytest.raises(ValueError, match="'linear' needs 'factor'"):
        RopeConfig.from_hf({"rope_scaling": {"type": "linear"}})
    with pytest.raises(ValueError, match="'llama3' needs 'low_freq_factor'"):
        RopeConfig.from_hf({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'foo'"):
        RopeConfig(type="foo")


def test_rope_tables_shape_and_scale():
    rope = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=32, attention_factor=0.5)
    cos, sin = rope_tables(rope, 16, 64)
    assert cos.shape == sin.shape == (64, 8) and cos.dtype == torch.float32
    assert torch.allclose(cos[0], torch.full((8,), 0.5))
    assert torch.allclose(cos ** 2 + sin ** 2, torch.full_like(cos, 0.25), atol=1e-6)
    inv, _ = inv_freq_and_scale(RopeConfig(theta=10000.0), 16, 64)
    expect = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(inv, expect)
    assert math.isclose(rope_tables(RopeConfig(), 16, 64)[1][5, 0].item(), math.sin(5.0), rel_tol=1e-6)
