"""Lower the one decoder to ONNX for ONNX Runtime (CPU, and onnxruntime-web for ``portable``).

The decoder is traced once with ``torch.onnx.export(dynamo=True)`` through a wrapper whose
named inputs are ``input_ids`` int64[1, T], ``position_ids`` int64[T], ``n_valid`` int64[]
(cache slots filled after this call = position_ids[-1] + 1) and ``past_key_i`` /
``past_value_i`` float32[1, Hkv, capacity, D]; outputs are ``logits`` float32[1, T, vocab] and
``present_key_i`` / ``present_value_i`` (same shape as past: bind them to the past buffers and
the cache stays in place). The cache is written with ScatterElements along the sequence axis
(no whole-cache copy) and attention reads only the first ``n_valid`` slots.

The traced graph is then rewritten with onnx-ir, never re-derived:
  * int4: each linear becomes ``MatMulNBits`` and the embedding ``GatherBlockQuantized``, with
    packed codes and scales written from ``job.quant`` (the shared quantization) -- symmetric
    codes c in [-8, 7] are stored as c + 8 with the ops' default zero point 8; asymmetric codes
    carry their zero points. A tied lm_head and the embedding share one packed tensor.
  * int8 (one scale per row): the same ops with ``bits=8``, codes c in [-128, 127] stored as
    uint8 c + 128 (the ops' default zero point 128). MatMulNBits' block_size is the recipe's
    group_size (``edgellm.quantization.activation_block``: accuracy_level 4 quantizes the input
    per block_size, and the eager reference uses that block), each block carrying its row's
    scale; an untied embedding is one block per row (its scales stored as they are), a tied one
    reads the head's codes and scales through Reshapes (one tensor each).
  * flavour ``fast`` (default): what ORT's CPU kernels reward -- per layer one fused-QKV
    ``MatMulNBits`` feeding ``GroupQueryAttention`` (rotary fused, cos/sin tables as caches,
    past/present sharing one buffer), residual Add + RMSNorm as ``SkipSimplifiedLayerNormalization``
    (``fusion``: the attention is recognised on the graph's structure, anything else is refused).
    GroupQueryAttention carries a plain fp32 cache only: with an fp16/int8 or windowed cache
    (``kv_cache``) the attention stays as traced (past_* then hold fp16, or int8 codes plus
    past_*_scale fp16 scales) and the rest of the fast graph is kept.
  * flavour ``portable``: standard opset-23 ops (Attention, RMSNormalization, ScatterElements)
    plus the two int4 contrib ops, the set onnxruntime-web (wasm) was seen to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from edgellm.decoder import Decoder
from edgellm.errors import EdgeLLMError
from edgellm.quantization import activation_block
from export.targets import Flavour
from export.targets.onnx.fusion import fuse_for_ort_cpu
from export.targets.onnx.graph import (MS, WEIGHTS_KEY, _init, _matmul_nbits, _node, _remove_unused,
                                       _replace)
from export.transforms import Transform

OPSET = 23
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_ABOVE = 1 << 30  # bytes of weights; protobuf refuses files of 2 GiB and more
STORED_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (the fast path); runtime may rewrite it
_TRACED = (Transform("cache_scatter"), Transform("attention_gqa"))
FLAVOURS = (
    Flavour("fast", "what ORT's CPU kernels reward: fused-QKV MatMulNBits, GroupQueryAttention, "
                    "SkipSimplifiedLayerNormalization", _TRACED, {"fuse": True},
            kv_dtypes=("fp32", "fp16", "int8"), kv_window=True),  # GroupQueryAttention over a plain fp32 cache only
    Flavour("portable", "standard opset-23 ops plus the two int4 contrib ops (onnxruntime-web runs them)",
            _TRACED, {"fuse": False}, kv_dtypes=("fp32", "fp16", "int8"), kv_window=True),
)


_STATE_KIND = {"k": "key", "v": "value", "k_scale": "key_scale", "v_scale": "value_scale"}


def io_names(n_layers: int, states: tuple[str, ...] = ("k", "v")) -> tuple[list[str], list[str]]:
    """Graph input and output names; ``states`` are a layer's cache buffers (an int8 cache adds
    its scales: past_key_scale_i, ...)."""
    cache = [f"{_STATE_KIND[st]}_{i}" for i in range(n_layers) for st in states]
    return (["input_ids", "position_ids", "n_valid"] + [f"past_{c}" for c in cache],
            ["logits"] + [f"present_{c}" for c in cache])


def _states(model: Decoder) -> tuple[str, ...]:
    return tuple(model.layers[0].self_attn.kv_cache.state_names())


def cache_inputs(in_names: list[str], states: dict[str, tuple[list[int], str]]) -> dict[str, dict]:
    """past_* input -> its dtype (float32 | float16 | int8) and shape, for runtimes that allocate
    the cache themselves (the browser demo)."""
    kind_of = {v: k for k, v in _STATE_KIND.items()}
    out = {}
    for name in in_names:
        if name.startswith("past_"):
            shape, dtype = states[kind_of[name[len("past_"):].rsplit("_", 1)[0]]]
            out[name] = {"dtype": dtype, "shape": shape}
    return out


# --------------------------------------------------------------------------- tracing

class _Wrapper(torch.nn.Module):
    """Named past_* inputs become the decoder's cache buffers; present_* are the updated ones."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def run(self, input_ids, position_ids, n_valid, past):
        caches = [layer.self_attn.kv_cache for layer in self.model.layers]
        states = _states(self.model)
        for i, cache in enumerate(caches):
            for j, name in enumerate(states):
                setattr(cache, name, past[len(states) * i + j])
        logits = self.model(input_ids, position_ids, n_valid)
        out = [logits]
        for cache in caches:
            out += [getattr(cache, name) for name in states]
        return tuple(out)


