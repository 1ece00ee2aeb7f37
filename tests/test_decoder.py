"""The eager decoder against transformers' LlamaForCausalLM, and against itself.

* Architecture variants (MHA/GQA/MQA, tied/untied, q/k/v/o bias, head_dim != dim/heads) give
  the logits of ``transformers.LlamaForCausalLM`` with the same random weights (≤ 1e-5).
* Every ``DecoderOptions`` formulation that needs no ExecuTorch custom op gives the same
  logits, and prefill + single-token steps (and chunked prefill) equal one full forward.
* ``torch.export`` with a dynamic sequence length runs and matches eager.
* Random-weight logits stay finite and bounded.

Weights are re-randomized with a scale that makes attention sharp (q/k gain 2) and logits
O(1), so a wrong rotation, mask or cache write moves the logits far past the tolerance
(``test_tolerance_has_teeth`` checks that for an off-by-one position and a 1% RoPE base).
RoPE scaling types are compared with transformers in ``test_rope.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from dataclasses import replace

import pytest
import torch

from export.config import config_from_hf
from export.decoder import Decoder, DecoderOptions
from export.rope import RopeConfig

TOL = 1e-5
VOCAB = 256


# --------------------------------------------------------------------------- helpers (also used by test_rope / test_checkpoints)


def hf_dict(**overrides) -> dict:
    """A small HF LLaMA ``config.json`` dict (GQA 4/2, 2 layers, original context 32)."""
    d = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, hidden_act="silu")
    d.update(overrides)
    return d


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights that make every part of the model matter: unit-scale activations,
    sharp attention (q/k gain 2), non-trivial norm weights and biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.2 * torch.randn(p.shape, generator=gen)
        elif "embed_tokens" in name:
            v = 2.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen)
        else:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            v = gain / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen)
        p.copy_(v)
    return model


def hf_model(d: dict, seed: int = 0):
    """transformers' LlamaForCausalLM for config dict ``d`` with ``randomize_`` weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**copy.deepcopy(d))  # LlamaConfig rewrites rope dicts in place
    # transformers' default attention ("sdpa"); its "eager" softmax(QK^T)V differs from any
    # SDPA by float32 rounding alone (up to ~1e-5 at these logit scales)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(cfg), seed).eval()


def ours_from_hf(hf, d: dict, max_seq_len: int, options: DecoderOptions | None = None) -> Decoder:
    """Our decoder built from the same config dict, weights copied by stripping ``model.``."""
    ours = Decoder(config_from_hf(copy.deepcopy(d), max_seq_len=max_seq_len), options).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours


def tokens(n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf, toks: torch.Tensor) -> torch.Tensor:
    return hf(toks, use_cache=False).logits.float()


@torch.no_grad()
def full(model: Decoder, toks: torch.Tensor) -> torch.Tensor:
    model.reset_cache()
    return model(toks, torch.arange(toks.shape[1]))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


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


# --------------------------------------------------------------------------- formulations and the KV cache

def _valid_values(field: str) -> list[str]:
    """The values DecoderOptions accepts for ``field``, read from its own error message (so
    formulations added later are enumerated here without editing this file)."""
    with pytest.raises(ValueError) as err:
        DecoderOptions(**{field: "__probe__"})
    return [v.strip() for v in re.search(r"valid: (.*)$", str(err.value)).group(1).split(",")]


CUSTOM_OPS = {"custom_op", "custom_sdpa"}  # need ExecuTorch's kernels; tested with the ExecuTorch target
FINITE_MASK = -1e30


def _portable_options() -> list[DecoderOptions]:
    """Every combination of formulations that runs without ExecuTorch custom ops.
    ``gqa_expand`` only applies to ``attention="sdpa"`` (documented), so other attentions take
    its default; ``mask_build="arith"`` needs a finite ``mask_value``."""
    names = [f.name for f in dataclasses.fields(DecoderOptions) if f.name != "mask_value"]
    values = {n: [v for v in _valid_values(n) if v not in CUSTOM_OPS] for n in names}
    out = []
    for combo in itertools.product(*values.values()):
        kw = dict(zip(names, combo))
        if kw.get("attention") != "sdpa" and kw.get("gqa_expand") != DecoderOptions.gqa_expand:
            continue
        if kw.get("mask_build", "where") != "where":
            kw["mask_value"] = FINITE_MASK
        out.append(DecoderOptions(**kw))
    return out


PORTABLE_OPTIONS = _portable_options() + [
    DecoderOptions(mask_value=float(torch.finfo(torch.float16).min)),
    DecoderOptions(cache_update="slice", rope_lookup="slice", mask_value=-1e4),
]


