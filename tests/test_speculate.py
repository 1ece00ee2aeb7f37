"""Prompt-lookup speculative decoding: drafts, greedy identity on every backend, the sampling
distribution kept by the acceptance rule, the CLI and bench."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime import speculate
from runtime.backend import Backend
from runtime.bench import BenchResult
from runtime.generate import SamplingConfig, generate


def test_draft_takes_the_latest_longest_match():
    ctx = [5, 1, 2, 9, 9, 1, 2, 7, 8, 3, 1, 2]
    assert speculate.draft(ctx, 3) == [7, 8, 3]  # "1 2" last seen before 7 8 3 (not 9 9)
    assert speculate.draft(ctx, 1) == [7]
    assert speculate.draft([4, 6, 1, 2, 3, 9, 6, 1, 2, 3], 2) == [9, 6]  # "1 2 3" beats "2 3" elsewhere
    assert speculate.draft([1, 2, 3, 4], 4) == []  # nothing recurs
    assert speculate.draft([7, 3, 7], 4) == []  # a single recurring token is not enough
    assert speculate.draft([1, 2, 1, 2], 5) == [1, 2]  # the continuation stops at the context's end
    assert speculate.draft([1, 2, 1, 2], 0) == []


def test_draft_length_schedule():
    s = speculate.SpeculationStats(6)
    s.update(6, 2)
    assert s.length == 5
    for _ in range(9):
        s.update(1, 0)
    assert s.length == 1
    s.update(1, 1)
    assert s.length == 3 and s.forwards == 11 and s.drafted == 16 and s.accepted == 3


class TableBackend(Backend):
    """Logits are a fixed function of the last token: a Markov chain whose distributions are known."""

    kind = "table"

    def __init__(self, table: np.ndarray, max_seq_len: int = 64):
        self.table, self.max_seq_len, self.vocab_size = table, max_seq_len, table.shape[0]
        self.tokenizer = None
        self.name = "table"
        self.calls: list[int] = []

    @classmethod
    def from_artifact(cls, *a):  # pragma: no cover - required by the contract, never called
        raise TypeError("TableBackend is a test double built from a logit table; it runs no artifact")

    def _forward(self, ids, start):
        self.calls.append(len(ids))
        return self.table[np.asarray(ids)]

    def _reset(self):
        """No cache to clear: the logits depend on the last token alone."""


def _table(vocab=5, seed=0):
    return np.random.default_rng(seed).normal(0, 1.5, (vocab, vocab)).astype(np.float32)


def test_speculative_sampling_keeps_the_distribution(monkeypatch):
    """Each of the first four sampled tokens (drafts replace the second to fourth) follows the
    chain's exact marginal under speculation as it does without; accepting every draft would not."""
    table = _table()
    probs = np.exp(table - table.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # "0 1" recurs: a draft at every step
    exact = [probs[prompt[-1]]]
    for _ in range(3):
        exact.append(exact[-1] @ probs)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, stop_at_eos=False)
    backend = TableBackend(table)

    def marginals(k, n=4000):
        counts = np.zeros((4, table.shape[0]))
        for seed in range(n):
            cfg.seed = seed
            toks = generate(backend, prompt, cfg, speculate=k).tokens
            counts[np.arange(4), toks] += 1
        return counts / n

    plain, spec = marginals(0), marginals(3)
    for got in (plain, spec):
        assert np.abs(got - np.stack(exact)).max() < 0.035, (got, exact)
    assert 3 in backend.calls  # drafts were verified (a token + 2 drafts, the most 4 new tokens allow)
    monkeypatch.setattr(sys.modules["runtime.generate"], "verify", lambda p, c, d, rng: (True, d))  # a wrong rule
    assert np.abs(marginals(3, 1000) - np.stack(exact)).max() > 0.1


def test_rewind_checks_its_position():
    b = TableBackend(_table())
    b.prefill([1, 2, 3])
    b.rewind(1)
    assert b.pos == 1
    with pytest.raises(ValueError, match="cannot rewind to position 2 from 1"):
        b.rewind(2)


def test_speculation_stops_at_length_eos_and_capacity():
    table = np.full((4, 4), -10.0, dtype=np.float32)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 10.0  # greedy cycles 0 1 2 3
    b = TableBackend(table, max_seq_len=12)
    ids = [0, 1, 2, 3, 0, 1]
    plain = generate(b, ids, SamplingConfig(max_new_tokens=7, stop_at_eos=False))
    spec = generate(b, ids, SamplingConfig(max_new_tokens=7, stop_at_eos=False), speculate=5)
    assert spec.tokens == plain.tokens == [2, 3, 0, 1, 2, 3, 0] and b.pos <= 12
    assert spec.speculation["accepted"] == spec.speculation["drafted"] > 0
    eos = generate(b, ids, SamplingConfig(max_new_tokens=7, eos_ids=[0]), speculate=5)
    assert eos.tokens == [2, 3, 0] and eos.stopped == "eos"


