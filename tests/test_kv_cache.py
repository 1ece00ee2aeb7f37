"""The KV cache options (``kv_cache: {dtype, window, sinks}``): precision, the sliding window with
attention sinks, generation past the capacity, and the cache's bytes.

Random-weight tests hold logit bounds and exact agreement with the eager formulation;
agreement in quality (perplexity) is asserted on SmolLM2's trained weights.
"""

from __future__ import annotations

import pytest
import torch

from edgellm.config import KVCacheConfig, ModelConfig
from edgellm.decoder import CausalMask, KVCache, hadamard, quantize_kv
from edgellm.errors import EdgeLLMError
from edgellm.model import resolve_model
from edgellm.recipes import load_recipe

WINDOW, SINKS = 32, 4


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    n = ids.shape[1]
    return torch.cat([model(ids[:, s:s + chunk], torch.arange(s, min(n, s + chunk)))[0] for s in range(0, n, chunk)])


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kv, message", [
    ({"dtype": "int4"}, "kv_cache.dtype must be one of fp32, fp16, int8"),
    ({"sinks": 4}, "kv_cache.sinks needs kv_cache.window"),
    ({"window": 10, "sinks": 4}, "must exceed kv_cache.sinks"),
    ({"window": 4}, "kv_cache.window"),
])
def test_bad_kv_cache_is_refused(kv, message):
    with pytest.raises(EdgeLLMError, match=message):
        KVCacheConfig(**kv)


def test_window_and_max_seq_len_must_agree():
    with pytest.raises(EdgeLLMError, match="drop --max-seq-len"):
        resolve_model(recipe="tiny", max_seq_len=64, kv_cache={"window": 32})
    loaded = resolve_model(recipe="tiny", kv_cache={"window": 48, "sinks": 4})
    assert loaded.config.max_seq_len == 48 and loaded.config.kv_cache.ring == 44


def test_recipe_field_round_trips(tmp_path):
    import yaml

    data = load_recipe("tiny").to_dict()
    data["kv_cache"] = {"dtype": "int8", "window": 64, "sinks": 4}
    path = tmp_path / "tiny-window.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = resolve_model(recipe=str(path))
    assert loaded.config.kv_cache == KVCacheConfig("int8", 64, 4) and loaded.config.max_seq_len == 64
    # a CLI flag overrides one key and keeps the others
    assert resolve_model(recipe=str(path), kv_cache={"dtype": "fp16"}).config.kv_cache == KVCacheConfig("fp16", 64, 4)
    data["kv_cache"] = {"dtyp": "int8"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgeLLMError, match="unknown field 'dtyp' in .*kv_cache"):
        load_recipe(str(path))


def test_cache_bytes_of_xgen_7b_8k():
    """The issue's goal: an int8 cache of XGen-7B-8K at 8192 slots within 2.2 GB (fp32: 8.6 GB)."""
    cfg = load_recipe("xgen-7b-8k-base").model_config(8192)
    assert cfg.kv_cache_bytes("fp32") == 2 * 32 * 32 * 8192 * 128 * 4  # 8.59 GB
    assert cfg.kv_cache_bytes("fp16") * 2 == cfg.kv_cache_bytes("fp32")
    assert cfg.kv_cache_bytes("int8") == 2 * 32 * 32 * 8192 * (128 + 2) <= 2.2e9  # codes + an fp16 scale
    windowed = ModelConfig(**{**cfg.to_dict(), "max_seq_len": 1024, "kv_cache": {"dtype": "int8", "window": 1024}})
    assert windowed.kv_cache_bytes() == cfg.kv_cache_bytes("int8") // 8


# --------------------------------------------------------------------------- eager arithmetic


def test_int8_codes_round_trip_within_half_a_step():
    x = torch.randn(1, 3, 17, 64) * torch.logspace(-3, 2, 17)[None, None, :, None]
    x[0, 0, 0] = 0.0  # an all-zero row: codes 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and codes.abs().max() <= 127
    err = (codes.float() * scale.float() - x).abs()  # half a step, plus the fp16 scale's rounding
    assert bool((err <= scale.float() * (0.5 + 127 * 2 ** -11) + 1e-7).all())
    assert not codes[0, 0, 0].any()


