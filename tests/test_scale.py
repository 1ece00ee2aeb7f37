"""The scale path's pieces that run at any size: per-tensor random weights, full-size HF folders
written tensor by tensor, lazy loading in the stored dtype, per-stage export accounting, and the
up-front memory refusal."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgellm.errors import EdgeLLMError
from edgellm.model import resolve_model
from edgellm.quantization import precision_of
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
    with pytest.raises(EdgeLLMError, match="exists"):
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
    et, onnx, coreml = targets.get("executorch"), targets.get("onnx"), targets.get("coreml")
    need = estimated_peak_bytes(loaded.config, et)
    assert need <= 12 << 30  # issue 12: the 7B .pte export fits in 12 GiB (measured: README scale section)
    check_memory(loaded, [et], available=need)  # fits exactly: no error
    with pytest.raises(MemoryRefused, match=r"6\.90B parameters to executorch needs an estimated 9\.2 GiB "
                                            r"\(1\.1 bytes/parameter\) but 6\.0 GiB is available; --n-layers 16 would fit"):
        check_memory(loaded, [et], available=6 << 30)  # its KV cache is never resident: not counted
    # Core ML holds its cache states in fp16 (4 GiB at 8K): measured 10.8 GiB (README)
    assert need < estimated_peak_bytes(loaded.config, coreml) <= 12 << 30
    with pytest.raises(MemoryRefused, match=r"to coreml needs an estimated 11\.5 GiB \(1\.07 bytes/parameter plus its "
                                            r"KV cache state of 4\.0 GiB, which --max-seq-len shrinks\) but 10\.0 GiB"):
        check_memory(loaded, [onnx, et, coreml], available=10 << 30)
    check_memory(loaded, [onnx], available=12 << 30)  # traced without weights, no cache: 9.9 GiB fits in 12
    with pytest.raises(MemoryRefused, match="to onnx needs an estimated 9.9 GiB"):
        check_memory(loaded, [onnx], available=8 << 30)


def test_export_cli_refuses_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export", "--target", "coreml", "--recipe", "xverse-13b-256k",
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
    source = job.tensor_source()
    without = lowering.trace(job.decoder(meta=True), lambda name: None if (t := source(name)) is None else t.numpy())
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


def test_executorch_traced_without_weights_equals_the_weighted_model(tiny, tiny_quant):
    """The meta-built decoder given its tensors one by one exports the same program (graph,
    constants, parameters, int4 codes and scales) as the decoder built with all its weights."""
    from torch import nn

    from export import targets
    from export.pipeline import ExportJob
    from export.targets.executorch import lowering

    job = ExportJob(tiny, tiny_quant, "/nonexistent", targets.get("executorch"), "portable", progress=lambda s: None)
    streamed, _, names = lowering.exported_program(job)
    model = job.decoder()
    modules = dict(model.named_modules())
    for name, qw in tiny_quant.weights.items():
        mod = modules[name.rpartition(".")[0]]
        mod.weight = nn.Parameter(lowering.int4_weight(mod, name, qw), requires_grad=False)
    whole = lowering.export_program(model, tiny.config.max_seq_len)
    assert sorted(names) == sorted(tiny_quant.weights)
    assert [str(n.target) for n in streamed.graph.nodes] == [str(n.target) for n in whole.graph.nodes]
    assert streamed.graph_signature == whole.graph_signature
    for table in ("constants", "state_dict"):
        a, b = getattr(streamed, table), getattr(whole, table)
        assert list(a) == list(b)
        for k in a:
            x, y = a[k], b[k]
            if hasattr(x, "qdata"):  # the int4 tensors: codes and scales bit for bit
                assert torch.equal(x.qdata, y.qdata) and torch.equal(x.scale, y.scale), k
            else:
                assert x.dtype == y.dtype and torch.equal(x, y) and x.requires_grad == y.requires_grad, k


def test_quantization_holds_one_tensor_in_fp32_at_a_time(tmp_path, monkeypatch):
    """Quantizing a bf16 checkpoint never has more live fp32 than one tensor's chunk plus the
    small non-quantized tensors: counted over every tensor object alive at each read."""
    import gc

    from edgellm import quantization
    from export.pipeline import quantize_for

    ck = write_checkpoint("tiny", tmp_path / "ck", n_layers=4, progress=lambda m: None)
    loaded = resolve_model(checkpoint=ck, recipe="tiny")
    cfg = loaded.config
    live = []

    def fp32_bytes() -> int:
        gc.collect()  # garbage of earlier tests is not live
        seen, total = set(), 0
        for o in gc.get_objects():
            if type(o) in (torch.Tensor, torch.nn.Parameter) and not o.is_meta and o.dtype == torch.float32:
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        return total

    real = quantization.quantize_weight

    def counting(w, *a, **kw):
        assert w.dtype == torch.bfloat16, "a weight reached the quantizer converted from its stored dtype"
        live.append(fp32_bytes())
        return real(w, *a, **kw)

    monkeypatch.setattr(quantization, "quantize_weight", counting)
    baseline = fp32_bytes()
    q = quantize_for(loaded, progress=lambda m: None)
    layer = sum(torch.Size(s).numel() for k, s in loaded.weights.shapes.items() if k.startswith("layers.0."))
    worst = max(live) - baseline
    # scales of what is done so far (1/32 of a float per weight) + one layer in fp32 at most
    scales = sum(w.scales.nbytes for w in q.weights.values())
    assert len(live) == len({id(w) for w in q.weights.values()})
    assert worst <= scales + 4 * layer, (worst, scales, 4 * layer, cfg.n_layers)


# ---- full width, two layers: the path of a user who downloaded XGen-7B, at a size CI affords ----

@pytest.fixture(scope="module")
def xgen_two_layers(tmp_path_factory):
    """XGen-7B's HF folder at full width (dim 4096, vocab 51200), cut to two layers, bf16."""
    return write_checkpoint("xgen-7b-8k-base", tmp_path_factory.mktemp("xgen") / "ck", n_layers=2,
                            progress=lambda m: None)


