"""Core ML lowering: the one decoder as an iOS 18 ML Program with the KV cache as states.

``lower(job)`` traces the flavour's decoder with torch.export (query length dynamic,
1 … capacity-1), converts it with coremltools to an fp16 ML Program whose K/V caches are Core ML
*states* (read and written in place on device), and replaces every quantized weight constant by
a ``constexpr_blockwise_shift_scale`` built from the shared quantization's own codes and fp16
scales — Core ML never re-quantizes. int4: int4 codes, one scale per block of ``group_size``
(32) along the input dimension (asymmetric: uint4 codes and a uint4 offset per block). int8:
int8 codes, one scale per row (scale shape [rows, 1]: one block the whole row, i.e. per output
channel), no offset. Both are the iOS 18 op coremltools' own ``linear_quantize_weights`` emits
(int4 per_block, int8 per_channel); float weights stay fp16 constants. Core ML quantizes no
activations: the reference is the weight-only eager model.

Memory: no fp32 or fp16 copy of the model exists at any point. The decoder is traced with its
quantized weights allocated but never written (``weightless_decoder``), coremltools receives a
stride-0 placeholder per quantized weight (``placeholder_weights``), and a pass of ours inside
the conversion pipeline swaps each placeholder for its codes just before the fp16 cast
(``QuantizedWeights``). What remains is the program's codes (one byte each, int4 or int8; an
int8 constexpr holds the shared tensor itself, not a copy), one tensor's
temporaries and, until each is swapped, the shared quantization: the run's last consumer of it
(``job.last_use``) frees each shared weight once its constexpr exists (7B: 17.0 -> 11.6 GB). The artifact equals the one the former convert-fp16-then-
swap lowering wrote (same program and weight blob, checked under a fixed PYTHONHASHSEED; since then
the broadcast choice below fixes which tensor each cache write reads its size from).

Determinism: re-exporting the same model writes the same bytes, whatever PYTHONHASHSEED is.
coremltools 9.0 alone does not: (1) when it broadcasts two tensors whose sizes along an axis are
different symbols (the cache write copies the new K/V into a slice of the cache), it keeps
whichever symbol a ``set`` yields first, and so reads the runtime size from one tensor or the
other — a different program per hash seed (``_deterministic_broadcast`` picks the oldest symbol);
(2) the spec is serialized with protobuf maps (op inputs, attributes) in hash-table order, which
varies per process (``_canonical_package`` re-serializes it with sorted map keys); (3) the
package's Manifest.json names its two items by random UUIDs (replaced by UUIDs derived from each
item's path).

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
- Embedding: quantized like every other weight, at its own precision (it is tied to the output
  head in SmolLM2, so one int4 or int8 constexpr serves the gather and the head). RoPE cos/sin
  tables and norm weights stay fp16 constants (small, and quantizing them would change the math
  the reference computes).
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from edgellm.decoder import Decoder, fill
from export.targets import Flavour
from export.transforms import Transform

PACKAGE = "model.mlpackage"
FLAVOURS = (
    Flavour("fp16", "iOS 18 fp16 ML Program, KV cache as Core ML states, int4/int8 blockwise weights", (
        Transform("cache_slice"), Transform("rope_rows_slice"), Transform("attention_expand_kv"),
        Transform("mask_arithmetic", {"value": -3e4})), kv_dtypes=("fp32", "fp16"), kv_window=True),
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


def convert(ep: torch.export.ExportedProgram, capacity: int, weights: "QuantizedWeights | None" = None,
            progress=print):
    """The fp16 ML Program (coremltools MLModel, not loaded) of a traced decoder in the fp16 flavour.

    With ``weights``, the conversion runs coremltools' default pipeline with one pass of ours
    (``edgellm::quantized_weights``) inserted just before ``common::add_fp16_cast``: there each
    placeholder weight const becomes the shared int4 or int8 codes, before any fp16 copy exists."""
    import coremltools as ct

    t = time.time()
    T = ct.RangeDim(lower_bound=1, upper_bound=capacity - 1, default=1)
    pipeline = ct.PassPipeline.DEFAULT
    with _registered(weights) as pass_id, _deterministic_broadcast():
        if pass_id is not None:
            pipeline.insert_pass(pipeline.passes.index("common::add_fp16_cast"), pass_id)
        mlmodel = ct.convert(
            ep,
            inputs=[ct.TensorType("tokens", shape=(1, T), dtype=np.int32),
                    ct.TensorType("input_pos", shape=(T,), dtype=np.int32)],
            outputs=[ct.TensorType("logits", dtype=np.float16)],
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=lambda op: not _keep_fp32(op)),
            pass_pipeline=pipeline,
            skip_model_load=True,
        )
    progress(f"coreml: converted to an fp16 ML Program in {time.time() - t:.1f}s")
    if weights is not None:
        mlmodel = _reconvert(mlmodel, progress)
    return mlmodel


def _reconvert(mlmodel, progress=print):
    """The saved program read back and run through coremltools' default pipeline once more.

    The previous lowering swapped the weights with ``_apply_graph_pass``, which does exactly
    this (milproto -> pymil -> default pipeline -> milproto), and its artifact shows it: a
    second negative-index guard on the embedding gather, renumbered names, no build-info
    attributes, no debug-handle map. Kept so the artifact stays the same program (equal protos)
    with a byte-identical weight blob; the weights are already int4 here (one byte per code once
    read back), and the first program is dropped before the second is built."""
    import coremltools as ct
    from coremltools.models.utils import _apply_graph_pass

    t = time.time()
    mlmodel._mil_program = None
    gc.collect()  # a MIL program is a web of op <-> var cycles: freed only by the collector
    out = _apply_graph_pass(mlmodel, [], spec_version=ct.target.iOS18, skip_model_load=True)
    progress(f"coreml: program re-read and re-run through the default pipeline in {time.time() - t:.1f}s")
    return out


@contextmanager
def _deterministic_broadcast():
    """coremltools' broadcast-shape rule with its one hash-order choice made deterministic.

    ``frontend._utils.pymil_broadcast_shapes`` resolves an axis whose sizes are several distinct
    symbols to ``list(symbols)[0]``: sympy symbols hash by name, so the pick (and hence which
    tensor's ``shape`` the program reads) follows PYTHONHASHSEED. The wrapper keeps every other
    result and replaces each symbolic dim by the oldest candidate symbol (coremltools numbers
    them ``is<N>`` in creation order); for the cache write that is the written value's, which
    also lets the otherwise unused cache slice be dropped."""
    from coremltools.converters.mil.frontend import _utils
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    original = _utils.pymil_broadcast_shapes

    def broadcast_shapes(shapes):
        result = original(shapes)
        rank = len(result)
        for i, dim in enumerate(result):
            candidates = [s[i - rank + len(s)] for s in shapes if len(s) >= rank - i]
            symbols = {str(d): d for d in candidates if is_symbolic(d)}
            if is_symbolic(dim) and len(symbols) > 1:
                result[i] = symbols[min(symbols, key=lambda n: (len(n), n))]
        return result

    _utils.pymil_broadcast_shapes = broadcast_shapes
    try:
        yield
    finally:
        _utils.pymil_broadcast_shapes = original


def _canonical_package(package: Path) -> None:
    """Make a saved .mlpackage a function of its content alone (see the module docstring).

    The spec is parsed back and written with protobuf's deterministic serialization (map entries
    sorted by key; the same message otherwise), and Manifest.json's random item identifiers are
    replaced by UUIDs derived from each item's path, in the format libmodelpackage writes."""
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest["itemInfoEntries"]
    root = package / "Data" / entries[manifest["rootModelIdentifier"]]["path"]
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgellm:mlpackage/" + item["path"]))
           for old, item in entries.items()}
    manifest["itemInfoEntries"] = {ids[old]: item for old, item in entries.items()}
    manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    spec = Model_pb2.Model()
    spec.ParseFromString(root.read_bytes())
    root.write_bytes(spec.SerializeToString(deterministic=True))