@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_key_rotation_is_orthonormal(d):
    r = hadamard(d)
    assert r.shape == (d, d) and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-6)
    assert (r != 0).sum(dim=1).min() >= d & -d  # every coordinate spread over a whole block


def test_int8_cache_rotates_keys_so_scores_survive_an_outlier_channel():
    """RoPE'd keys carry a few large channels that set each token's scale; the int8 cache stores
    keys rotated (queries rotated alike), which keeps q.k and cuts its error several-fold here."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 16, 2, 64, generator=g)
    k[..., 5] *= 40.0  # an outlier channel, as RoPE'd keys have
    q = torch.randn(1, 1, 2, 64, generator=g)
    cache = KVCache(2, 16, 64, KVCacheConfig("int8"))
    k_read, _ = cache.update(torch.arange(16), k, k)
    exact = torch.einsum("bthd,bhsd->bhts", q, k.transpose(1, 2))
    rotated = torch.einsum("bthd,bhsd->bhts", cache.query(q), k_read)
    codes, scale = quantize_kv(k.transpose(1, 2))
    plain = torch.einsum("bthd,bhsd->bhts", q, codes.float() * scale.float())
    err_rotated, err_plain = (rotated - exact).abs().max(), (plain - exact).abs().max()
    assert err_rotated < err_plain / 3, (err_rotated, err_plain)


@pytest.mark.parametrize("dtype, bound", [("fp16", 2e-3), ("int8", 3e-2)])
def test_cache_precision_changes_logits_within_bounds(dtype, bound):
    """Random weights: the stored cache's rounding moves the logits a little, never grossly."""
    ids = _ids(40, 49152)
    base = _logits(resolve_model(recipe="tiny", max_seq_len=64).decoder().eval(), ids, 40)
    model = resolve_model(recipe="tiny", max_seq_len=64, kv_cache={"dtype": dtype}).decoder().eval()
    assert model.layers[0].self_attn.kv_cache.k.dtype == {"fp16": torch.float16, "int8": torch.int8}[dtype]
    diff = (_logits(model, ids, 40) - base).abs().max().item()
    assert 0 < diff <= bound * base.abs().max().item()


def test_window_not_yet_full_equals_the_plain_cache():
    ids = _ids(40, 49152)
    base = _logits(resolve_model(recipe="tiny", max_seq_len=64).decoder().eval(), ids, 40)
    windowed = resolve_model(recipe="tiny", kv_cache={"window": 64, "sinks": 4}).decoder().eval()
    for chunk in (1, 7):
        assert (_logits(windowed, ids, chunk) - base).abs().max().item() <= 1e-5


def test_window_equals_a_full_cache_masked_to_sinks_and_ring():
    """Past its capacity, the ring cache computes what a large cache computes when each query
    sees the sinks and the last ``window - sinks`` positions (RoPE at absolute positions)."""
    n, ring = 4 * WINDOW, WINDOW - SINKS
    ids = _ids(n, 49152)
    windowed = resolve_model(recipe="tiny", kv_cache={"window": WINDOW, "sinks": SINKS}).decoder().eval()
    full = resolve_model(recipe="tiny", max_seq_len=n + 1).decoder().eval()

    def rows(self, input_pos):
        p, q = self.positions[None, :], input_pos[:, None]
        return torch.where((p <= q) & ((p < SINKS) | (p > q - ring)), 0.0, self.value)

    full.mask.rows = rows.__get__(full.mask, CausalMask)
    got = _logits(windowed, ids, 1)
    assert got.shape[0] == n and bool(torch.isfinite(got).all())
    assert (got - _logits(full, ids, 1)).abs().max().item() <= 1e-4


def test_windowed_mask_hides_overwritten_and_unwritten_slots():
    spec = KVCacheConfig(window=12, sinks=2)  # ring of 10
    mask = CausalMask(12, spec=spec)
    held = mask.slot_positions(torch.tensor([25]))
    # slot s >= 2 holds the latest position p <= 25 with 2 + (p - 2) % 10 == s
    assert held.tolist() == [0, 1, 22, 23, 24, 25, 16, 17, 18, 19, 20, 21]
    early = mask.slot_positions(torch.tensor([4]))
    assert early.tolist()[:5] == [0, 1, 2, 3, 4] and all(p > 4 for p in early.tolist()[5:])


