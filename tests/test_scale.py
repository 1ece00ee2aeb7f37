"""The scale path's pieces that run at any size: per-tensor random weights, full-size HF folders
written tensor by tensor, lazy loading in the stored dtype, per-stage export accounting, and the
up-front memory refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgellm.model import resolve_model
from edgellm.weights import random_tensor, random_weights
from export.make_checkpoint import write_checkpoint
from export.pipeline import MemoryRefused, check_memory, estimated_peak_bytes


def test_random_weights_are_per_tensor_and_seeded():
    loaded = resolve_model(recipe="xgen-7b-8k-base")  # 6.9B parameters: nothing is generated up front
    w = loaded.weights
    name = "layers.17.mlp.down_proj.weight"
    a = w[name]
    assert a.shape == (4096, 11008) and a.dtype == torch.float32
    assert torch.equal(a, random_tensor(name, (4096, 11008), 0))
    assert not torch.equal(a, random_weights(loaded.config, seed=1)[name])
    assert abs(float(a.std()) - 0.02) < 1e-3 and abs(float(w["layers.3.input_layernorm.weight"].mean()) - 1) < 0.02


def test_checkpoint_folder_holds_the_recipe_weights(tmp_path):
    out = write_checkpoint("tiny", tmp_path / "ck", dtype="fp32", shard_bytes=1 << 20, progress=lambda m: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2 and cfg["rope_scaling"]["factor"] == 2.0
    ours, theirs = resolve_model(recipe="tiny"), resolve_model(checkpoint=out, recipe="tiny")
    assert ours.config == theirs.config
    for k in ours.weights:
        assert torch.equal(ours.weights[k], theirs.weights[k]), k
    with pytest.raises(FileExistsError):
        write_checkpoint("tiny", out, progress=lambda m: None)


def test_bf16_checkpoint_is_read_in_its_stored_dtype(tmp_path):
    out = write_checkpoint("tiny", tmp_path / "ck", model_type="xverse", progress=lambda m: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "xverse" and cfg["torch_dtype"] == "bfloat16"
    loaded = resolve_model(checkpoint=out)  # no recipe: architecture and tokenizer from the folder
    t = loaded.weights["layers.1.self_attn.k_proj.weight"]
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, random_tensor("layers.1.self_attn.k_proj.weight", tuple(t.shape), 0, torch.bfloat16))
    assert loaded.tokenizer().encode("hello world")


def test_memory_refusal_names_the_numbers_and_a_depth_that_fits():
    from export import targets

    loaded = resolve_model(recipe="xgen-7b-8k-base")
    et, onnx = targets.get("executorch"), targets.get("onnx")
    need = estimated_peak_bytes(loaded.config, et.bytes_per_parameter)
    check_memory(loaded, [et, onnx], available=need)  # fits exactly: no error
    with pytest.raises(MemoryRefused, match=r"6\.90B parameters to executorch needs an estimated 77\.7 GiB .* "
                                            r"24\.0 GiB is available; --n-layers 8 would fit"):
        check_memory(loaded, [onnx, et], available=24 << 30)
    check_memory(loaded, [onnx], available=40 << 30)  # traced without weights: 5 bytes/parameter fit in 40 GiB


def test_export_cli_refuses_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export", "--target", "onnx", "--recipe", "xverse-13b-256k",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    if r.returncode == 0:  # pragma: no cover - a machine with > 150 GiB free
        pytest.skip("this machine has the memory for a 13B export")
    assert r.returncode == 1 and "needs an estimated" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_manifest_records_each_stage(export_artifact):
    m = json.loads((export_artifact("onnx", "tiny", "int4") / "manifest.json").read_text())
    stages = m["export"]["stages"]
    assert list(stages) == ["trace", "rewrite", "write"] or list(stages) == ["load+quantize", "trace", "rewrite", "write"]
    for v in stages.values():
        assert v["seconds"] >= 0 and 100 < v["peak_rss_mb"] < 20000
    assert m["export"]["peak_rss_mb"] == max(v["peak_rss_mb"] for v in stages.values())


def test_onnx_traced_without_weights_equals_the_traced_model(tiny):
    """The weight-free trace (meta decoder, initializers filled one by one, then optimized) gives
    the graph and constants the exporter gives for the decoder with its weights."""
    from collections import Counter

    import numpy as np

    from export import targets
    from export.pipeline import ExportJob
    from export.targets.onnx import lowering

    job = ExportJob(tiny, None, "/nonexistent", targets.get("onnx"), "portable", progress=lambda s: None)
    donor = lowering._buffer_donor(job)
    without = lowering.trace(job.decoder(meta=True), lowering._initializer_source(job, donor))
    with_weights = lowering.trace(job.decoder())
    assert Counter(n.op_type for n in without.graph) == Counter(n.op_type for n in with_weights.graph)
    def constants(model):
        """Named weights by name; constants the optimizer folded (named val_N, numbered in
        trace order) as a sorted list of (dtype, shape, bytes)."""
        named, folded = {}, []
        for name, v in model.graph.initializers.items():
            x = v.const_value.numpy()
            if name.startswith("val_"):
                folded.append((x.dtype.str, x.shape, x.tobytes()))
            else:
                named[name] = x
        return named, sorted(folded)

    (named_a, folded_a), (named_b, folded_b) = constants(without), constants(with_weights)
    assert folded_a == folded_b and set(named_a) == set(named_b)
    for name in named_a:
        assert np.array_equal(named_a[name], named_b[name]), name
