"""Each source transform against the canonical decoder, and each target flavour's whole list.

A transform replaces one seam of ``edgellm.decoder.Decoder`` with a target's formulation of
the same math; here each one (after the transforms it builds on) must give the canonical
logits for a full forward, prefill + single-token steps and an uneven chunked prefill, and
every registered flavour's ordered list must also survive ``torch.export`` with a dynamic
sequence length. The models are small HF LLaMAs with GQA and q/k/v biases (see ``helpers``).
"""

from __future__ import annotations

import pytest
import torch

from export import targets
from export import transforms as tr
from export.transforms import Transform
from helpers import TOL, VOCAB, full, hf_dict, hf_logits, hf_model, maxdiff, ours_from_hf, tokens

CAP, N = 32, 24
FINITE = -1e30

# transform -> the list that exercises it (prerequisites first)
SINGLE = {
    "rmsnorm_as_matmul": [Transform("rmsnorm_as_matmul")],
    "rope_rows_onehot": [Transform("rope_rows_onehot")],
    "rope_rows_slice": [Transform("rope_rows_slice")],
    "rope_rotate_linear": [Transform("rope_rotate_linear")],
    "rope_rotate_linear-after-onehot": [Transform("rope_rows_onehot"), Transform("rope_rotate_linear")],
    "mask_arithmetic": [Transform("mask_arithmetic", {"value": FINITE})],
    "attention_folded_bmm": [Transform("mask_arithmetic", {"value": FINITE}), Transform("attention_folded_bmm")],
    "attention_folded_bmm-where-mask": [Transform("attention_folded_bmm")],
    "mask_filled_from_positions": [Transform("mask_filled_from_positions")],
    "attention_expand_kv": [Transform("attention_expand_kv")],
    "attention_gqa": [Transform("attention_gqa")],
    "cache_slice": [Transform("cache_slice")],
    "cache_scatter": [Transform("cache_scatter")],
    "executorch_llm_ops": [Transform("executorch_llm_ops")],
}
FLAVOURS = {f"{name}:{f.name}": list(f.transforms) for name in targets.names() for f in targets.get(name).flavours}


@pytest.fixture(scope="module")
def gqa_pair():
    d = hf_dict(attention_bias=True)
    hf = hf_model(d, seed=3)
    toks = tokens(N, seed=4)
    return d, hf, toks, hf_logits(hf, toks)


def test_every_transform_is_exercised():
    used = {t.name for ts in SINGLE.values() for t in ts}
    assert used == set(tr.TRANSFORMS), set(tr.TRANSFORMS) ^ used


def _incremental(model, toks, sizes):
    model.reset_cache()
    out, start = [], 0
    for size in sizes:
        out.append(model(toks[:, start:start + size], torch.arange(start, start + size)))
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", list(SINGLE) + list(FLAVOURS))
@torch.no_grad()
def test_same_logits_as_canonical(gqa_pair, case):
    d, hf, toks, ref = gqa_pair
    model = ours_from_hf(hf, d, max_seq_len=CAP, transforms=SINGLE.get(case) or FLAVOURS[case])
    assert [t["name"] for t in model.transforms] == [t.name for t in (SINGLE.get(case) or FLAVOURS[case])]
    whole = full(model, toks)
    assert maxdiff(whole, ref) <= TOL, f"full forward vs transformers: {maxdiff(whole, ref)}"
    assert maxdiff(_incremental(model, toks, [16] + [1] * 8), whole) <= TOL
    assert maxdiff(_incremental(model, toks, [5, 1, 11, 7]), whole) <= TOL


@torch.no_grad()
def test_transforms_share_parameters(gqa_pair):
    d, hf, toks, ref = gqa_pair
    base = ours_from_hf(hf, d, max_seq_len=CAP)
    params = {n: p.data_ptr() for n, p in base.named_parameters()}
    tr.apply(base, FLAVOURS["executorch:portable"])
    assert {n: p.data_ptr() for n, p in base.named_parameters()} == params
    dt = hf_dict(tie_word_embeddings=True)
    tied = ours_from_hf(hf_model(dt), dt, max_seq_len=CAP, transforms=FLAVOURS["executorch:portable"])
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_bad_transform_lists_are_refused(gqa_pair):
    d, hf, _, _ = gqa_pair
    model = ours_from_hf(hf, d, max_seq_len=CAP)
    with pytest.raises(ValueError, match="unknown source transform 'flash'"):
        tr.apply(model, [Transform("flash")])
    tr.apply(model, [Transform("cache_slice")])
    with pytest.raises(ValueError, match="no KVCache left to replace"):
        tr.apply(model, [Transform("cache_scatter")])
    with pytest.raises(ValueError, match="finite"):
        tr.apply(model, [Transform("mask_arithmetic", {"value": float("-inf")})])


@pytest.mark.parametrize("case", list(FLAVOURS))
def test_flavour_exports_with_dynamic_length(gqa_pair, case):
    from torch.export import Dim, export

    d, hf, toks, ref = gqa_pair
    eager = ours_from_hf(hf, d, max_seq_len=CAP, transforms=FLAVOURS[case])
    T = Dim("T", min=1, max=CAP - 1)
    with torch.no_grad():
        ep = export(eager, (toks[:, :4], torch.arange(4)), dynamic_shapes=({1: T}, {0: T}), strict=False)
    exported = ep.module()
    eager.reset_cache()
    with torch.no_grad():
        for start, size in ((0, 5), (5, 1), (6, 7)):
            pos = torch.arange(start, start + size)
            a, b = eager(toks[:, start:start + size], pos), exported(toks[:, start:start + size], pos)
            assert b.shape == (1, size, VOCAB)
            assert maxdiff(a, b) <= TOL, (start, size, maxdiff(a, b))
        assert maxdiff(exported(toks[:, 13:14], torch.tensor([13])), ref[:, 13:14]) <= TOL