# --------------------------------------------------------------------------- SmolLM2 quality


@pytest.mark.slow
def test_smollm2_perplexity_with_fp16_and_int8_caches(smollm2, heldout_text):
    """The issue's goals on trained weights (eager, the arithmetic every target carries): int8
    within 0.5 % of the fp32 cache's perplexity, fp16 within 0.1 %. Perplexity over 511 tokens is
    noisy (about ±0.3 % for any int8 scheme), so the int8 cache's mean KL to the fp32 cache's
    logits is held too: 1.0e-3 on the constitution with Hadamard-rotated keys, 3.6e-3 without."""
    ids = torch.tensor([smollm2.tokenizer().encode(heldout_text)[:512]])

    def log_probs(kv):
        from edgellm.model import LoadedModel

        cfg = ModelConfig(**{**smollm2.config.to_dict(), "kv_cache": kv})
        model = LoadedModel(smollm2.recipe, cfg, smollm2.weights).decoder().eval()
        return torch.log_softmax(_logits(model, ids[:, :-1], 511), -1)

    def ppl(lp):
        return float(torch.exp(-lp[torch.arange(511), ids[0, 1:]].mean()))

    fp32, fp16, int8 = log_probs({}), log_probs({"dtype": "fp16"}), log_probs({"dtype": "int8"})
    kl = float((fp32.exp() * (fp32 - int8)).sum(-1).mean())
    print(f"ppl fp32 {ppl(fp32):.4f} fp16 {ppl(fp16):.4f} int8 {ppl(int8):.4f}; int8 mean KL {kl:.2e}")
    assert abs(ppl(fp16) / ppl(fp32) - 1) <= 0.001
    assert abs(ppl(int8) / ppl(fp32) - 1) <= 0.005
    assert kl <= 2e-3


@pytest.mark.slow
def test_smollm2_long_text_through_a_window_of_512_with_4_sinks(smollm2):
    """A text of 4x the window streamed through window 512 + 4 sinks scores within 10 % of the
    same text with a full cache of its length."""
    from edgellm.assets import fetch
    from edgellm.model import LoadedModel

    text = "\n\n".join(fetch(name).read_text() for name in ("us-constitution.txt", "us-declaration.txt"))
    ids = smollm2.tokenizer().encode(text)[:2048]
    assert len(ids) == 2048

    def ppl(cfg, chunk):
        model = LoadedModel(smollm2.recipe, cfg, smollm2.weights).decoder().eval()
        t = torch.tensor([ids])
        lp = torch.log_softmax(_logits(model, t[:, :-1], chunk), -1)
        return float(torch.exp(-lp[torch.arange(len(ids) - 1), t[0, 1:]].mean()))

    base = smollm2.config.to_dict()
    full = ppl(ModelConfig(**{**base, "max_seq_len": 2048}), 2047)
    windowed_cfg = ModelConfig(**{**base, "max_seq_len": 512, "kv_cache": {"window": 512, "sinks": 4}})
    windowed = ppl(windowed_cfg, windowed_cfg.max_chunk)
    assert windowed / full <= 1.10, (windowed, full)


# --------------------------------------------------------------------------- artifacts (tiny)

# (target, flavour) pairs that carry each option; the others refuse it up front (tested below).
# ONNX portable's cache is the same traced ScatterElements graph as fast's (fast only fuses the
# norms around it); its windowed int8 cache is run by the browser test (test_mobile_web.py).
_PRECISION_TARGETS = [("executorch", "portable"), ("executorch", "fast"), ("onnx", "fast"), ("coreml", None)]
_WINDOW_TARGETS = [("executorch", "portable"), ("executorch", "fast"), ("onnx", "fast")]


