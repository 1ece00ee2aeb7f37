"""ExecuTorch target: every .pte is checked against eager PyTorch carrying the same weights.

fp32 programs must match eager to float rounding; int4 programs must match the eager model
carrying the same shared quantization *and* 8da4w's int8 dynamic activations, so what is
left is XNNPACK's kernel arithmetic. Exports come from the session-wide ``export_artifact``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np
import pytest
from helpers import model_from_hf_config
import torch

pytest.importorskip("executorch", reason="executorch is not installed")

from runtime import parity  # noqa: E402
from edgellm.artifact import read_manifest  # noqa: E402
from runtime.backend import CacheOverflowError, load  # noqa: E402
from runtime.backends.eager import EagerBackend  # noqa: E402

PROMPT = "The history of the printing press begins in"


def _gqa_scaled_rope_model():
    """An HF-config LLaMA (GQA 6/2, llama3 RoPE scaling, partial rotary) with random weights."""
    hf = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 192, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 384,
          "max_position_embeddings": 256, "rope_theta": 500000.0, "partial_rotary_factor": 0.5,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    return model_from_hf_config(hf, max_seq_len=256)


@pytest.fixture(scope="module")
def gqa_model():
    return _gqa_scaled_rope_model()


def _fp32_parity(art, loaded):
    be = load(art, threads=1)
    ref = EagerBackend.from_loaded(loaded, tokenizer=be.tokenizer)
    prompt = be.tokenizer.encode(PROMPT)
    common, cand, want = parity.greedy_prefix(be, ref, prompt, 128)
    assert common == 128, f"greedy tokens diverge at step {common}: {cand[common]} vs {want[common]}"
    stats = parity.teacher_forced(be, ref, prompt + want, len(prompt))
    print(f"{art.name}: {len(stats.rel)} steps, max |dlogit|/max|logit| = {stats.max_rel:.2e}")
    assert stats.max_rel <= 1e-4


def test_fp32_tiny_portable_matches_eager(export_artifact, tiny):
    _fp32_parity(export_artifact("executorch", "tiny", "none", "portable"), tiny)


def test_fp32_gqa_scaled_rope_fast_matches_eager(export_artifact, gqa_model):
    assert gqa_model.config.n_heads != gqa_model.config.n_kv_heads and gqa_model.config.rope.type == "llama3"
    _fp32_parity(export_artifact("executorch", gqa_model, "none", "fast"), gqa_model)


def test_fp32_gqa_scaled_rope_portable_matches_eager(export_artifact, gqa_model):
    _fp32_parity(export_artifact("executorch", gqa_model, "none", "portable"), gqa_model)


def test_int4_random_weights_bounded(export_artifact, tiny, tiny_quant):
    """int4 vs eager with the same codes/scales and 8da activations: a |dlogit| bound."""
    be = load(export_artifact("executorch", "tiny", "int4", "portable"), threads=1)
    ref = EagerBackend.from_loaded(tiny, int4=True, quantization=tiny_quant, activations=True,
                                   tokenizer=be.tokenizer)
    ids = be.tokenizer.encode(PROMPT * 4)[:48]
    stats = parity.teacher_forced(be, ref, ids, 16)
    print(f"tiny int4: max_rel {stats.max_rel:.3e}, KL {stats.mean_kl:.2e}")
    # Measured 5.7e-7 (1.3e-2 when XNNPACK re-rounded fp16 scales to bf16); a wrong code, scale or
    # group layout gives errors of the order of the logits. Slack for an activation that rounds
    # the other way at a .5 boundary.
    assert stats.max_rel <= 1e-3


@pytest.mark.parametrize("config", [None, "tied-mixed"])
def test_lowered_program_carries_shared_codes_and_scales(request, tiny, tiny_quant, config):
    """The constants of the program handed to XNNPACK are exactly the shared int4 (and int8)
    tensors."""
    from export.pipeline import ExportJob
    from export.targets.executorch.lowering import exported_program

    from export import targets

    loaded, quant = (tiny, tiny_quant) if config is None else request.getfixturevalue("int8_models")[config]
    job = ExportJob(loaded, quant, "/nonexistent", targets.get("executorch"), "portable", progress=lambda s: None)
    ep, _, names = exported_program(job)
    assert sorted(names) == sorted(quant.weights)
    state = ep.run_decompositions({}).state_dict  # the form to_edge lowers: subclass -> (qdata, scale, zero_point)
    for name, qw in quant.weights.items():
        prefix = name.rsplit(".", 1)[0] + ".parametrizations.weight.original"
        codes, scales, zeros = (state[prefix + str(i)] for i in range(3))
        assert torch.equal(codes, qw.codes), f"{name}: codes differ from the shared quantization"
        assert torch.equal(scales, qw.scales), f"{name}: scales differ from the shared quantization"
        assert not zeros.any()


def test_xnnpack_8da4w_linear_is_the_reference_arithmetic():
    """One 8da4w Linear through XNNPACK equals the eager fake-quant reference to float rounding.

    XNNPACK stores blockwise scales as bf16; scales off that grid were rounded a second time
    inside the lowering (~0.2 % per group, 9 points of SmolLM2 top-1). This pins the contract."""
    from executorch.runtime import Runtime
    from torch import nn

    from edgellm.quantization import fake_quantize_activation, quantize_weight
    from export.targets.executorch.lowering import intx_tensor, lower_program

    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(96, 128, generator=g) * 0.05, 32)
    lin = nn.Linear(128, 96, bias=False)
    lin.weight = nn.Parameter(intx_tensor(qw, activations=True), requires_grad=False)
    x = torch.randn(5, 128, generator=g) * 2
    et, census = lower_program(torch.export.export(lin, (x,), strict=False), {})
    assert census["delegates"] == 1 and not census["outside"], census
    out = Runtime.get().load_program(et.buffer).load_method("forward").execute([x])[0]
    ref = fake_quantize_activation(x) @ qw.dequantize().T
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"XNNPACK 8da4w differs from the reference arithmetic: {rel:.2e}"


def test_xnnpack_takes_unbacked_sizes_only_when_they_cannot_be_empty():
    """The portable flavour's filled length (1 <= n <= capacity) passes the narrowed check, a size
    that may be 0 is still refused, and the library's own check is back after the context."""
    import executorch.backends.xnnpack.partition.config.xnnpack_config as config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from export.targets.executorch.filled_length import xnnpack_takes_filled_lengths

    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        filled, maybe = env.create_unbacked_symint(), env.create_unbacked_symint()
        torch._check(filled >= 1), torch._check(filled <= 64), torch._check(maybe >= 0), torch._check(maybe <= 64)
        nonempty, may_be_empty, static = torch.empty(3, filled, 8), torch.empty(3, maybe, 8), torch.empty(3, 5, 8)
    refuses = config.has_free_unbacked_symbols
    assert [refuses(t) for t in (nonempty, may_be_empty, static)] == [True, True, False]
    with xnnpack_takes_filled_lengths():
        assert [config.has_free_unbacked_symbols(t) for t in (nonempty, may_be_empty, static)] == [False, True, False]
    assert config.has_free_unbacked_symbols is refuses