def test_xgen_folder_reads_its_own_tokenizer_without_a_recipe(xgen_two_layers):
    """XGen's ranks (tiktoken GPT-2 plus added whitespace tokens) are not expressible as HF merges:
    the folder carries the tiktoken files and no tokenizer.json that its reader would refuse
    ("produced by merges #50000 and #50001"), and loading the folder alone finds them."""
    from edgellm.tokenizer import load_tokenizer

    assert not (xgen_two_layers / "tokenizer.json").exists()
    text = "def f(x):\n        return x  # eight spaces, then two"
    tok = resolve_model(checkpoint=xgen_two_layers).tokenizer()
    assert tok.encode(text) == load_tokenizer("xgen-7b-8k-base").encode(text)


# Peak RSS allowed per parameter above the libraries, per target, from the streamed path's
# measured peaks at this size (see the README's scale section); whole-model fp32 alone is 4.
# ExecuTorch: 2.51 GiB measured (2.0 here allows 3.04); it was 4.1 GiB while the program held
# the int8 codes and XNNPACK's preprocess a deep copy of them.
EXPORT_LIBRARIES_GIB = 1.5
# Core ML: 2.59 GB measured at this size (2.0 here allows 3.10 GB).
PEAK_BYTES_PER_PARAMETER = {"onnx": 3.0, "executorch": 2.0, "coreml": 2.0}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
def test_full_width_xgen_exports_within_a_bound_from_its_size(xgen_two_layers, target, tmp_path):
    from runtime.bench import run_measured

    p, wall, peak_mb = run_measured(["-m", "export", "--target", target, "--checkpoint", str(xgen_two_layers),
                                     "--recipe", "xgen-7b-8k-base", "--max-seq-len", "256", "--out", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    (art,) = [d for d in tmp_path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    m = json.loads((art / "manifest.json").read_text())
    loaded = resolve_model(checkpoint=xgen_two_layers, recipe="xgen-7b-8k-base")
    cfg = loaded.config
    assert m["config"]["dim"] == 4096 and m["config"]["n_layers"] == 2 and m["vocab_size"] == 51200
    params = cfg.num_parameters()
    # The per-parameter figures were measured all-int4; an int8 tensor (the recipe's embedding
    # and head: half of this two-layer model) holds 0.5 byte more of codes in the shared
    # quantization and again in the target's copy of them.
    int8 = sum(math.prod(s) for n, s in loaded.weights.shapes.items()
               if precision_of(n, loaded.recipe.quantization, cfg.tie_embeddings) == "int8")
    bound_mb = (EXPORT_LIBRARIES_GIB * 2**30 + PEAK_BYTES_PER_PARAMETER[target] * params + 1.0 * int8) / 2**20
    # The wrapper's VmHWM at exit covers only what followed the last stage's reset of it
    # (edgellm.memory); the manifest holds each stage's own peak. The larger is the run's.
    peak_mb = max(peak_mb, m["export"]["peak_rss_mb"])
    print(f"{target}: peak {peak_mb:.0f} MB (bound {bound_mb:.0f} MB) for {params / 1e9:.2f}B parameters, {wall:.0f}s")
    assert peak_mb <= bound_mb, f"{target}: peak RSS {peak_mb:.0f} MB exceeds {bound_mb:.0f} MB"


def test_streamed_int4_reference_equals_the_materialized_one(tiny, tiny_quant, monkeypatch):
    """Dequantizing each weight as it is read gives the materialized reference's logits bit for
    bit, and the streamed decoder holds no fp32 copy of the quantized weights."""
    from runtime.backends import eager

    ids = [1, 5, 9, 200, 3, 77]
    whole = eager.EagerBackend.from_loaded(tiny, int4=True, quantization=tiny_quant, activations=True)
    monkeypatch.setattr(eager, "STREAM_FP32_ABOVE", 0)
    streamed = eager.EagerBackend.from_loaded(tiny, int4=True, quantization=tiny_quant, activations=True)
    held = sum(p.numel() for p in streamed.model.parameters())
    assert held < tiny.config.num_parameters() // 50  # norms only: no quantized weight is stored
    assert np.array_equal(whole.prefill(ids), streamed.prefill(ids))
    assert np.array_equal(whole.decode(42), streamed.decode(42))


def test_streamed_reference_measures_its_noise_floor_in_one_pass(tiny, tiny_quant, monkeypatch):
    """Each call of a streamed reference dequantizes every weight (a 7B step is ~20 s), so its
    perturbed floor pass is one teacher-forced call a prompt; a materialized one still steps.
    Random weights: the floor stays rounding-sized either way."""
    from runtime.backends import eager
    from runtime.parity import all_logits, noise_floor

    ids, plen = [1, 5, 9, 200, 3, 77, 12, 400, 8, 31, 64, 2], 4
    monkeypatch.setattr(eager, "STREAM_FP32_ABOVE", 0)
    streamed = eager.EagerBackend.from_loaded(tiny, int4=True, quantization=tiny_quant, activations=True)
    monkeypatch.undo()
    whole = eager.EagerBackend.from_loaded(tiny, int4=True, quantization=tiny_quant, activations=True)
    assert streamed.capabilities.whole_model_per_call and not whole.capabilities.whole_model_per_call
    for backend, calls_wanted in ((streamed, 1), (whole, len(ids) - plen)):
        ref = all_logits(backend, ids, plen)
        calls = []
        forward = backend._forward
        monkeypatch.setattr(backend, "_forward", lambda chunk, start: calls.append(len(chunk)) or forward(chunk, start))
        floor = noise_floor(backend, ids, plen, ref)
        monkeypatch.undo()
        assert len(calls) == calls_wanted, calls
        assert len(floor.rel) == len(ids) - plen
        assert floor.max_rel < 1e-2 and floor.top1_rate >= 0.75, (floor.max_rel, floor.top1_rate)
