"""The generation loop, the parity harness and the artifact contract, on the eager backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import CacheOverflowError, SamplingConfig, generate, load
from runtime.generate import sample_next
from runtime.parity import run_parity


@pytest.fixture(scope="module")
def tiny_eager():
    return load("eager:tiny", max_seq_len=64)


def test_parity_of_a_backend_with_itself_is_exact(tiny_eager):
    report = run_parity({"same": load("eager:tiny", max_seq_len=64)}, tiny_eager, steps=6,
                        text="We the People of the United States, in Order to form a more perfect Union")
    row = report.rows[0]
    assert row.max_abs == 0 and row.top1 == 1.0 and row.mean_kl == 0.0
    assert row.greedy_common == row.greedy_n == 6 * 3 and row.ppl_ratio == 1.0
    assert json.loads(json.dumps(report.to_json()))["rows"][0]["candidate"] == "same"


def test_parity_sees_a_different_model(tiny_eager):
    other = load("eager:tiny", max_seq_len=64, seed=1)
    row = run_parity({"other": other}, tiny_eager, steps=4).rows[0]
    assert row.max_abs > 1e-3 and row.mean_kl > 0


def test_prompt_plus_generation_beyond_the_cache_is_a_clear_error(tiny_eager):
    with pytest.raises(CacheOverflowError, match="KV cache capacity 64"):
        generate(tiny_eager, list(range(10, 60)), SamplingConfig(max_new_tokens=20))
    with pytest.raises(CacheOverflowError):
        tiny_eager.reset()
        tiny_eager.prefill(list(range(1, 66)))


def test_greedy_is_deterministic_and_sampling_follows_the_seed(tiny_eager):
    ids = list(range(100, 110))
    a = generate(tiny_eager, ids, SamplingConfig(max_new_tokens=8, stop_at_eos=False)).tokens
    b = generate(tiny_eager, ids, SamplingConfig(max_new_tokens=8, stop_at_eos=False)).tokens
    assert a == b and len(a) == 8
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3, stop_at_eos=False)
    s1, s2 = generate(tiny_eager, ids, cfg).tokens, generate(tiny_eager, ids, cfg).tokens
    assert s1 == s2


def test_top_k_top_p_and_repetition_penalty():
    logits = np.array([0.0, 5.0, 4.0, -1.0])
    rng = np.random.default_rng(0)
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), rng, []) for _ in range(200)}
    assert picks <= {1, 2} and len(picks) == 2
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), rng, []) for _ in range(50)}
    assert picks == {1}
    assert sample_next(logits, SamplingConfig(repetition_penalty=100.0), rng, [1]) == 2


def test_streaming_callback_reassembles_the_text(tiny_eager):
    pieces = []
    res = generate(tiny_eager, "The constitution", SamplingConfig(max_new_tokens=12, stop_at_eos=False),
                   on_text=pieces.append)
    assert "".join(pieces) == res.text


def test_bad_sampling_values_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_parity_cli_gives_each_int4_artifact_a_reference_with_its_activation_arithmetic(export_artifact, tmp_path):
    """``python -m runtime parity`` compares an ExecuTorch 8da4w .pte with eager int4 + per-token
    int8 activations and an ONNX accuracy_level-4 model with eager int4 + per-block int8
    activations; on those exact-arithmetic references both agree to float rounding."""
    from runtime.__main__ import main

    pte = export_artifact("executorch", "tiny", "int4", "portable")
    onnx = export_artifact("onnx", "tiny", "int4")
    out = tmp_path / "parity.json"
    rc = main(["parity", str(pte), str(onnx), "--steps", "4", "--no-text", "--json", str(out), "--threads", "1"])
    rows = {r["candidate"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[str(pte)]["reference"].endswith("int4+int8-token-asym"), rows[str(pte)]["reference"]
    assert rows[str(onnx)]["reference"].endswith("int4+int8-block-sym"), rows[str(onnx)]["reference"]
    for name, row in rows.items():  # most steps to float rounding (a rare int8 boundary flip aside)
        median = float(np.median(row["per_step_rel"]))
        assert median <= 1e-5 and row["max_rel"] <= 5e-2, f"{name}: {median:.2e}/{row['max_rel']:.2e} vs {row['reference']}"


def test_parity_cli_at_accuracy_level_0_compares_onnx_with_the_weight_only_reference(export_artifact, tmp_path,
                                                                                       capsys):
    """``--accuracy-level 0`` runs an .onnx with exact dequantization, so its reference carries no
    activation arithmetic and every step agrees to float rounding (what checked the 7B .onnx);
    the flag is refused up front when no candidate takes it."""
    from runtime.__main__ import main

    pte = export_artifact("executorch", "tiny", "int4", "portable")
    onnx = export_artifact("onnx", "tiny", "int4")
    out = tmp_path / "parity.json"
    rc = main(["parity", str(onnx), str(pte), "--steps", "4", "--no-text", "--json", str(out), "--threads", "1",
               "--accuracy-level", "0"])
    rows = {r["candidate"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[str(onnx)]["reference"].endswith(":int4"), rows[str(onnx)]["reference"]
    assert rows[str(onnx)]["max_rel"] <= 1e-4 and rows[str(onnx)]["top1"] == 1.0, rows[str(onnx)]
    assert rows[str(pte)]["reference"].endswith("int4+int8-token-asym")  # an .pte has no such mode
    assert rc == 0
    capsys.readouterr()
    assert main(["parity", str(pte), "--accuracy-level", "0", "--no-text"]) != 0
    assert "--accuracy-level applies to .onnx artifacts" in capsys.readouterr().err


def test_noise_floor_of_a_float_reference_is_float_rounding(tiny_eager):
    """Without activation quantization the decoder is smooth: a 1e-7 perturbation stays ~1e-7
    (with int8 activations on a trained model it cascades; see the target tests' figures)."""
    from runtime.parity import noise_floor

    ids = tiny_eager.tokenizer.encode("We the People of the United States, in Order to form a more perfect Union")
    floor = noise_floor(tiny_eager, ids, 4)
    assert floor.top1_rate == 1.0 and floor.max_rel < 1e-5 and floor.mean_kl < 1e-9
    from runtime.backend import Capabilities

    class Fixed:  # a backend that declares no perturbation support gets no floor
        capabilities = Capabilities()

    assert noise_floor(Fixed(), ids, 4) is None
    tiny_eager.reset()
    plain = tiny_eager.prefill(ids[:4])
    with tiny_eager.perturbed(1e-2):
        tiny_eager.reset()
        moved = tiny_eager.prefill(ids[:4])
    tiny_eager.reset()
    assert np.abs(moved - plain).max() > 1e-4 and np.array_equal(tiny_eager.prefill(ids[:4]), plain)


@pytest.mark.parametrize("top1, floor, passes", [
    (23 / 24, 1.0, True),     # one flipped near-tie against a perfect floor sample
    (0.917, 0.927, True),     # SmolLM2's .pte against its floor (README)
    (0.85, 1.0, False),       # well below the floor
    (0.80, 0.927, False),
    (0.98, None, False),      # no activation arithmetic: the default 99 %
    (0.995, None, True),
])
def test_parity_bounds_apply_the_floor_margin_whatever_the_floor(top1, floor, passes):
    from runtime.parity.bounds import problems
    from runtime.parity.harness import ParityRow

    row = ParityRow("cand", 24, 0.1, 0.01, top1, 1e-5, 20, 24, floor_top1=floor,
                    floor_kl=None if floor is None else 1e-5)
    assert (problems(row) == []) is passes, problems(row)


def test_run_measured_reports_the_childs_own_peak_rss():
    """A child's peak RSS is its own (VmHWM), not the pages of the parent it was forked from."""
    from runtime.bench import run_measured

    small, _, small_peak = run_measured(["-c", "x = 1"])
    big, _, big_peak = run_measured(["-c", "x = bytearray(200 * 2**20)"])
    assert small.returncode == big.returncode == 0
    assert big_peak - small_peak > 150, (small_peak, big_peak)
    assert small_peak < 200  # a bare interpreter, even when this test process holds torch and models


def test_eager_attention_over_filled_blocks_is_bit_identical_to_the_whole_cache():
    """The eager backend's attention (cut after the last key block with a visible slot, GQA in the
    kernel) gives the canonical decoder's logits bit for bit, for prefills and decodes on both
    sides of a block boundary; cutting at the exact filled length would not (so this can fail)."""
    import torch

    from edgellm.decoder import SDPA
    from runtime.backends.eager import KV_BLOCK, FilledBlocksSDPA

    be = load("eager:tiny", max_seq_len=3 * KV_BLOCK)
    assert any(isinstance(m, FilledBlocksSDPA) for m in be.model.modules())
    plain = load("eager:tiny", max_seq_len=3 * KV_BLOCK).model
    for parent in list(plain.modules()):  # back to the decoder's own attention
        for name, child in list(parent.named_children()):
            if isinstance(child, FilledBlocksSDPA):
                setattr(parent, name, SDPA(child.n_heads, child.n_kv_heads, child.head_dim))
    ids = [(7 * i) % 4000 + 5 for i in range(KV_BLOCK + 8)]
    prompt = KV_BLOCK - 4

    def canonical(model):
        model.reset_cache()
        with torch.no_grad():
            rows = [model(torch.tensor([ids[:prompt]]), torch.arange(prompt))[0].numpy()]
            for p in range(prompt, len(ids)):
                rows.append(model(torch.tensor([[ids[p]]]), torch.tensor([p]))[0].numpy())
        return np.concatenate(rows)

    want = canonical(plain)
    be.reset()
    got = np.concatenate([be.forward_all(ids[:prompt])] + [be.forward_all([t]) for t in ids[prompt:]])
    assert np.array_equal(got, want)

    class ExactLength(FilledBlocksSDPA):
        def forward(self, q, k_all, v_all, mask, n, input_pos):
            n = int(input_pos.max()) + 1
            return super().forward(q, k_all, v_all, mask[..., :n], n, input_pos)

    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is SDPA:
                setattr(parent, name, ExactLength(child.n_heads, child.n_kv_heads, child.head_dim))
    assert not np.array_equal(canonical(plain), want)


def test_parity_reads_greedy_and_reference_logits_off_single_passes(tiny_eager):
    """run_parity reuses the reference's greedy logits as its teacher-forced ones and reads a
    candidate's greedy prefix off its teacher-forced logits; both equal the separate passes."""
    from runtime.parity import all_logits, greedy_agreement, greedy_prefix, greedy_run

    other = load("eager:tiny", max_seq_len=64, seed=1)
    for text in ("The capital of France is", "Once upon a time, in a small village by the sea,"):
        prompt = tiny_eager.tokenizer.encode(text)
        cont, rows = greedy_run(tiny_eager, prompt, 10)
        assert np.array_equal(rows, all_logits(tiny_eager, prompt + cont, len(prompt)))
        for cand in (other, load("eager:tiny", max_seq_len=64)):
            common, _, _ = greedy_prefix(cand, tiny_eager, prompt, 10)
            assert greedy_agreement(all_logits(cand, prompt + cont, len(prompt)), cont) == common
    row = run_parity({"other": other}, tiny_eager, steps=10).rows[0]
    assert row.greedy_common < row.greedy_n  # a different model, and the agreement said so
    with pytest.raises(ValueError, match="steps"):
        run_parity({"other": other}, tiny_eager, steps=0)