def test_scales_off_the_bf16_grid_are_refused():
    from edgellm.quantization import quantize_weight
    from export.targets.executorch.lowering import intx_tensor

    qw = quantize_weight(torch.randn(8, 64), 32)
    qw.scales = qw.scales * (1 + 2.0 ** -10)  # fp16-exact is not enough
    with pytest.raises(ValueError, match="bf16"):
        intx_tensor(qw, activations=True)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2, smollm2_quant):
    return EagerBackend.from_loaded(smollm2, int4=True, quantization=smollm2_quant, activations=True)


@pytest.fixture(scope="module")
def smollm2_forced(smollm2_ref, heldout_text):
    """Teacher-forced ids, the 8da4w reference's logits on them, and its noise floor."""
    ids = smollm2_ref.tokenizer.encode(heldout_text)[:160]
    ref_logits = parity.all_logits(smollm2_ref, ids, 32)
    return ids, ref_logits, parity.noise_floor(smollm2_ref, ids, 32, ref_logits)


@pytest.mark.parametrize("flavour", ["portable", "fast"])
@pytest.mark.slow
def test_smollm2_int4_agrees_with_eager_8da4w(export_artifact, smollm2_ref, smollm2_quant, smollm2_forced, flavour):
    """Agreement with the eager model carrying the same codes, scales and 8da activations.

    The issue's goal (top-1 >= 99 %, mean KL <= 1e-3) is below this reference's own noise
    floor: perturbing its embeddings by 1e-7 (relative) moves it by top-1 ~88-93 %, KL ~5e-2,
    because per-token int8 activations flip rounding decisions that cascade through 30
    layers. Every Linear of the .pte matches the reference to 1e-6 on its own (see
    test_xnnpack_8da4w_linear_is_the_reference_arithmetic); the artifact is held to the floor."""
    art = export_artifact("executorch", "smollm2", "int4", flavour)
    # The export may come from the other test worker: it must carry this reference's codes.
    assert read_manifest(art)["quantization"]["sha256"] == smollm2_quant.summary()["sha256"]
    be = load(art, threads=1)
    tok = be.tokenizer
    ids, ref_logits, floor = smollm2_forced
    stats = parity.compare_logits(parity.all_logits(be, ids, 32), ref_logits)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                        allow_special=True)
    common, cand, want = parity.greedy_prefix(be, smollm2_ref, prompt, 32)
    print(f"smollm2 int4 {flavour}: top-1 {stats.top1_rate:.4f}, mean KL {stats.mean_kl:.2e} "
          f"(reference noise floor: top-1 {floor.top1_rate:.4f}, KL {floor.mean_kl:.2e}), "
          f"greedy {common}/32: {tok.decode(cand)!r}")
    assert stats.top1_rate >= min(0.99, floor.top1_rate - 0.05), stats.top1_rate
    assert stats.mean_kl <= max(1e-3, 2 * floor.mean_kl), stats.mean_kl
    # The answer, up to the end-of-turn token, must be identical; after it the model writes a new
    # turn from nothing (the most uncertain tokens there are), where int8 activations may pick
    # another near-tie.
    answer = next((i + 1 for i, t in enumerate(want) if t in tok.eos_ids), len(want))
    assert common >= min(24, answer), f"greedy diverges at {common}: {tok.decode(cand)!r} vs {tok.decode(want)!r}"