@pytest.fixture(scope="module")
def kv_export(tmp_path_factory):
    """``kv_export(target, flavour, kv, quant)`` -> artifact dir, exported once per module."""
    from export.pipeline import quantize_for, run_export

    root, cache, quants = tmp_path_factory.mktemp("kv"), {}, {}

    def _export(target, flavour, kv, quant="int4"):
        key = (target, flavour, tuple(sorted(kv.items())), quant)
        if key not in cache:
            loaded = resolve_model(recipe="tiny", kv_cache=kv)
            if quant == "int4" and "q" not in quants:
                quants["q"] = quantize_for(loaded, "int4", progress=lambda s: None)
            out = run_export([target], loaded=loaded, quantization=quants.get("q") if quant == "int4" else None,
                             quant=quant, flavour=flavour, out=root, progress=lambda s: None)
            cache[key] = out[target]
        return cache[key]

    return _export


@pytest.mark.slow
@pytest.mark.parametrize("target, flavour", _PRECISION_TARGETS)
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_cache_precision_artifact_matches_the_eager_cache_arithmetic(kv_export, target, flavour, dtype):
    """Each target's fp16/int8-cache artifact against the eager reference computing with the same
    cache (random weights: a logit bound, the same bound parity uses for the plain cache)."""
    from edgellm.artifact import read_manifest
    from runtime import load
    from runtime.backends.eager import EagerBackend
    from runtime.parity.harness import teacher_forced

    if target == "coreml" and dtype == "int8":
        pytest.skip("Core ML's states are fp16 only: an int8 cache is refused (tested below)")
    art = kv_export(target, flavour, {"dtype": dtype})
    man = read_manifest(art)
    assert man["kv_cache"]["dtype"] == dtype
    assert man["kv_cache"]["bytes"] == ModelConfig.from_dict(man["config"]).kv_cache_bytes()
    from runtime.inspect import inspect_artifact, render

    report = inspect_artifact(art)
    assert report["kv_cache"]["bytes"] == man["kv_cache"]["bytes"]
    assert " + KV cache " in render(report) and f"({dtype}, {man['max_seq_len']} slots)" in render(report)
    cand = load(str(art))
    ref = EagerBackend.reference_for(man, activations=cand.capabilities.activation_scheme or False)
    assert ref.model.layers[0].self_attn.kv_cache.spec.dtype == dtype
    stats = teacher_forced(cand, ref, list(_ids(48, 49152)[0]), prompt_len=24)
    assert float(stats.rel.max()) <= 0.05
    assert float(stats.top1.mean()) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("target, flavour", _WINDOW_TARGETS)