COPY = "Copy this text word for word:\n\n"


@pytest.fixture(scope="module")
def copy_prompt(heldout_text):
    return COPY + heldout_text[3000:3500]


def _identical_and_accepted(backend, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n)
    plain = generate(backend, prompt, cfg, chat=True)
    spec = generate(backend, prompt, cfg, chat=True, speculate=4)
    print(f"\n{backend.name}: {plain.decode_tok_s:.1f} -> {spec.decode_tok_s:.1f} tok/s, {spec.speculation}")
    if backend.capabilities.activation_scheme is None:
        assert spec.tokens == plain.tokens
    else:
        _differ_only_at_a_near_tie(backend, backend.tokenizer.encode_chat([{"role": "user", "content": prompt}]),
                                   plain.tokens, spec.tokens)
    assert spec.speculation["forwards"] > 0 and spec.speculation["acceptance_rate"] > 0.5


def _differ_only_at_a_near_tie(backend, ids, plain, spec, positions=5):
    """With int8 dynamic activations, a forward of several positions and the same positions fed
    one at a time round differently (the README's speculation section), so speculation may leave
    plain greedy's path where the two paths disagree on the argmax. Identical tokens, or a first
    difference at a step whose top-2 margin on the plain path is within twice what a
    ``positions``-wide verification forward moves that step's logits by; a broken acceptance
    rule takes a draft where plain greedy had a clear winner and fails here."""
    i = next((j for j, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    if i is None:
        assert len(spec) == len(plain)
        return
    ctx = ids + plain[:i]
    backend.reset()
    single = backend.prefill(ids)  # plain greedy's path: the prompt, then one token a call
    for t in plain[:i]:
        single = backend.decode(t)
    backend.reset()
    backend.prefill(ctx[:-positions])
    multi = backend.forward_all(ctx[-positions:])[-1]
    moved = float(np.abs(multi - single).max())
    margin = float(single[plain[i]] - single[spec[i]])
    print(f"first difference at step {i}: plain's margin {margin:.4f}, a {positions}-position forward moves "
          f"the logits by up to {moved:.4f}")
    assert margin <= 2 * moved, f"speculation left plain greedy at step {i}, a decisive step (margin {margin:.3f})"


def test_greedy_speculation_is_token_identical_eager(smollm2, copy_prompt):
    from runtime.backends.eager import EagerBackend

    _identical_and_accepted(EagerBackend.from_loaded(smollm2, threads=1), copy_prompt, 48)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_greedy_speculation_is_token_identical_on_each_target(export_artifact, target, copy_prompt):
    import runtime

    art = export_artifact(target)
    backend = runtime.load(str(art)) if target == "coreml" else runtime.load(str(art), threads=1)
    _identical_and_accepted(backend, copy_prompt, 32 if target == "coreml" else 64)


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_greedy_speculation_is_token_identical_on_tiny_artifacts(export_artifact, target):
    """Random weights fall into loops that prompt lookup drafts; whatever is accepted, the tokens
    are plain greedy's."""
    import runtime

    backend = runtime.load(str(export_artifact(target, "tiny", "int4")))
    prompt = [11, 12, 13, 14, 15] * 4 + [11, 12]
    cfg = SamplingConfig(max_new_tokens=24, stop_at_eos=False)
    plain = generate(backend, prompt, cfg)
    spec = generate(backend, prompt, cfg, speculate=4)
    assert spec.tokens == plain.tokens and spec.speculation["forwards"] > 0, spec.speculation


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True)


def test_cli_speculate(tmp_path):
    r = _cli("generate", "eager:tiny", "--prompt", "one two one two one two", "--max-new-tokens", "12",
             "--speculate", "3", "--no-stream")
    assert r.returncode == 0, r.stderr
    assert "speculation:" in r.stderr and "verification forwards" in r.stderr
    bad = _cli("generate", "eager:tiny", "--prompt", "x", "--speculate", "-1")
    assert bad.returncode == 1 and "--speculate" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "b.json"
    r = _cli("bench", "eager:tiny", "--threads", "1", "--prompt-tokens", "16", "--decode-tokens", "16", "--runs", "1",
             "--speculate", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(out.read_text())
    assert res["speculate"] == 4 and res["decode_tok_s"] > 0 and "accepted" in r.stdout


def test_bench_result_reads_results_without_speculation_fields():
    old = {"name": "x", "prompt_tokens": 1, "decode_tokens": 2, "prefill_tok_s": 3.0, "ttft_ms": 4.0,
           "decode_tok_s": 5.0, "peak_rss_mb": 6.0, "runs": 1, "unknown": 0}
    r = BenchResult.from_dict(old)
    assert r.speculate == 0 and r.acceptance_rate is None and r.decode_tok_s == 5.0