@pytest.mark.slow
def test_smollm2_int4_perplexity(export_artifact, smollm2, smollm2_ref, heldout_text):
    """Within 2 % of the 8da4w reference plus twice the reference's own spread: one rounding moves
    this reference's perplexity by percents (embeddings perturbed by 1e-7: -1.3 % to +1.4 % over
    four seeds; fed one token at a time instead of in one call: +2.5 %), and the .pte computes
    in 128-token calls with XNNPACK's roundings (+1.7 % portable, +3.3 % fast measured here)."""
    ids = smollm2_ref.tokenizer.encode(heldout_text)[:512]
    ref = parity.perplexity(smollm2_ref, ids)
    spread = 0.0
    for seed in range(3):
        with smollm2_ref.perturbed(1e-7, seed=seed):
            spread = max(spread, abs(parity.perplexity(smollm2_ref, ids) / ref - 1))
    fp32 = parity.perplexity(EagerBackend.from_loaded(smollm2, tokenizer=smollm2_ref.tokenizer), ids)
    for flavour in ("portable", "fast"):
        ppl = parity.perplexity(load(export_artifact("executorch", "smollm2", "int4", flavour), threads=1), ids)
        print(f"perplexity ({len(ids) - 1} tokens): eager fp32 {fp32:.3f}, eager int4-8da {ref:.3f} (spread under "
              f"perturbation {spread * 100:.2f} %), executorch int4 {flavour} {ppl:.3f} "
              f"({(ppl / ref - 1) * 100:+.2f}% vs eager int4)")
        assert math.isfinite(ppl) and abs(ppl / ref - 1) <= 0.02 + 2 * spread


@pytest.mark.slow
def test_text_llm_runner_generates_our_greedy_tokens(export_artifact):
    """ExecuTorch's own TextLLMRunner (C++ runner + tokenizer.json) reproduces our generation."""
    runner_mod = pytest.importorskip("executorch.extension.llm.runner", reason="wheel without the LLM runner")
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401

    art = export_artifact("executorch", "smollm2", "int4", "portable")
    manifest = read_manifest(art)
    be = load(art, threads=1)
    text = "The capital of France is"
    ours = parity.greedy_tokens(be, be.tokenizer.encode(text), 24)
    pieces: list[str] = []
    runner = runner_mod.TextLLMRunner(str(art / manifest["artifact"]), str(art / manifest["executorch"]["runner_tokenizer"]))
    runner.generate(text, runner_mod.GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0),
                    token_callback=pieces.append)
    theirs = "".join(pieces)
    print(f"ours {be.tokenizer.decode(ours)!r}\nrunner {theirs!r}")
    assert len(pieces) >= 20 and be.tokenizer.decode(ours).startswith(theirs)