def test_windowed_artifact_generates_four_times_its_capacity_like_eager(kv_export, target, flavour):
    """fp32 weights (no int8-activation noise): greedy through 4x the window, token-identical to
    the eager windowed reference, and speculation changes nothing; the plain cache of the same
    size still stops with CacheOverflowError."""
    from edgellm.artifact import read_manifest
    from runtime import CacheOverflowError, generate, load
    from runtime.backends.eager import EagerBackend
    from runtime.generate import SamplingConfig

    art = kv_export(target, flavour, {"window": WINDOW, "sinks": SINKS}, quant="none")
    cand = load(str(art))
    ref = EagerBackend.reference_for(read_manifest(art))
    cfg = SamplingConfig(max_new_tokens=4 * WINDOW, temperature=0.0, stop_at_eos=False)
    prompt = list(range(5, 5 + WINDOW + 9))  # its prefill crosses the ring's wrap
    got = generate(cand, prompt, cfg)
    assert len(got.tokens) == 4 * WINDOW and cand.pos > 4 * WINDOW
    assert got.tokens == generate(ref, prompt, cfg).tokens
    assert generate(cand, prompt, cfg, speculate=4).tokens == got.tokens
    plain = load(str(kv_export(target, flavour, {}, quant="none")))
    with pytest.raises(CacheOverflowError):
        generate(plain, prompt, SamplingConfig(max_new_tokens=plain.max_seq_len, temperature=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_fast_executorch_windowed_fp16_int8_cache_generates_like_eager(kv_export, dtype):
    """The fast flavour's fp16/int8 cache through a window (update_cache_with_indices on the
    values, or on the codes and their scales): greedy through 4x the window token-identical to
    the eager windowed reference with the same cache (fp32 weights)."""
    from edgellm.artifact import read_manifest
    from runtime import generate, load
    from runtime.backends.eager import EagerBackend
    from runtime.generate import SamplingConfig

    art = kv_export("executorch", "fast", {"dtype": dtype, "window": WINDOW, "sinks": SINKS}, quant="none")
    man = read_manifest(art)
    assert man["kv_cache"]["dtype"] == dtype and man["kv_cache"]["window"] == WINDOW
    cand, ref = load(str(art)), EagerBackend.reference_for(man)
    cfg = SamplingConfig(max_new_tokens=4 * WINDOW, temperature=0.0, stop_at_eos=False)
    prompt = list(range(5, 5 + WINDOW + 9))
    got = generate(cand, prompt, cfg)
    assert len(got.tokens) == 4 * WINDOW and cand.pos > 4 * WINDOW
    assert got.tokens == generate(ref, prompt, cfg).tokens


@pytest.mark.parametrize("kv", [{"dtype": "fp16"}, {"dtype": "int8"}, {"dtype": "fp16", "window": WINDOW, "sinks": SINKS},
                                {"dtype": "int8", "window": WINDOW, "sinks": SINKS}])
def test_fast_executorch_transform_computes_the_eager_cache_arithmetic(kv):
    """ExecuTorch's LLM custom ops (run through their AOT kernels) with an fp16/int8 cache give the
    canonical decoder's logits with the same cache, in one chunk and token by token, past a
    window's wrap."""
    import copy

    from export import transforms as tr

    n = 2 * WINDOW + 6
    base = resolve_model(recipe="tiny", kv_cache=kv, **({} if "window" in kv else {"max_seq_len": n + 1})).decoder().eval()
    fast = tr.apply(copy.deepcopy(base), [tr.Transform("executorch_llm_ops")])
    assert fast.layers[0].self_attn.kv_cache.k.dtype == base.layers[0].self_attn.kv_cache.k.dtype
    ids = _ids(n, 49152)
    for chunk in (1, 7):
        want, got = _logits(base, ids, chunk), _logits(fast, ids, chunk)
        base.reset_cache(), fast.reset_cache()
        assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item(), (chunk, (got - want).abs().max())


def test_fast_executorch_int8_cache_quantizes_outside_xnnpack():
    """The fast flavour's int8 cache arithmetic (KVQuantize, KVDequantize) is left to the portable
    kernels (XNNPACK's group partitioner otherwise finds a dependency cycle around update_cache);
    an fp32 or fp16 cache has no such module."""
    from export import transforms as tr
    from export.targets.executorch.lowering import FLAVOURS, PORTABLE_MODULES

    fast = next(f for f in FLAVOURS if f.name == "fast")
    for dtype, expected in (("fp32", set()), ("fp16", set()), ("int8", set(PORTABLE_MODULES))):
        model = resolve_model(recipe="tiny", max_seq_len=64, kv_cache={"dtype": dtype}).decoder().eval()
        tr.apply(model, list(fast.transforms))
        cache = model.layers[0].self_attn.kv_cache
        assert isinstance(cache, tr.CustomOpKVCache) and cache.k.dtype == {"fp32": torch.float32,
                                                                           "fp16": torch.float16,
                                                                           "int8": torch.int8}[dtype]
        assert {type(m).__name__ for m in model.modules()} & set(PORTABLE_MODULES) == expected


@pytest.mark.slow
def test_coreml_windowed_package_follows_eager_through_four_times_its_capacity(kv_export):
    """Core ML computes in fp16, so agreement with the fp32 eager windowed reference is asked as
    test_coreml asks it: teacher-forced along the reference's greedy path through 4x the window,
    the argmax equal at every step whose reference top-2 margin beats fp16's error. The prompt is
    longer than the window, so its prefill crosses the ring's wrap (a Core ML state is written as
    one slice per call: the chunk splits there). Its own greedy run goes past the capacity, and
    speculation changes none of its tokens."""
    import numpy as np

    from edgellm.artifact import read_manifest
    from runtime import generate, load
    from runtime.backends.eager import EagerBackend
    from runtime.generate import SamplingConfig
    from runtime.parity import compare_logits, greedy_tokens

    art = kv_export("coreml", None, {"window": WINDOW, "sinks": SINKS}, quant="none")
    cand, ref = load(str(art)), EagerBackend.reference_for(read_manifest(art))
    prompt = list(range(5, 5 + WINDOW + 9))
    r = greedy_tokens(ref, prompt, 4 * WINDOW)
    rows = {}
    for key, b in (("cand", cand), ("ref", ref)):
        b.reset()
        rows[key] = np.stack([b.prefill(prompt)] + [b.decode(t) for t in r[:-1]])
    assert cand.pos == len(prompt) + 4 * WINDOW - 1
    st = compare_logits(rows["cand"], rows["ref"])
    top2 = np.sort(rows["ref"], axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * st.max_abs
    wrong = [i for i, row in enumerate(rows["cand"]) if int(np.argmax(row)) != r[i]]
    print(f"coreml window: max rel {st.max_rel:.2e}, steps differing {wrong}, near-ties {np.flatnonzero(~decisive)}")
    assert st.max_rel <= 2e-2  # test_coreml's bound for an fp16 program against fp32 eager
    assert not [i for i in wrong if decisive[i]], f"top-1 differs at decisive steps {wrong}"
    assert (~decisive).sum() <= len(r) // 4
    cfg = SamplingConfig(max_new_tokens=4 * WINDOW, temperature=0.0, stop_at_eos=False)
    got = generate(cand, prompt, cfg)
    assert len(got.tokens) == 4 * WINDOW and generate(cand, prompt, cfg, speculate=4).tokens == got.tokens


def _recording_backend(ring: int | None, sinks: int = 0):
    """A backend recording each call's (first position, length)."""
    import numpy as np

    from runtime.backend import Backend

    class Recording(Backend):
        kind, name, max_seq_len, vocab_size = "recording", "recording", WINDOW, 10

        def _forward(self, ids, start):
            self.calls.append((start, len(ids)))
            return np.zeros((len(ids), 10), np.float32)

        def _reset(self):
            self.calls.clear()

        @classmethod
        def from_artifact(cls, *a):  # required by the contract, never called
            raise TypeError("Recording is a test double that records calls; it runs no artifact")

    b = Recording()
    b.calls, b.ring, b.sinks = [], ring, sinks
    return b


def test_windowed_prefill_chunks_end_where_the_ring_wraps():
    """In a window the chunking decides what a query sees, so every runtime chunks alike: at most
    a quarter of the ring, ending where the ring wraps (a call's slots contiguous, as a cache
    written as one slice needs); a plain cache takes capacity - 1 per call."""
    from edgellm.decoder import ring_slots

    n = 5 * WINDOW + 3
    b = _recording_backend(WINDOW - SINKS, SINKS)
    b.forward_all([1] * n)
    assert sum(k for _, k in b.calls) == n and max(k for _, k in b.calls) == (WINDOW - SINKS) // 4
    assert [p for p, _ in b.calls] == sorted({p for p, _ in b.calls})
    spec = KVCacheConfig(window=WINDOW, sinks=SINKS)
    slots = [ring_slots(torch.arange(p, p + k), spec) for p, k in b.calls]
    assert all(bool((torch.diff(s) == 1).all()) for s in slots)
    assert sum(int(s[0]) == SINKS for s in slots) == (n - SINKS) // (WINDOW - SINKS)  # each wrap starts a call
    plain = _recording_backend(None)
    plain.forward_all([1] * (WINDOW - 1))
    assert plain.calls == [(0, WINDOW - 1)]


@pytest.mark.parametrize("target, flavour, kv, refused", [
    ("coreml", None, {"dtype": "int8"}, "an int8 KV cache"),
])
def test_a_target_that_cannot_carry_the_cache_refuses_up_front(tmp_path, target, flavour, kv, refused):
    from export.pipeline import run_export

    with pytest.raises(EdgeLLMError, match=f"cannot carry {refused}.*targets that can: (coreml --flavour fp16, )?executorch --flavour portable"):
        run_export([target], recipe="tiny", flavour=flavour, kv_cache=kv, out=tmp_path / "out",
                   progress=lambda s: None)
    assert not (tmp_path / "out").exists()