def _wrapper(model: Decoder) -> torch.nn.Module:
    # torch.export binds inputs by the forward's signature: spell every past_* name out
    # (a *past signature breaks dynamic_shapes).
    names, _ = io_names(model.config.n_layers, _states(model))
    past = ", ".join(names[3:])
    src = (f"def forward(self, input_ids, position_ids, n_valid, {past}):\n"
           f"    return self.run(input_ids, position_ids, n_valid, [{past}])\n")
    ns: dict = {}
    exec(src, ns)  # noqa: S102 - generated from integer layer counts only
    cls = type("OnnxDecoder", (_Wrapper,), {"forward": ns["forward"]})
    return cls(model).eval()


def trace(model: Decoder, initializer=None):
    """torch.export -> ONNX (opset 23) of ``model``; returns the onnx-ir Model.

    With ``initializer`` (name -> array or None), ``model`` lives on the meta device: it is
    traced without weights, each initializer then gets ``initializer(name)`` (None leaves it
    empty: a weight the int4 rewrite replaces by the shared codes), and only then is the graph
    optimized, exactly as the exporter optimizes a traced model with weights."""
    if initializer is None:
        return _export(model, optimize=True).model
    with torch.device("meta"):
        prog = _export(model, optimize=False)
    import onnx_ir as ir

    for name, value in prog.model.graph.initializers.items():
        arr = initializer(name.removeprefix("model."))
        value.const_value = None if arr is None else ir.tensor(arr, name=name)
    from torch.onnx._internal._lazy_import import onnxscript_apis

    return onnxscript_apis.optimize(prog.model)