def _weight_key(const_name: str) -> str:
    """``p_layers_0_self_attn_q_proj_weight_to_fp16`` -> ``layers_0_self_attn_q_proj_weight``."""
    name = const_name[2:] if const_name.startswith("p_") else const_name
    return name[: -len("_to_fp16")] if name.endswith("_to_fp16") else name


# --------------------------------------------------------------------------- weights without copies

def _placeholder(shape, key: int) -> torch.Tensor:
    """A weight that costs no memory: the constant ``key`` broadcast to ``shape`` (stride 0).

    Distinct per quantized tensor, so coremltools' const deduplication (which hashes values)
    keeps distinct weights distinct, as it does with the real ones."""
    return torch.full((), float(key)).expand(*shape)


def weightless_decoder(job) -> Decoder:
    """The flavour's decoder on the CPU, traceable exactly as the real one, holding no weights:
    each quantized weight is allocated but never written (untouched pages cost no memory), the
    other parameters (norms) and the buffers from ``job.tensor_source()``.

    Not the meta device: torch.export decomposes some ops differently for meta tensors (a
    ``view`` becomes ``_unsafe_view`` with a static shape, a cache slice disappears), which
    would change the converted program."""
    quant = job.quant.weights if job.quant is not None else {}
    source = job.tensor_source()
    model = job.decoder(meta=True)
    made: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its CPU tensor: tied parameters stay one
    keep = []  # the meta tensors, alive while their ids key ``made``

    def parameter(name, _mod, p):
        if id(p) not in made:
            keep.append(p)
            value = torch.empty(p.shape, dtype=torch.float32) if name in quant else source(name)
            if tuple(value.shape) != tuple(p.shape):
                raise RuntimeError(f"coreml: {name} is {tuple(value.shape)} in the checkpoint, "
                                   f"{tuple(p.shape)} in the decoder")
            made[id(p)] = torch.nn.Parameter(value, requires_grad=False)
        return made[id(p)]

    fill(model, parameter, source)
    return model.eval()