def test_tokenizer_json_encodes_like_the_shared_tokenizer(export_artifact, heldout_text):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers not installed")
    art = export_artifact("executorch", "tiny", "none", "portable")
    be = load(art)
    hf = tokenizers.Tokenizer.from_file(str(art / "tokenizer.json"))
    for text in (heldout_text[:20000], "x 12345 <|im_start|>user\nHi 2024!<|im_end|>\n\n  é 😀"):
        assert hf.encode(text, add_special_tokens=False).ids == be.tokenizer.encode(text, allow_special=True)


def test_capacity_errors_are_clear(export_artifact):
    be = load(export_artifact("executorch", "tiny", "none", "portable"), threads=1)
    cap = be.max_seq_len
    with pytest.raises(CacheOverflowError, match="exceeds the KV cache capacity"):
        be.prefill([5] * (cap + 1))
    be.reset()
    logits = be.prefill([5] * (cap - 1))
    assert np.isfinite(logits).all()
    be.decode(6)  # fills the last slot
    with pytest.raises(CacheOverflowError, match="re-export with a larger --max-seq-len"):
        be.decode(7)


def test_threadpool_resize_after_load_is_a_clear_error(export_artifact):
    """XNNPACK delegates keep the pool they were built with; a later resize frees it. The backend
    refuses to run instead of touching freed memory, and a fresh load works."""
    from runtime.backends.executorch import pool_size, set_threads

    art = export_artifact("executorch", "tiny", "none", "portable")
    be = load(art, threads=1)
    be.prefill([5, 6])
    set_threads(2)
    try:
        with pytest.raises(RuntimeError, match="threadpool was resized from 1 to 2"):
            be.decode(7)
        del be
        again = load(art, threads=2)
        assert pool_size() == 2 and np.isfinite(again.prefill([5, 6])).all()
    finally:
        set_threads(1)


@pytest.mark.slow
def test_manifest_records_flavour_and_delegation(export_artifact):
    for model, quant, flavour in (("smollm2", "int4", "portable"), ("tiny", "none", "fast")):
        m = read_manifest(export_artifact("executorch", model, quant, flavour))
        assert m["flavour"] == m["executorch"]["flavour"] == flavour
        assert [t["name"] for t in m["transforms"]][-1] == ("executorch_llm_ops" if flavour == "fast"
                                                             else "mask_filled_from_positions")
        outside = m["executorch"]["delegation"]["outside"]
        if flavour == "portable":  # attention over the filled slots, inside XNNPACK (filled_length.py)
            assert not {"bmm.out", "_softmax.out"} & set(outside), outside
            assert "_local_scalar_dense.default" in outside and "slice_copy.Tensor_out" in outside, outside
        assert m["name"].endswith(f"-executorch-{'int4' if quant == 'int4' else 'fp32'}-{flavour}")
        custom = [op for op in m["executorch"]["delegation"]["outside"]
                  if "custom_sdpa" in op or "update_cache" in op]
        assert bool(custom) == (flavour == "fast"), f"{flavour}: custom ops outside delegates: {custom}"
        if quant == "int4":  # the SmolLM2 default: int4 linears, int8 k/v, first/last layer and tied head
            et = m["executorch"]
            assert (et["linear_scheme"], et["head_scheme"], et["embedding_scheme"]) == \
                ("8da4w+8da8w", "8da8w", "embedding_byte")


@pytest.mark.parametrize("flavour", ["portable", "fast"])
def test_lean_lowering_writes_the_same_program(tiny, tiny_quant, flavour, monkeypatch):
    """Skipping XNNPACK's retraces of unchanged partitions (and the per-partition recompiles of
    the program) leaves the .pte byte-identical, and it is active on the pinned executorch (else
    it would silently cost the time it saves)."""
    import contextlib

    from export import targets
    from export.pipeline import ExportJob
    from export.targets.executorch import lean_lowering, lowering

    job = ExportJob(tiny, tiny_quant, "/nonexistent", targets.get("executorch"), flavour, progress=lambda s: None)

    def pte() -> bytes:
        ep, _, _ = lowering.exported_program(job)
        return lowering.lower_program(ep, lowering.constant_methods(job), job.flavour.options["partitioners"])[0].buffer

    with lean_lowering.lean_lowering() as active, lean_lowering.partitions_recompiled_once() as once:
        assert active and once, "lean_lowering is off: executorch is not the version it was checked against"
    lean = pte()
    monkeypatch.setattr(lowering, "lean_lowering", contextlib.nullcontext)
    monkeypatch.setattr(lowering, "partitions_recompiled_once", contextlib.nullcontext)
    assert pte() == lean


