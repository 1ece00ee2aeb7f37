"""The canonical decoder against transformers' LlamaForCausalLM, and against itself.

* Architecture variants (MHA/GQA/MQA, tied/untied, q/k/v/o bias, head_dim != dim/heads) give
  the logits of ``transformers.LlamaForCausalLM`` with the same random weights (<= 1e-5).
* The KV cache: reset, stale slots masked; ``torch.export`` with a dynamic sequence length
  runs and matches eager.
* Random-weight logits stay finite and bounded.

Weights are re-randomized with a scale that makes attention sharp (q/k gain 2) and logits
O(1), so a wrong rotation, mask or cache write moves the logits far past the tolerance
(``test_tolerance_has_teeth`` checks that for an off-by-one position and a 1% RoPE base).
Each target's formulations (source transforms) are held against this decoder in
``test_transforms.py``; RoPE scaling types are compared with transformers in ``test_rope.py``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgellm.decoder import Decoder
from edgellm.rope import RopeConfig
from helpers import TOL, VOCAB, full, hf_dict, hf_logits, hf_model, maxdiff, ours_from_hf, tokens

# --------------------------------------------------------------------------- architecture vs transformers

ARCHS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "mha-no-kv-key": {"num_key_value_heads": None},
    "tied": {"tie_word_embeddings": True},
    "bias": {"attention_bias": True},
    "head_dim": {"head_dim": 24},  # 4 heads x 24 != hidden 64
    "mqa-bias-tied-head_dim": {"num_key_value_heads": 1, "attention_bias": True, "tie_word_embeddings": True,
                               "head_dim": 40, "num_attention_heads": 2},
    "mlp_bias": {"mlp_bias": True},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_transformers(arch):
    """128 positions (4x the 32-position original context) in a 160-slot cache: the
    unused slots 128..159 must be masked out."""
    d = hf_dict(**ARCHS[arch])
    if d["num_key_value_heads"] is None:
        del d["num_key_value_heads"]
    hf = hf_model(d)
    ours = ours_from_hf(hf, d, max_seq_len=160)
    cfg = ours.config
    assert cfg.n_kv_heads == hf.config.num_key_value_heads
    assert cfg.head_dim == hf.config.head_dim
    assert cfg.tie_embeddings == d["tie_word_embeddings"]
    if cfg.tie_embeddings:
        assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    toks = tokens(128)
    ref = hf_logits(hf, toks)
    got = full(ours, toks)
    assert got.dtype == torch.float32 and got.shape == (1, 128, VOCAB)
    assert maxdiff(got, ref) <= TOL, maxdiff(got, ref)


def test_tolerance_has_teeth():
    """The weights used above make small mistakes visible: positions off by one, or a RoPE
    base off by 1%, move logits by orders of magnitude more than the tolerance."""
    d = hf_dict()
    hf = hf_model(d)
    ours = ours_from_hf(hf, d, max_seq_len=160)
    toks = tokens(64)
    ref = hf_logits(hf, toks)
    with torch.no_grad():
        ours.reset_cache()
        shifted = ours(toks, torch.arange(1, 65))
    assert maxdiff(shifted, ref) > 1e-3
    other = Decoder(replace(ours.config, rope=RopeConfig(theta=10100.0))).eval()
    other.load_state_dict(ours.state_dict())
    assert maxdiff(full(other, toks), ref) > 1e-3


CAP = 32
N = 24  # tokens per sequence


@pytest.fixture(scope="module")
def gqa_pair():
    """A GQA model with q/k/v biases (so K/V expansion and bias paths matter) and the
    transformers logits of a 24-token sequence."""
    d = hf_dict(attention_bias=True)
    hf = hf_model(d, seed=3)
    toks = tokens(N, seed=4)
    return d, hf, toks, hf_logits(hf, toks)


def test_reset_cache(gqa_pair):
    d, hf, toks, ref = gqa_pair
    model = ours_from_hf(hf, d, max_seq_len=CAP)
    with torch.no_grad():
        model(toks, torch.arange(N))
        caches = [b for name, b in model.named_buffers() if "kv_cache" in name]
        assert caches and all(c.abs().sum() > 0 for c in caches)
        model.reset_cache()
        assert all(torch.count_nonzero(c) == 0 for c in caches)
        # after a reset, a sequence decodes as on a fresh model
        other = tokens(N, seed=9)
        fresh = ours_from_hf(hf, d, max_seq_len=CAP)
        a = model(other[:, :10], torch.arange(10))
        b = fresh(other[:, :10], torch.arange(10))
        assert maxdiff(a, b) == 0.0


def test_stale_cache_slots_are_masked(gqa_pair):
    """Without a reset, slots beyond the current position (left by a longer earlier
    sequence) must not leak into attention."""
    d, hf, toks, ref = gqa_pair
    model = ours_from_hf(hf, d, max_seq_len=CAP)
    with torch.no_grad():
        model(toks, torch.arange(N))  # fills slots 0..39
        other = tokens(12, seed=5)
        a = model(other, torch.arange(12))  # overwrites 0..11; 12..39 are stale
    fresh = ours_from_hf(hf, d, max_seq_len=CAP)
    assert maxdiff(a, full(fresh, other)) <= TOL


# --------------------------------------------------------------------------- torch.export


def test_torch_export_dynamic_T(gqa_pair):
    from torch.export import Dim, export

    d, hf, toks, ref = gqa_pair
    cap = 32
    eager = ours_from_hf(hf, d, max_seq_len=cap)
    T = Dim("T", min=1, max=cap - 1)
    example = (toks[:, :4], torch.arange(4))
    with torch.no_grad():
        ep = export(eager, example, dynamic_shapes=({1: T}, {0: T}), strict=False)
    exported = ep.module()
    eager.reset_cache()
    with torch.no_grad():
        # T=5 prefill, T=1 step, then T=7 chunk: the exported cache state follows eager's
        for start, size in ((0, 5), (5, 1), (6, 7)):
            pos = torch.arange(start, start + size)
            a = eager(toks[:, start:start + size], pos)
            b = exported(toks[:, start:start + size], pos)
            assert b.shape == (1, size, VOCAB)
            assert maxdiff(a, b) <= TOL, (start, size, maxdiff(a, b))
        b = exported(toks[:, 13:14], torch.tensor([13]))
        assert maxdiff(b, ref[:, 13:14]) <= TOL  # and both follow transformers


# --------------------------------------------------------------------------- bounded logits


def test_random_weight_logits_bounded():
    """Seeded random weights (the dry-run path of every recipe) give finite, small logits
    over the whole cache, including the last slot."""
    from export import load_decoder

    model = load_decoder(recipe="tiny", max_seq_len=96, n_layers=2)
    with torch.no_grad():
        toks = tokens(96, vocab=model.config.vocab_size)
        out = full(model, toks)
        step = model(toks[:, -1:], torch.tensor([95]))
    assert torch.isfinite(out).all() and torch.isfinite(step).all()
    assert out.abs().max() < 10.0, out.abs().max()
    assert out.std() > 1e-3  # not degenerate


def test_unit_scale_logits_bounded():
    """Weights at unit activation scale (as in the tests above) also stay bounded."""
    d = hf_dict(num_hidden_layers=4)
    hf = hf_model(d, seed=7)
    ours = ours_from_hf(hf, d, max_seq_len=128)
    out = full(ours, tokens(128, seed=8))
    assert torch.isfinite(out).all()
    assert out.abs().max() < 100.0, out.abs().max()
