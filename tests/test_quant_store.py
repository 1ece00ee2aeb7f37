"""The store of calibrated quantizations: same codes back, keyed by what determines them, never
trusted when damaged; and the parity reference of a calibrated artifact comes from it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from edgellm import quant_store
from edgellm.quantization import QuantizedWeight


def _gptq(loaded, **changes):
    q = dataclasses.replace(loaded.recipe.quantization, **{"method": "gptq", "calibration_tokens": 256,
                                                            "embedding": "int8", **changes})
    return dataclasses.replace(loaded, recipe=dataclasses.replace(loaded.recipe, quantization=q))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDGELLM_QUANT_CACHE", raising=False)
    return tmp_path / "home" / "quantizations"


def _same(a, b):
    assert a.summary() == b.summary()
    for (na, wa), (nb, wb) in zip(a.unique(), b.unique()):
        assert na == nb and wa.bits == wb.bits and torch.equal(wa.codes, wb.codes) and torch.equal(wa.scales, wb.scales)
    assert (a.weights["lm_head.weight"] is a.weights["embed_tokens.weight"]) == \
        (b.weights["lm_head.weight"] is b.weights["embed_tokens.weight"])


def test_a_calibrated_quantization_is_stored_once_and_read_back_bit_for_bit(tiny, store):
    loaded = _gptq(tiny)
    notes = []
    first = quant_store.quantize_loaded(loaded, note=notes.append)
    assert notes == [] and len(list(store.glob("*.safetensors"))) == 1
    second = quant_store.quantize_loaded(loaded, note=notes.append)
    assert len(notes) == 1 and "read from" in notes[0]
    _same(first, second)
    assert second.calibration == first.calibration and second.calibration["tokens"] == 256
    other_capacity = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, max_seq_len=64))
    quant_store.quantize_loaded(other_capacity, note=notes.append)  # the capacity never enters GPTQ
    assert len(notes) == 2 and "read from" in notes[1]


def test_the_key_follows_weights_calibration_and_config(tiny, store):
    from edgellm.model import seeded_model

    quant_store.quantize_loaded(_gptq(tiny), note=lambda m: None)
    other_weights = _gptq(seeded_model(tiny.recipe, tiny.config, seed=1))
    for variant in (other_weights, _gptq(tiny, calibration_tokens=128), _gptq(tiny, group_size=16)):
        notes = []
        quant_store.quantize_loaded(variant, note=notes.append)
        assert notes == [], "a different input must not be served a stored quantization"
    assert len(list(store.glob("*.safetensors"))) == 4


def test_a_damaged_entry_is_recomputed_not_trusted(tiny, store):
    loaded = _gptq(tiny)
    good = quant_store.quantize_loaded(loaded)
    (entry,) = store.glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    raw[-100] ^= 0xFF  # a flipped bit in the last tensor's bytes
    entry.write_bytes(bytes(raw))
    notes = []
    again = quant_store.quantize_loaded(loaded, note=notes.append)
    assert len(notes) == 1 and "ignoring" in notes[0] and "digest mismatch" in notes[0]
    _same(good, again)
    assert quant_store.load(entry, loaded.recipe.quantization).summary()["sha256"] == good.summary()["sha256"]


def test_store_off_and_data_free_methods_write_nothing(tiny, store, monkeypatch):
    quant_store.quantize_loaded(tiny)  # scale-search: recomputed in seconds, never stored
    assert not store.exists() or not any(store.iterdir())
    monkeypatch.setenv("EDGELLM_QUANT_CACHE", "0")
    quant_store.quantize_loaded(_gptq(tiny))
    assert not store.exists() or not any(store.iterdir())


def test_the_store_keeps_the_newest_entries(tiny, store, monkeypatch):
    monkeypatch.setattr(quant_store, "KEEP", 2)
    for n in (64, 96, 128):
        quant_store.quantize_loaded(_gptq(tiny, calibration_tokens=n))
    entries = list(store.glob("*.safetensors"))
    assert len(entries) == 2
    kept = {json.loads(_meta(p))["calibration"]["tokens"] for p in entries}
    assert kept == {96, 128}


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["edgellm"]


def test_from_packed_refuses_a_mismatched_stored_form():
    qw = QuantizedWeight(torch.randint(-8, 8, (4, 64), dtype=torch.int8), torch.ones(4, 2), None, 32)
    back = QuantizedWeight.from_packed(qw.packed, qw.scales, None, 32, 4, (4, 64))
    assert torch.equal(back.codes, qw.codes)
    with pytest.raises(ValueError, match="has packed"):
        QuantizedWeight.from_packed(qw.packed, qw.scales, None, 32, 4, (4, 128))


def test_the_reference_of_a_calibrated_artifact_is_its_own_quantization(tiny, store, tmp_path):
    """A GPTQ artifact's parity reference rebuilds the same codes (the digest is checked), from
    the store when the export left them there and by recomputing when it did not."""
    from export.pipeline import run_export
    from runtime.backends.eager import EagerBackend

    loaded = _gptq(tiny)
    out = run_export(["onnx"], loaded=loaded, out=tmp_path / "out", progress=lambda s: None)["onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "gptq" and manifest["quantization"]["calibration"]["tokens"] == 256
    ref = EagerBackend.reference_for(manifest)
    assert ref.quantization.summary()["sha256"] == manifest["quantization"]["sha256"]
    for p in store.glob("*.safetensors"):
        p.unlink()
    again = EagerBackend.reference_for(manifest)  # recomputed: the same digest, checked inside
    assert again.quantization.summary()["sha256"] == manifest["quantization"]["sha256"]