@pytest.mark.parametrize("config,flavour", [(None, "portable"), (None, "fast"), ("tied-mixed", "portable")])
def test_placeholder_codes_write_the_same_program(tiny, config, flavour, monkeypatch):
    """The memory-lean lowering -- linear codes traced as placeholders and unpacked at XNNPACK's
    read of each (the shared weight released after it), preprocess copies sharing constants --
    writes the .pte that real codes and deep copies write, and every placeholder is read. Also
    with int8 (``INT8_CONFIGS``): a tied int8 head's placeholder stands for the codes the
    embedding holds, and releasing the shared weight leaves the embedding's."""
    import contextlib

    from export import targets
    from export.pipeline import ExportJob, quantize_for
    from export.targets.executorch import lowering
    from export.targets.executorch.lazy_codes import LazyCodes

    loaded = tiny if config is None else _requantized(tiny, INT8_CONFIGS[config][0], **INT8_CONFIGS[config][1])
    quant = quantize_for(loaded, "int4", progress=lambda s: None)  # its own: this test releases it
    job = ExportJob(loaded, quant, "/nonexistent", targets.get("executorch"), flavour, progress=lambda s: None)
    args = (lowering.constant_methods(job), job.flavour.options["partitioners"])
    with monkeypatch.context() as m:
        m.setattr(lowering, "constants_shared_with_preprocess", contextlib.nullcontext)
        plain = lowering.lower_program(lowering.exported_program(job)[0], *args)[0].buffer
    summary = quant.summary()
    lazy = LazyCodes(release=True)
    lean = lowering.lower_program(lowering.exported_program(job, lazy)[0], *args, lazy)[0].buffer
    assert lean == plain
    linears = [n for n in quant.weights if n != "embed_tokens.weight"]
    assert lazy.packed == len(linears) and all(quant.weights[n].packed is None for n in linears)
    assert quant.summary() == summary  # the manifest's, from before the release


@pytest.mark.parametrize("flavour", ["portable", "fast"])
def test_lean_edge_writes_the_same_program(tiny, tiny_quant, flavour, monkeypatch):
    """Skipping the edge conversion's decompositions and pass retraces that cannot change the
    program leaves the .pte byte-identical, and the skips happen on the pinned executorch."""
    import contextlib

    from torch.export.exported_program import ExportedProgram

    from export import targets
    from export.pipeline import ExportJob
    from export.targets.executorch import lean_edge, lowering

    job = ExportJob(tiny, tiny_quant, "/nonexistent", targets.get("executorch"), flavour, progress=lambda s: None)

    def pte() -> bytes:
        ep, _, _ = lowering.exported_program(job)
        return lowering.lower_program(ep, lowering.constant_methods(job), job.flavour.options["partitioners"])[0].buffer

    skipped, retraces = [], []
    fixed_point, may_rewrite = lean_edge._fixed_point, lean_edge._may_rewrite
    monkeypatch.setattr(lean_edge, "_fixed_point", lambda *a: skipped.append("decomposition") or True
                        if fixed_point(*a) else False)
    monkeypatch.setattr(lean_edge, "_may_rewrite", lambda *a: may_rewrite(*a) or skipped.append(type(a[0]).__name__))
    run_decompositions = ExportedProgram.run_decompositions  # what lean_edge's patch calls through to
    monkeypatch.setattr(ExportedProgram, "run_decompositions",
                        lambda self, table=None, *a: retraces.append((self, table)) or run_decompositions(self, table, *a))
    exported = lowering.exported_program
    monkeypatch.setattr(lowering, "exported_program", lambda *a: (out := exported(*a)) and retraces.append(out[0]) or out)
    lean = pte()
    assert {"decomposition", "NormalizeTransposePass", "SymToTensorPass", "RemoveMixedTypeOperators"} <= set(skipped), \
        skipped
    traced = [table for ep, table in retraces[1:] if ep is retraces[0]]  # (XNNPACK's pattern graphs have their own)
    assert len(traced) == 1 and traced[0], "the functionalization is not merged into the decomposition"
    monkeypatch.setattr(lowering, "lean_edge", contextlib.nullcontext)
    assert pte() == lean


# ---- int8 weights: 8da8w linears (XNNPACK qd8-f32-qc8w) and embedding_byte ----