def placeholder_weights(ep: torch.export.ExportedProgram, job) -> dict[str, tuple[int, str, object]]:
    """Swap, in the traced ``ep``, each quantized weight (allocated, never written) for a
    stride-0 placeholder: what coremltools turns into a const without copying it.

    Returns {lifted const name (``p_...``): (placeholder key, state-dict name, QuantizedWeight)}."""
    quant = job.quant.weights if job.quant is not None else {}
    keys: dict[int, int] = {}  # id(QuantizedWeight) -> key: a tied pair shares one placeholder
    lifted = {s.target: s.arg.name for s in ep.graph_signature.input_specs if s.target is not None}
    placeholders: dict[str, tuple[int, str, object]] = {}
    for name in ep.graph_signature.parameters:
        if name in quant:
            q = quant[name]
            key = keys.setdefault(id(q), len(keys) + 1)
            ep.state_dict[name] = torch.nn.Parameter(_placeholder(q.shape, key), requires_grad=False)
            placeholders[lifted[name]] = (key, name, q)
    return placeholders


class QuantizedWeights:
    """A MIL graph pass replacing each placeholder weight const by constexpr_blockwise_shift_scale.

    Runs right before ``common::add_fp16_cast``: each quantized weight const (still the fp32
    placeholder of ``placeholder_weights``) becomes ``cast(constexpr_blockwise_shift_scale(codes, fp16
    scales), fp32)``; add_fp16_cast then casts it back to fp16 and ``cast_optimization`` drops
    the pair, so the consumer reads the constexpr directly: the program the old
    convert-then-swap produced, without the fp32 and fp16 copies of every weight. Codes are
    produced one tensor at a time from the shared quantization (int4: 4 bits per code there, one
    byte per code in the MIL program, coremltools' int4 numpy dtype being int8 with metadata;
    int8: the stored codes, one byte each, handed over as they are). A tied embedding/head is
    one QuantizedWeight, hence one constexpr read by both the gather and the head's linear.

    Each const is matched by name and checked to still be its own placeholder (same shape,
    stride 0, its key) read as a linear weight or a gather table, so a renamed, folded or
    relaid-out weight is an error, not a silently wrong model.
    """

    def __init__(self, quant, placeholders: dict[str, tuple[int, str, object]], release: bool = False):
        self.quant = quant
        self.placeholders = placeholders
        self.release = release  # the run's last consumer: free each shared weight once it is a const
        self.replaced: dict[str, str] = {}  # constexpr name -> state-dict name
        self.counts: dict[str, int] = {}  # precision (int4 | int8) -> constexprs made

    def __call__(self, prog):
        self.apply(prog)

    def set_options(self, options):
        if options:
            raise ValueError("edgellm::quantized_weights takes no options")

    def apply(self, prog):
        done: dict[int, object] = {}  # id(QuantizedWeight) -> its constexpr var (tied weights)
        for f in prog.functions.values():
            ops = list(f.operations)
            order = {id(o): i for i, o in enumerate(ops)}
            for op in ops:
                if op.op_type == "const" and op.name in self.placeholders:
                    self._replace(f, op, *self.placeholders[op.name], done, order)
        missing = sorted(k for k, q in self.quant.weights.items() if id(q) not in done)
        if missing:
            raise RuntimeError(f"coreml: quantized weights not found in the converted program: {missing[:4]}")

    def _replace(self, block, op, key, name, q, done, order):
        from coremltools.converters.mil.mil import Builder as mb
        from coremltools.converters.mil.mil.scope import ScopeInfo

        val = op.outputs[0].val
        if (tuple(val.shape) != tuple(q.shape) or any(val.strides) or val.dtype != np.float32
                or val.reshape(-1)[0] != key):
            raise RuntimeError(f"coreml: const {op.name} is no longer the placeholder of {name}")
        for child in op.outputs[0].child_ops:
            uses = [k for k, v in child.inputs.items() if v is op.outputs[0]]
            if (child.op_type, uses) not in (("linear", ["weight"]), ("gather", ["x"])):
                raise RuntimeError(f"coreml: {name} is read by {child.op_type}({uses}), not as a weight")
        first = min(op.outputs[0].child_ops, key=lambda o: order[id(o)])  # where add_fp16_cast puts it
        with block, mb.scope(*[ScopeInfo(source=k, data=v) for k, v in op.scopes.items()]):
            if id(q) not in done:
                data, kw = _constexpr_inputs(q, name)
                scales = q.scales.numpy().astype(np.float16)
                if not np.array_equal(scales.astype(np.float32), q.scales.numpy()):
                    raise ValueError(f"coreml: scales of {name} are not fp16-representable (quantization contract)")
                tag = q.precision  # int4 | int8: the op names say which
                new = mb.constexpr_blockwise_shift_scale(data=data, scale=scales, name=f"{op.name}_to_fp16_{tag}",
                                                         before_op=first, **kw)
                done[id(q)] = mb.cast(x=new, dtype="fp32", name=f"{op.name}_{tag}_fp32", before_op=first)
                self.replaced[new.name] = name
                self.counts[tag] = self.counts.get(tag, 0) + 1
                del data, kw, scales
                if self.release:  # the program now holds the codes (int4: its copy; int8: the tensor) + fp16 scales
                    q.release()
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=done[id(q)])
            block.remove_ops([op])


