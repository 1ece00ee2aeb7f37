"""Core ML lowering: the one decoder as an iOS 18 ML Program with the KV cache as states.

``lower(job)`` traces ``job.decoder`` with torch.export (query length dynamic, 1 … capacity-1),
converts it with coremltools to an fp16 ML Program whose K/V caches are Core ML *states*
(read and written in place on device), and, for int4, replaces every quantized weight
constant by a ``constexpr_blockwise_shift_scale`` built from the shared quantization's own
codes and fp16 scales (block 32 along the input dimension) — Core ML never re-quantizes.

Choices, and why:
- One function with a flexible query length (``RangeDim(1, capacity-1)``) rather than a
  prefill + decode multifunction package: the same program serves any prompt length and
  single-token decode, weights are stored once, and the op census is identical to either
  function of a multifunction package (the shape is the only difference). A fixed-shape
  decode function would be what the Neural Engine prefers; that is a later variant.
- fp16 everywhere except the RMSNorm statistics (x², mean, +eps, rsqrt, x·rsqrt) and the
  attention-mask arithmetic, which stay fp32: SmolLM2's residual stream reaches |x| ≈ 2.3e4,
  whose square overflows fp16 (max 65504) and would zero the normalized row; slot − position
  must be exact past 2048, where fp16 integers are no longer consecutive.
- The mask is built arithmetically (transform ``mask_arithmetic``, −3e4 for hidden slots):
  coremltools' ``select`` with scalar branches drops the condition's dynamic shape.
- K/V heads are expanded with ``expand`` (a tile in MIL); folding them cannot take a dynamic
  query length through torch.export.
- Embedding: quantized like every other weight (it is tied to the output head in SmolLM2, so
  one int4 tensor serves the gather and the head). RoPE cos/sin tables and norm weights stay
  fp16 constants (small, and quantizing them would change the math the reference computes).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from export.targets import Flavour
from export.transforms import Transform

PACKAGE = "model.mlpackage"
FLAVOURS = (
    Flavour("fp16", "iOS 18 fp16 ML Program, KV cache as Core ML states, int4 blockwise weights", (
        Transform("cache_slice"), Transform("rope_rows_slice"), Transform("attention_expand_kv"),
        Transform("mask_arithmetic", {"value": -3e4}))),
)
_FP32_TYPES = {"pow", "reduce_mean", "rsqrt"}  # RMSNorm statistics


def export_program(model, capacity: int) -> torch.export.ExportedProgram:
    """torch.export with a dynamic query length T in [1, capacity-1] (tokens [1, T], input_pos [T])."""
    T = torch.export.Dim("T", min=1, max=capacity - 1)
    ex = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with torch.no_grad():
        ep = torch.export.export(model, ex, dynamic_shapes=({1: T}, {0: T}), strict=False)
    return ep.run_decompositions({})


def _keep_fp32(op) -> bool:
    """RMSNorm statistics and the position/mask arithmetic stay fp32 (see module docstring)."""
    if op.op_type in _FP32_TYPES:
        return True
    producers = [v.op for v in op.inputs.values() if hasattr(v, "op") and v.op is not None]
    if op.op_type in ("add", "mul") and any(p.op_type in ("reduce_mean", "rsqrt") for p in producers):
        return True
    return _from_positions(op)


def _from_positions(op) -> bool:
    """True if every non-constant input of ``op`` derives from the ``input_pos`` input alone.

    Computed once per block by one forward sweep (the graph is deep: no recursion)."""
    block = op.enclosing_block
    if getattr(block, "_edgellm_pos_ops", None) is None:
        derived: set[int] = set()  # ids of vars computed from input_pos and constants only
        pos_ops: set[int] = set()
        for o in block.operations:
            found, ok = False, True
            for v in o.inputs.values():
                for var in (v if isinstance(v, (list, tuple)) else [v]):
                    if var.val is not None:
                        continue
                    if (var.op is None and var.name == "input_pos") or id(var) in derived:
                        found = True
                    else:
                        ok = False
            if found and ok:
                pos_ops.add(id(o))
                derived.update(id(x) for x in o.outputs)
        block._edgellm_pos_ops = pos_ops
    return id(op) in block._edgellm_pos_ops


def convert(model, capacity: int, progress=print):
    """The fp16 ML Program (coremltools MLModel, not loaded) for a decoder in the fp16 flavour."""
    import coremltools as ct

    t = time.time()
    ep = export_program(model, capacity)
    progress(f"coreml: torch.export in {time.time() - t:.1f}s")
    t = time.time()
    T = ct.RangeDim(lower_bound=1, upper_bound=capacity - 1, default=1)
    mlmodel = ct.convert(
        ep,
        inputs=[ct.TensorType("tokens", shape=(1, T), dtype=np.int32),
                ct.TensorType("input_pos", shape=(T,), dtype=np.int32)],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.transform.FP16ComputePrecision(op_selector=lambda op: not _keep_fp32(op)),
        skip_model_load=True,
    )
    progress(f"coreml: converted to an fp16 ML Program in {time.time() - t:.1f}s")
    return mlmodel


def _weight_key(const_name: str) -> str:
    """``p_layers_0_self_attn_q_proj_weight_to_fp16`` -> ``layers_0_self_attn_q_proj_weight``."""
    name = const_name[2:] if const_name.startswith("p_") else const_name
    return name[: -len("_to_fp16")] if name.endswith("_to_fp16") else name


def int4_pass(quant):
    """A MIL graph pass replacing each quantized weight const by constexpr_blockwise_shift_scale.

    Weight consts are matched by name to ``quant.weights`` and checked by value: the const
    (converted from the dequantized reference) must equal fp16(codes * scales) exactly, so a
    mismatch in naming or layout is an error, not a silent wrong model.
    """
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    by_key = {k.replace(".", "_"): (k, q) for k, q in quant.weights.items()}

    class Int4Weights(AbstractGraphPass):
        def __init__(self):
            super().__init__()
            self.replaced: dict[str, str] = {}

        def apply(self, prog):
            for f in prog.functions.values():
                for op in list(f.operations):
                    if op.op_type != "const" or _weight_key(op.name) not in by_key:
                        continue
                    name, q = by_key[_weight_key(op.name)]
                    self._replace(op, name, q)
            done = {id(by_key[k.replace(".", "_")][1]) for k in self.replaced.values()}
            missing = sorted(k for k, q in quant.weights.items() if id(q) not in done)  # tied: one tensor
            if missing:
                raise RuntimeError(f"coreml: quantized weights not found in the converted program: {missing[:4]}")

        def _replace(self, op, name, q):
            codes = q.codes.numpy()
            if q.zero_points is None:
                data, offset = codes.astype(types.np_int4_dtype), None
            else:  # asymmetric: uint4 codes minus a uint4 offset per block
                data = codes.astype(np.uint8).astype(types.np_uint4_dtype)
                offset = q.zero_points.numpy().astype(np.uint8).astype(types.np_uint4_dtype)
            scales = q.scales.numpy().astype(np.float16)
            if not np.array_equal(scales.astype(np.float32), q.scales.numpy()):
                raise ValueError(f"coreml: scales of {name} are not fp16-representable (quantization contract)")
            val = op.outputs[0].val
            deq = q.dequantize().numpy().astype(np.float16)
            if val.shape != deq.shape or not np.array_equal(val, deq):
                raise RuntimeError(f"coreml: const {op.name} does not hold the dequantized {name}")
            with op.enclosing_block:
                kw = {"offset": offset} if offset is not None else {}
                new = mb.constexpr_blockwise_shift_scale(data=data, scale=scales, name=op.name + "_int4",
                                                         before_op=op, **kw)
            op.enclosing_block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True,
                force_replace=True)
            op.enclosing_block.remove_ops([op])
            self.replaced[op.name] = name

    return Int4Weights()


def quantize_weights(mlmodel, quant, progress=print):
    """Swap the fp16 weights of ``mlmodel`` for the shared int4 codes/scales (a new MLModel)."""
    import coremltools as ct
    from coremltools.models.utils import _apply_graph_pass

    t = time.time()
    p = int4_pass(quant)
    out = _apply_graph_pass(mlmodel, p, spec_version=ct.target.iOS18, skip_model_load=True)
    progress(f"coreml: {len(p.replaced)} weight tensors -> constexpr_blockwise_shift_scale in {time.time() - t:.1f}s")
    return out, p.replaced


def lower(job) -> Path:
    cap = job.loaded.config.max_seq_len
    with job.stage("convert"):
        model = job.decoder(quantized_reference=True)
        mlmodel = convert(model, cap, job.progress)
        applied = list(model.transforms)
        del model
    replaced = {}
    if job.quant is not None:
        with job.stage("int4 weights"):
            mlmodel, replaced = quantize_weights(mlmodel, job.quant, job.progress)
    with job.writer() as w:
        with job.stage("write"):
            mlmodel.save(str(w.path(PACKAGE)))
            job.write_tokenizer(w)
        manifest = job.manifest(PACKAGE, applied, coreml={
            "minimum_deployment_target": "iOS18", "compute_precision": "fp16 (RMSNorm statistics, mask fp32)",
            "inputs": {"tokens": "int32[1, T]", "input_pos": "int32[T]", "T": [1, cap - 1]},
            "outputs": {"logits": "fp16[1, T, vocab]"}, "states": "kv_cache k/v per layer, fp16",
            "int4_tensors": len(replaced)})
        return w.commit(manifest)