def _pte_contents(pte: bytes):
    """A .pte's stored tensors: (named data key -> bytes, the program's constant buffers as bytes,
    every XNNPACK delegate's graph as JSON decoded from its flatbuffer with the backend's schema)."""
    import json
    import re
    import tempfile
    from pathlib import Path

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader, _get_schema_bytes
    from executorch.exir._serialize._flatbuffer import _flatc_decompile
    from executorch.exir._serialize._program import deserialize_pte_binary

    f = deserialize_pte_binary(bytes(pte))
    named = {k: bytes(f.named_data.buffers[e.buffer_index]) for k, e in f.named_data.pte_data.items()}
    constants = [bytes(b.storage) for b in f.program.constant_buffer]
    graphs = []
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "schema.fbs").write_bytes(_get_schema_bytes())
        for i, blob in enumerate(f.program.backend_delegate_data):
            h = XNNHeader.from_bytes(blob.data[:XNNHeader.EXPECTED_LENGTH])
            (Path(d) / f"g{i}.bin").write_bytes(blob.data[h.flatbuffer_offset:h.flatbuffer_offset + h.flatbuffer_size])
            _flatc_decompile(d, str(Path(d) / "schema.fbs"), str(Path(d) / f"g{i}.bin"))
            text = (Path(d) / f"g{i}.json").read_text()  # flatc writes bare inf / nan (clamp bounds)
            graphs.append(json.loads(re.sub(r'(:\s*)(-?(?:inf|nan))\b', r'\1"\2"', text)))
    return named, constants, graphs


def _fully_connected_filters(graphs) -> Counter:
    """(filter datatype, its quantization, input datatype) of every XNNPACK fully-connected node."""
    out = Counter()
    for g in graphs:
        values = {v["xvalue_union"].get("tensor_value", v["xvalue_union"])["id_out"]: v["xvalue_union"]
                  for v in g["xvalues"]}
        for node in g["xnodes"]:
            if node["xnode_union_type"] == "XNNFullyConnected":
                w, x = values[node["xnode_union"]["filter_id"]], values[node["xnode_union"]["input1_id"]]
                out[(w.get("tensor_value", w)["datatype"], w.get("quant_params_type"),
                     x.get("tensor_value", x)["datatype"])] += 1
    return out


QC8W = ("xnn_datatype_qcint8", "PerChannelQuant", "xnn_datatype_qdint8")  # qd8-f32-qc8w
QB4W = ("xnn_datatype_qbint4", "PerChannelGroupQuant", "xnn_datatype_qdint8")  # qd8-f32-qb4w


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _assert_int8_stored(pte: bytes, quant, linears: list[str], embedding: str | None = None):
    """Each int8 linear's codes and fp32 scales are XNNPACK named data, bit for bit, under the
    key XNNPACK derives from their bytes; the int8 embedding's are program constants."""
    named, constants, graphs = _pte_contents(pte)
    for name in linears:
        qw = quant.weights[name]
        assert named.get(_sha(qw.codes)) == qw.codes.numpy().tobytes(), f"{name}: int8 codes not stored as is"
        assert named.get("scale_" + _sha(qw.scales)) == qw.scales.numpy().tobytes(), f"{name}: scales differ"
    if embedding is not None:
        qw = quant.weights[embedding]
        assert qw.codes.numpy().tobytes() in constants, "embedding codes not a program constant as is"
        assert qw.scales.numpy().tobytes() in constants, "embedding scales not a program constant as is"
    return _fully_connected_filters(graphs)


def test_xnnpack_8da8w_linear_is_qc8w_and_the_reference_arithmetic():
    """One int8 Linear: delegated as XNNPACK's qd8-f32-qc8w fully-connected (per-token dynamic
    int8 activations, per-channel int8 weights), its codes and scales stored bit for bit, its
    output the eager reference's (int8-token-asym fake-quant, dequantized weight)."""
    from executorch.runtime import Runtime
    from torch import nn

    from edgellm.quantization import Quantization, fake_quantize_activation, quantize_weight
    from edgellm.recipes import QuantConfig
    from export.targets.executorch.lowering import intx_tensor, lower_program

    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(96, 128, generator=g) * 0.05, 32, bits=8)
    lin = nn.Linear(128, 96, bias=False)
    lin.weight = nn.Parameter(intx_tensor(qw, activations=True), requires_grad=False)
    x = torch.randn(5, 128, generator=g) * 2
    et, census = lower_program(torch.export.export(lin, (x,), strict=False), {})
    assert census["delegates"] == 1 and not census["outside"], census
    fc = _assert_int8_stored(et.buffer, Quantization(QuantConfig(), {"weight": qw}), ["weight"])
    assert fc == Counter({QC8W: 1}), fc
    out = Runtime.get().load_program(et.buffer).load_method("forward").execute([x])[0]
    ref = fake_quantize_activation(x) @ qw.dequantize().T
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"XNNPACK 8da8w differs from the reference arithmetic: {rel:.2e}"  # measured 3.7e-7