def _constexpr_inputs(q, name: str):
    """``(data, kwargs)`` of the ``constexpr_blockwise_shift_scale`` carrying ``q``.

    int4: the codes viewed as coremltools' int4 numpy dtype (an int8 with metadata: one byte a
    code), asymmetric as uint4 with a uint4 offset per block. int8: the stored codes themselves,
    one scale per row (scale shape [rows, 1] = one block the row's length, i.e. per output
    channel), no offset; no copy is made (``QuantizedWeight.codes`` is the stored tensor)."""
    from coremltools.converters.mil.mil import types

    if q.bits == 8:
        codes = q.codes.numpy()
        if q.zero_points is not None or codes.dtype != np.int8 or tuple(q.scales.shape) != (q.shape[0], 1):
            raise ValueError(f"coreml: {name} is not a symmetric per-row int8 weight (quantization contract)")
        return codes, {}
    codes = q.codes.numpy()
    if q.zero_points is None:
        return codes.view(types.np_int4_dtype), {}
    # asymmetric: uint4 codes minus a uint4 offset per block
    return (codes.view(np.uint8).view(types.np_uint4_dtype),
            {"offset": q.zero_points.numpy().astype(np.uint8).astype(types.np_uint4_dtype)})


@contextmanager
def _registered(graph_pass: QuantizedWeights | None):
    """``graph_pass`` in coremltools' pass registry for the duration of one conversion."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    if graph_pass is None:
        yield None
        return
    pass_id = "edgellm::quantized_weights"
    PASS_REGISTRY.add("edgellm", graph_pass, override=True, name="quantized_weights")
    try:
        yield pass_id
    finally:
        PASS_REGISTRY.passes.pop(pass_id, None)


def lower(job) -> Path:
    """Trace without weights, give each tensor its value (quantized ones a free placeholder),
    convert with the int4/int8 swap inside coremltools' pipeline, save."""
    cap = job.loaded.config.max_seq_len
    with job.stage("trace"):
        t = time.time()
        model = weightless_decoder(job)
        ep = export_program(model, cap)
        job.progress(f"coreml: torch.export (quantized weights left unwritten) in {time.time() - t:.1f}s")
        applied = list(model.transforms)
        del model
        placeholders = placeholder_weights(ep, job)
    swap = None
    if job.quant is not None:
        if job.last_use:
            job.quant.summary()  # the manifest's summary reads every weight: taken before they are freed
        swap = QuantizedWeights(job.quant, placeholders, release=job.last_use)
    with job.stage("convert"):
        mlmodel = convert(ep, cap, swap, job.progress)
        del ep
    counts = swap.counts if swap is not None else {}
    if swap is not None:
        made = ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
        job.progress(f"coreml: weight tensors -> constexpr_blockwise_shift_scale ({made})")
    with job.writer() as w:
        with job.stage("write"):
            mlmodel.save(str(w.path(PACKAGE)))
            _canonical_package(w.path(PACKAGE))
            job.write_tokenizer(w)
        manifest = job.manifest(PACKAGE, applied, coreml={
            "minimum_deployment_target": "iOS18", "compute_precision": "fp16 (RMSNorm statistics, mask fp32)",
            "inputs": {"tokens": "int32[1, T]", "input_pos": "int32[T]", "T": [1, cap - 1]},
            "outputs": {"logits": "fp16[1, T, vocab]"}, "states": "kv_cache k/v per layer, fp16",
            "int4_tensors": counts.get("int4", 0), "int8_tensors": counts.get("int8", 0)})
        return w.commit(manifest)