def _export(model: Decoder, optimize: bool):
    cfg = model.config
    names, out_names = io_names(cfg.n_layers, _states(model))
    T = torch.export.Dim("T", min=1, max=cfg.max_chunk)
    layer0 = model.layers[0].self_attn.kv_cache
    kv = [torch.zeros(getattr(layer0, st).shape, dtype=getattr(layer0, st).dtype)
          for _ in range(cfg.n_layers) for st in _states(model)]
    args = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2), torch.tensor(2), *kv)
    dyn = {"input_ids": {1: T}, "position_ids": {0: T}, **{n: None for n in names[2:]}}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(_wrapper(model), args, dynamic_shapes=dyn, dynamo=True, opset_version=OPSET,
                                 input_names=names, output_names=out_names, verbose=False, report=False,
                                 optimize=optimize)


def _numpy(t: torch.Tensor | None):
    return None if t is None else t.numpy()


# --------------------------------------------------------------------------- graph helpers

def _scope(node) -> str | None:
    """The decoder module a node was traced from, e.g. ``layers.0.self_attn.q_proj``."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    mods = [s for s in ast.literal_eval(raw) if s.startswith("model.")]
    return mods[-1][len("model."):] if mods else None


def _nodes_by_scope(graph, op_type: str) -> dict[str, object]:
    out = {}
    for node in graph:
        if node.op_type == op_type and node.domain == "":
            s = _scope(node)
            if s is not None:
                out.setdefault(s, node)
    return out


# --------------------------------------------------------------------------- int4

def pack_nibbles(u4: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15], last axis even -> two per byte, element 2j in the low nibble."""
    u4 = u4.astype(np.uint8)
    return (u4[..., 0::2] | (u4[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0xF, packed >> 4
    return out


def onnx_int4(qw) -> dict[str, np.ndarray]:
    """The shared ``QuantizedWeight`` as MatMulNBits / GatherBlockQuantized tensors.

    ``data``: uint8 [rows, cols/2] packed codes (+8 when symmetric), ``scales`` float32
    [rows, groups], ``zero_points``: uint8 [rows, ceil(groups/2)] packed, or absent (= 8).
    """
    codes = qw.codes.cpu().numpy().astype(np.int16)
    rows, cols = codes.shape
    if cols % qw.group_size or qw.group_size % 2:
        raise ValueError(f"int4 weight of {cols} columns is not a whole number of groups of {qw.group_size}")
    out = {"scales": qw.scales.cpu().numpy().astype(np.float32).reshape(rows, cols // qw.group_size)}
    if qw.zero_points is None:
        u = codes + 8
    else:
        u = codes
        zp = qw.zero_points.cpu().numpy().astype(np.int16).reshape(rows, -1)
        if zp.shape[1] % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)))
        if zp.min() < 0 or zp.max() > 15:
            raise ValueError("int4 zero points must lie in [0, 15]")
        out["zero_points"] = pack_nibbles(zp)
    if u.min() < 0 or u.max() > 15:
        raise ValueError("int4 codes out of range for the ONNX 4-bit ops")
    out["data"] = pack_nibbles(u)
    return out


def onnx_int8(qw, block: int, name: str = "weight") -> dict[str, np.ndarray]:
    """An int8 ``QuantizedWeight`` (one scale per row) as MatMulNBits / GatherBlockQuantized
    bits=8 tensors: ``data`` uint8 [rows, cols] = codes + 128 (the sign bit flipped), ``scales``
    float32 [rows, ceil(cols / block)], the row's scale in every block (the same dequantized values)."""
    if qw.bits != 8:
        raise ValueError(f"{name}: expected an int8 weight, got int{qw.bits}")
    rows, cols = qw.shape
    if block < 16 or block & (block - 1):
        raise EdgeLLMError(f"ONNX int8 {name}: the 8-bit ops need a power-of-two block_size >= 16, got {block}; "
                         f"set quantization.group_size to 16, 32, 64 or 128")
    codes = qw.codes.cpu().numpy()
    data = codes.view(np.uint8) ^ np.uint8(0x80)
    scales = qw.scales.cpu().numpy().astype(np.float32).reshape(rows, 1)
    return {"data": data, "scales": np.repeat(scales, -(-cols // block), axis=1)}


def _matmul_block(qw, qcfg, name: str) -> int:
    """MatMulNBits' block_size for ``qw``: the block its activations are quantized with."""
    block = activation_block(qw, qcfg)
    K = qw.shape[1]
    if qw.bits == 8 and K % block:
        raise EdgeLLMError(f"ONNX int8 {name}: {K} inputs are not a multiple of quantization.group_size {block} "
                         f"(MatMulNBits' activation block); choose a group_size dividing {K}")
    return block


def _weight_shape(value) -> tuple[int, ...] | None:
    """Shape of a MatMul's weight operand: an initializer (filled or left empty for the int4
    rewrite), or a Transpose of one (a tied head, or an empty weight the optimizer kept)."""
    src = value.producer()
    if src is None and value.is_initializer():
        return tuple(int(d) for d in value.shape)
    if src is not None and src.op_type == "Transpose" and src.inputs[0].is_initializer():
        return tuple(int(d) for d in reversed(tuple(src.inputs[0].shape)))
    return None


def apply_quantized(model, quant, cfg, progress=print) -> None:
    """Replace float linears/embedding by MatMulNBits / GatherBlockQuantized carrying ``quant``'s
    codes and scales (int4, or int8 with bits=8)."""
    g = model.graph
    qcfg = quant.config
    matmuls = _nodes_by_scope(g, "MatMul")
    counts: dict[str, int] = {}
    packed_by_id: dict[int, dict] = {}
    for scope, node in matmuls.items():
        key = f"{scope}.weight"
        qw = quant.weights.get(key)
        if qw is None:
            continue
        N, K = qw.shape
        if _weight_shape(node.inputs[1]) != (K, N):
            raise RuntimeError(f"ONNX lowering: {key} is not a constant [{K}, {N}] MatMul weight in the traced graph")
        block = _matmul_block(qw, qcfg, key)
        t = packed_by_id.setdefault(id(qw), onnx_int4(qw) if qw.bits == 4 else onnx_int8(qw, block, key))
        new = _matmul_nbits(g, node.inputs[0], t, scope, K, N, block, STORED_ACCURACY_LEVEL, bits=qw.bits)
        _replace(g, node, new)
        counts[qw.precision] = counts.get(qw.precision, 0) + 1
    emb = quant.weights.get("embed_tokens.weight")
    if emb is not None:
        gather = _nodes_by_scope(g, "Gather").get("embed_tokens")
        if gather is None:
            raise RuntimeError("ONNX lowering: no embedding Gather found in the traced graph")
        V, D = emb.shape
        lm = g.initializers.get("lm_head.qweight")
        tied = quant.weights.get("lm_head.weight") is emb and lm is not None
        block = emb.group_size
        if emb.bits == 8:
            # tied: the head's blocks; untied: one block per row (a power of two >= D: ORT takes it)
            block = _matmul_block(emb, qcfg, "lm_head.weight") if tied else max(16, 1 << (D - 1).bit_length())
        t = packed_by_id.get(id(emb)) if tied else None
        if t is None:
            t = onnx_int4(emb) if emb.bits == 4 else onnx_int8(emb, block, "embed_tokens.weight")

        def reshaped(src, name, shape, what):  # a view of the lm_head's tensor: stored once
            rs = _node("", "Reshape", [src, _init(g, f"embed_tokens.{what}", np.array(shape, np.int64))],
                       name=f"embed_tokens/Reshape{'' if what == 'qshape' else '_scales'}")
            g.insert_before(gather, rs)
            rs.outputs[0].name = name
            return rs.outputs[0]

        if tied:  # one packed tensor: the lm_head's [V, blocks, group*bits/8] viewed as [V, D*bits/8]
            data = reshaped(lm, "embed_tokens.qweight", [V, D * emb.bits // 8], "qshape")
        else:
            data = _init(g, "embed_tokens.qweight", t["data"])
        lm_scales = g.initializers.get("lm_head.scales")
        if tied and emb.bits == 8 and lm_scales is not None:  # the same replicated scales, once
            scales = reshaped(lm_scales, "embed_tokens.scales", [V, D // block], "sshape")
        else:
            scales = _init(g, "embed_tokens.scales", t["scales"])
        inputs = [data, gather.inputs[1], scales]
        if "zero_points" in t:
            inputs.append(_init(g, "embed_tokens.qzeros", t["zero_points"]))
        new = _node(MS, "GatherBlockQuantized", inputs, attributes={
            "gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": emb.bits},
            name="embed_tokens/GatherBlockQuantized", metadata_props={WEIGHTS_KEY: f"embed_tokens.weight:{V}"})
        _replace(g, gather, new)
        counts[emb.precision] = counts.get(emb.precision, 0) + 1
    _remove_unused(model)
    summary = ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
    progress(f"onnx: {sum(counts.values())} tensors as MatMulNBits/GatherBlockQuantized from the shared codes "
             f"({summary or 'none'})")


apply_int4 = apply_quantized  # the name it had when every tensor was int4


def read_int4(model_path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read back the quantized tensors of a saved model: {state-dict name: {codes, scales,
    zero_points, group_size}}, directly comparable to the shared quantization's.

    int4 ``codes`` are the stored nibbles minus the zero point's default (8) when no zero points
    are stored; int8 codes are the stored bytes minus 128, and a row's scale repeated over its
    blocks reads back as that one scale ([rows, 1], group_size = the row's length).
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    consts = dict(inits)
    for node in m.graph.node:  # the tied embedding's Reshapes of the lm_head tensors
        if node.op_type == "Reshape" and node.input[0] in consts and node.input[1] in consts:
            consts[node.output[0]] = consts[node.input[0]].reshape(consts[node.input[1]])
    out = {}
    for node in m.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        group, bits = attrs["block_size"], attrs.get("bits", 4)
        data = consts[node.input[0] if node.op_type == "GatherBlockQuantized" else node.input[1]]
        rows = attrs["N"] if node.op_type == "MatMulNBits" else data.shape[0]
        s_name = node.input[2]
        scales = consts[s_name].reshape(rows, -1)
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        zps = None
        if bits == 8:
            if zp_name:
                raise ValueError(f"{node.name}: int8 weights are symmetric, but zero points are stored")
            codes = (data.reshape(rows, -1) ^ np.uint8(0x80)).view(np.int8)
            if (scales.view(np.uint32) == scales[:, :1].view(np.uint32)).all():
                scales, group = scales[:, :1], codes.shape[1]
        else:
            nib = unpack_nibbles(data.reshape(rows, -1)).astype(np.int16)
            if zp_name:
                zps = unpack_nibbles(consts[zp_name].reshape(rows, -1))[:, :scales.shape[1]].astype(np.int8)
                codes = nib.astype(np.int8)
            else:
                codes = (nib - 8).astype(np.int8)
        meta = {p.key: p.value for p in node.metadata_props}
        r0 = 0
        for item in meta[WEIGHTS_KEY].split(","):  # a fused QKV node carries three weights
            name, n = item.rsplit(":", 1)
            sl = slice(r0, r0 + int(n))
            r0 += int(n)
            out[name] = {"codes": codes[sl], "scales": scales[sl], "bits": bits,
                         "zero_points": None if zps is None else zps[sl], "group_size": group}
    return out


# --------------------------------------------------------------------------- lower

def lower(job) -> Path:
    flavour = job.flavour
    with job.stage("trace"):
        model = job.decoder(meta=True)
        cfg = model.config
        job.progress(f"onnx: tracing {job.loaded.recipe.name} ({cfg.n_layers} layers, cache {cfg.max_seq_len}) "
                     f"without weights")
        source = job.tensor_source()
        onnx_model = trace(model, lambda name: _numpy(source(name)))
        states = _states(model)
        layer0 = model.layers[0].self_attn.kv_cache
        model_states = {st: (list(getattr(layer0, st).shape), str(getattr(layer0, st).dtype).removeprefix("torch."))
                        for st in states}
        applied = list(model.transforms)
        del model
    with job.stage("rewrite"):
        if job.quant is not None:
            apply_quantized(onnx_model, job.quant, cfg, job.progress)
        if flavour.options["fuse"]:
            tables = cfg.kv_cache.window is None  # a windowed cache computes RoPE from the position: no tables
            fuse_for_ort_cpu(onnx_model, cfg, source("rope.cos").numpy() if tables else None,
                             source("rope.sin").numpy() if tables else None, job.progress)
        add_logits_from(onnx_model)
    onnx_model.producer_name = "edgellm"
    if any(n.domain == MS for n in onnx_model.graph):
        onnx_model.opset_imports[MS] = 1
    weight_bytes = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values()
                       if v.const_value is not None)
    external = weight_bytes >= EXTERNAL_DATA_ABOVE
    with job.writer() as w:
        with job.stage("write"):
            save(onnx_model, w.path(MODEL_FILE), external)
            check(w.path(MODEL_FILE))
            job.write_tokenizer(w)
        in_names, out_names = io_names(cfg.n_layers, states)
        ops = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in onnx_model.graph})
        manifest = job.manifest(MODEL_FILE, applied, onnx={
            "opset": OPSET, "flavour": flavour.name, "inputs": in_names, "outputs": out_names,
            "external_data": DATA_FILE if external else None,
            "matmulnbits_accuracy_level": STORED_ACCURACY_LEVEL if job.quant is not None else None,
            "cache_shape": [1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim], "ops": ops,
            "optional_inputs": {LOGITS_FROM: 0},  # not in "inputs": a runtime may leave it at its default
            "cache_inputs": cache_inputs(in_names, model_states)})
        return w.commit(manifest)


LOGITS_FROM = "logits_from"


def add_logits_from(model) -> None:
    """An optional input ``logits_from`` int64[] (an initializer that is also a graph input, default
    0: every row, so a runtime that does not know it gets [1, T, vocab] as before) slicing the
    head's input along T from that row on. A prefill passes -1: only the last row goes through the
    head (at T = 64 the head was ~1/5 of the prefill's arithmetic); parity's teacher forcing and
    perplexity keep the default and read every row."""
    import onnx_ir as ir

    graph = model.graph
    logits = next(v for v in graph.outputs if v.name == "logits")
    head = logits.producer()
    if head is None or head.op_type not in ("MatMulNBits", "MatMul") or head.inputs[0].shape is None \
            or len(head.inputs[0].shape) != 3:
        raise EdgeLLMError(f"onnx: logits are not a head over [1, T, hidden] ({head and head.op_type}); "
                           f"cannot add {LOGITS_FROM}")
    start = ir.Value(name=LOGITS_FROM, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.zeros((), np.int64), name=LOGITS_FROM))
    graph.inputs.append(start)
    graph.register_initializer(start)
    zero = _init(graph, f"{LOGITS_FROM}.unsqueeze_axes", np.array([0], np.int64))
    ends = _init(graph, f"{LOGITS_FROM}.ends", np.array([np.iinfo(np.int64).max], np.int64))
    axes = _init(graph, f"{LOGITS_FROM}.axes", np.array([1], np.int64))
    starts = _node("", "Unsqueeze", [start, zero], name=f"{LOGITS_FROM}/Unsqueeze")
    rows = _node("", "Slice", [head.inputs[0], starts.outputs[0], ends, axes], name=f"{LOGITS_FROM}/Slice")
    rows.outputs[0].type = head.inputs[0].type
    graph.insert_before(head, [starts, rows])
    head.replace_input_with(0, rows.outputs[0])


def save(model, path: Path, external: bool) -> None:
    import onnx_ir as ir

    if external:
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
    else:
        ir.save(model, path)


def check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