def _requantized(loaded, tied: bool = False, **quant):
    """``loaded`` under another recipe quantization (and, ``tied``, with its embedding as head)."""
    from dataclasses import replace

    from edgellm.model import LoadedModel, seeded_model
    from edgellm.recipes import QuantConfig

    recipe = replace(loaded.recipe, quantization=QuantConfig(**{**vars(loaded.recipe.quantization), **quant}))
    if tied:
        return seeded_model(recipe, replace(loaded.config, tie_embeddings=True))
    return LoadedModel(recipe, loaded.config, loaded.weights)


# name -> (tied, quantization): untied int8 embedding (+ its int8 head); every linear int8 beside
# an int4 embedding and a float head; tied int8 embedding/head with one int4 layer made int8.
INT8_CONFIGS = {
    "embedding": (False, {"embedding": "int8"}),
    "linears": (False, {"linears": "int8", "embedding": "int4", "head": "float"}),
    "tied-mixed": (True, {"embedding": "int8", "overrides": {"layers.1.mlp.*": "int8"}}),
}


@pytest.fixture(scope="module")
def int8_models(tiny):
    from export.pipeline import quantize_for

    out = {}
    for name, (tied, quant) in INT8_CONFIGS.items():
        loaded = _requantized(tiny, tied, **quant)
        out[name] = loaded, quantize_for(loaded, progress=lambda s: None)
    return out


@pytest.mark.parametrize("config,flavour", [("embedding", "portable"), ("linears", "fast"),
                                            ("tied-mixed", "portable")])
def test_int8_tiny_matches_eager_and_stores_the_shared_codes(export_artifact, int8_models, config, flavour):
    """A tiny export with int8 weights runs, matches the eager model carrying the same codes and
    int8 activations within the int4 bound, carries every int8 code and scale bit for bit, and
    runs every quantized linear in XNNPACK (qc8w for int8, qb4w for int4)."""
    loaded, quant = int8_models[config]
    art = export_artifact("executorch", loaded, "int4", flavour, quantization=quant)
    m = read_manifest(art)["executorch"]
    be = load(art, threads=1)
    ref = EagerBackend.from_loaded(loaded, int4=True, quantization=quant, activations=True, tokenizer=be.tokenizer)
    stats = parity.teacher_forced(be, ref, be.tokenizer.encode(PROMPT * 4)[:48], 16)
    print(f"tiny int8 {config} {flavour}: max_rel {stats.max_rel:.3e}, KL {stats.mean_kl:.2e}")
    assert stats.max_rel <= 1e-3  # as test_int4_random_weights_bounded (measured 6-7e-7)

    bits = {n: qw.bits for n, qw in quant.weights.items()}
    linears8 = sorted(n for n, b in bits.items() if b == 8 and n != "embed_tokens.weight")
    emb = "embed_tokens.weight" if bits.get("embed_tokens.weight") == 8 else None
    fc = _assert_int8_stored((art / read_manifest(art)["artifact"]).read_bytes(), quant, linears8, emb)
    n4 = sum(b == 4 for n, b in bits.items() if n != "embed_tokens.weight")
    quantized_fc = Counter({k: v for k, v in fc.items() if k[0] != "xnn_datatype_fp32"})  # fp32: norms, rope
    assert quantized_fc == Counter({k: v for k, v in ((QC8W, len(linears8)), (QB4W, n4)) if v}), fc
    outside = m["delegation"]["outside"]
    gather = "embedding_byte.out" if emb else "embedding_4bit.out"
    assert outside.get(gather) == 1 and not {"embedding_byte.out", "embedding_4bit.out", "embedding.out"} - {gather} \
        & set(outside), outside
    assert not [op for op in outside if "linear" in op or "mm" in op or "quantize" in op], outside
    scheme = {4: "8da4w", 8: "8da8w"}
    expect_head = scheme[bits["lm_head.weight"]] if "lm_head.weight" in bits else "fp32"
    assert (m["head_scheme"], m["embedding_scheme"], m["activation_scheme"]) == (
        expect_head, "embedding_byte" if emb else "embedding_4bit", "int8-token-asym"), m
    assert m["linear_scheme"] == "+".join(sorted({scheme[b] for n, b in bits.items()
                                                  if n not in ("embed_tokens.weight", "lm_head.weight")}))