def _opt_id(o: DecoderOptions) -> str:
    d = DecoderOptions()
    return "-".join(f"{v:g}" if isinstance(v, float) else str(v) for k, v in o.to_dict().items()
                    if k != "mask_value" or v != d.mask_value)


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


@pytest.mark.parametrize("opts", PORTABLE_OPTIONS, ids=_opt_id)
def test_options_prefill_decode_chunked(gqa_pair, opts):
    d, hf, toks, ref = gqa_pair
    model = ours_from_hf(hf, d, max_seq_len=CAP, options=opts)
    with torch.no_grad():
        # one full forward
        whole = full(model, toks)
        assert maxdiff(whole, ref) <= TOL, f"full forward vs transformers: {maxdiff(whole, ref)}"
        # prefill 16 tokens, then 8 single-token steps
        model.reset_cache()
        steps = [model(toks[:, :16], torch.arange(16))]
        for p in range(16, N):
            steps.append(model(toks[:, p:p + 1], torch.tensor([p])))
        inc = torch.cat(steps, dim=1)
        assert maxdiff(inc, whole) <= TOL, f"prefill+decode vs full: {maxdiff(inc, whole)}"
        # chunked prefill of uneven chunks
        model.reset_cache()
        chunks, start = [], 0
        for size in (5, 1, 11, 7):
            chunks.append(model(toks[:, start:start + size], torch.arange(start, start + size)))
            start += size
        assert start == N
        chunked = torch.cat(chunks, dim=1)
        assert maxdiff(chunked, whole) <= TOL, f"chunked prefill vs full: {maxdiff(chunked, whole)}"


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


def test_with_options_shares_weights(gqa_pair):
    d, hf, toks, ref = gqa_pair
    base = ours_from_hf(hf, d, max_seq_len=CAP)
    for opts in (DecoderOptions(cache_update="scatter", norm="matmul"),
                 DecoderOptions(cache_update="slice", attention="sdpa_gqa", rope_lookup="slice")):
        other = base.with_options(opts)
        assert other.options == opts
        assert other.layers[0].self_attn.q_proj.weight.data_ptr() == base.layers[0].self_attn.q_proj.weight.data_ptr()
        assert maxdiff(full(other, toks), ref) <= TOL
    dt = hf_dict(tie_word_embeddings=True)
    t2 = ours_from_hf(hf_model(dt), dt, max_seq_len=CAP).with_options(DecoderOptions(norm="matmul"))
    assert t2.lm_head.weight is t2.embed_tokens.weight


def test_invalid_options():
    with pytest.raises(ValueError, match="cache_update.*valid: index_copy"):
        DecoderOptions(cache_update="inplace")
    with pytest.raises(ValueError, match="attention"):
        DecoderOptions(attention="flash")
    with pytest.raises(ValueError, match="norm"):
        DecoderOptions(norm="rms")
    with pytest.raises(ValueError, match="rope_lookup"):
        DecoderOptions(rope_lookup="gather")
    with pytest.raises(ValueError, match="custom_sdpa"):
        DecoderOptions(attention="custom_sdpa")  # needs cache_update="custom_op"
    with pytest.raises(ValueError, match="custom_sdpa"):
        DecoderOptions(cache_update="custom_op")


# --------------------------------------------------------------------------- torch.export

EXPORT_OPTIONS = [
    DecoderOptions(),
    DecoderOptions(cache_update="slice", attention="sdpa_gqa", norm="matmul", rope_lookup="slice", rope_rotate="linear"),
    DecoderOptions(cache_update="scatter", gqa_expand="expand", rope_lookup="onehot", mask_build="arith",
                   mask_value=FINITE_MASK),
    DecoderOptions(attention="bmm", norm="matmul", rope_lookup="onehot", mask_build="arith", rope_rotate="linear",
                   mask_value=FINITE_MASK),
    DecoderOptions(cache_update="slice", gqa_expand="fold", rope_lookup="slice", mask_build="arith",
                   mask_value=FINITE_MASK),
]


def test_export_cases_cover_every_formulation():
    """Each portable value of each option is exported at least once below."""
    for field in (f.name for f in dataclasses.fields(DecoderOptions) if f.name != "mask_value"):
        used = {getattr(o, field) for o in EXPORT_OPTIONS}
        assert set(_valid_values(field)) - CUSTOM_OPS <= used, field


@pytest.mark.parametrize("opts", EXPORT_OPTIONS, ids=_opt_id)
def test_torch_export_dynamic_T(gqa_pair, opts):
    from torch.export import Dim, export

    d, hf, toks, ref = gqa_pair
    cap = 32
    eager = ours_from_hf(hf, d, max_seq_len=cap, options=opts)
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