@pytest.mark.parametrize("flavour", ["portable", "fast"])
def test_planned_memory_is_one_prefill_chunk_not_the_capacity(export_artifact, flavour):
    """ExecuTorch allocates (and zero-fills) a method's planned activations when it loads it, at
    the upper bound of every dynamic size: a program taking capacity - 1 tokens a call kept a
    whole-cache prefill's logits resident (XGen-7B's width, one layer, 8K slots: 2.48 GB planned,
    4.1 GB run RSS; 0.68 GB / 1.9 GB at 128 tokens a call). The .pte takes ``prefill_chunk``
    tokens a call; a longer prompt is prefilled in chunks with the same logits as eager."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from export.targets.executorch.lowering import PREFILL_CHUNK

    loaded = _long_tiny()
    art = export_artifact("executorch", loaded, "none", flavour)
    m = read_manifest(art)
    assert m["executorch"]["dynamic_tokens"] == [1, PREFILL_CHUNK] < [1, loaded.config.max_chunk]
    program = deserialize_pte_binary((art / m["artifact"]).read_bytes())
    plan = next(p for p in getattr(program, "program", program).execution_plan if p.name == "forward")
    planned = sum(plan.non_const_buffer_sizes)
    one_chunk_logits = PREFILL_CHUNK * loaded.config.vocab_size * 4
    print(f"planned {planned / 1e6:.1f} MB: cache {loaded.config.kv_cache_bytes() / 1e6:.1f} MB, "
          f"a chunk's logits {one_chunk_logits / 1e6:.1f} MB")
    assert planned <= loaded.config.kv_cache_bytes() + 3 * one_chunk_logits  # was 201 MB of logits alone
    be = load(art, threads=1)
    ref = EagerBackend.from_loaded(loaded, tokenizer=be.tokenizer)
    prompt = [(7 * i) % 4000 + 5 for i in range(3 * PREFILL_CHUNK + 5)]
    stats = parity.compare_logits(be.forward_all(prompt), ref.forward_all(prompt))
    assert stats.max_rel <= 1e-4 and be.pos == len(prompt)


@pytest.mark.parametrize("flavour", ["portable", "fast"])
def test_the_cache_is_planned_once(flavour):
    """The cache is written in place and returned as a buffer mutation; executorch 1.5.1 planned
    those outputs as tensors of their own, a second whole cache in the arena the runtime allocates
    and zero-fills at load (2.0 GB of the 7B .pte's run RSS at 2048 slots; ``memory_plan.py``).
    Eight layers, a small vocabulary: the cache dominates what is planned."""
    from export import targets
    from export.pipeline import ExportJob
    from export.targets.executorch import lowering

    hf = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 8,
          "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
          "max_position_embeddings": 1024}
    loaded = model_from_hf_config(hf, max_seq_len=1024)
    job = ExportJob(loaded, None, "/nonexistent", targets.get("executorch"), flavour, progress=lambda s: None)
    ep, _, _ = lowering.exported_program(job)
    et, _ = lowering.lower_program(ep, lowering.constant_methods(job), job.flavour.options["partitioners"])
    planned = sum(et.executorch_program.execution_plan[0].non_const_buffer_sizes)
    cfg = loaded.config
    cache, per_layer = cfg.kv_cache_bytes(), cfg.kv_cache_bytes() // cfg.n_layers
    chunk = lowering.prefill_chunk(cfg)
    print(f"{flavour}: planned {planned} bytes, cache {cache}, one layer's cache {per_layer}")
    # the cache, the filled slots attention copies of one layer's k and v, and a chunk's
    # activations: scores and mask rows over the capacity, logits
    assert planned <= cache + 2 * per_layer + 4 * chunk * cfg.max_seq_len * 4 + 3 * chunk * cfg.vocab_size * 4


@functools.cache
def _long_tiny():
    """The tiny model with a cache of 1024 slots: longer than one prefill chunk."""
    from edgellm.model import resolve_model

    return resolve_model(recipe="tiny", max_seq_len=1024)
