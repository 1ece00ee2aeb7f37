"""Structural verification of an artifact: what it takes, what it holds, what it is made of.

``inspect_artifact(dir) -> dict`` reads the saved files only (no runtime): for Core ML the
inputs/outputs/states with shapes and flexible ranges, the op census of ``main`` (is SDPA
there, how many state reads/writes, how many int4 weight ops), every stored weight by dtype
(fp32 weight tensors would be a lowering bug), package size and deployment target; for ONNX
the op census, opset and initializer dtypes; for ExecuTorch file size and manifest. ``render``
turns that dict into text (``python -m runtime inspect SPEC``).
``read_blockwise_weights`` reads the int4 codes and scales back from the weight blob, so tests
can compare them with the shared quantization byte for byte.
"""

from __future__ import annotations

from edgellm.artifact import dir_size, read_manifest
from edgellm.config import ModelConfig
from runtime.backend import backend_class

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# Core ML specification version -> minimum deployment target
SPEC_TARGETS = {4: "iOS13", 5: "iOS14", 6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18"}
_BYTES = {"FLOAT16": 2, "FLOAT32": 4, "FLOAT64": 8, "BFLOAT16": 2, "INT8": 1, "UINT8": 1, "INT16": 2,
          "UINT16": 2, "INT32": 4, "UINT32": 4, "INT64": 8, "UINT64": 8, "BOOL": 1,
          "INT4": 0.5, "UINT4": 0.5, "UINT2": 0.25, "UINT1": 0.125, "UINT3": 0.375, "UINT6": 0.75}
FP32_WEIGHT_LIMIT = 64 * 1024  # fp32 constants beyond this many bytes are reported as stray




# ---------------------------------------------------------------- Core ML
def _mil_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _mil_ops(b)


def _tensor_info(t) -> tuple[str, list[int]]:
    from coremltools.proto import MIL_pb2

    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else -1 for d in t.dimensions]
    return MIL_pb2.DataType.Name(t.dataType), dims


def _blob_values(op):
    """(label, dtype, shape, blobFileValue) for every stored (file) value an op carries."""
    out = []
    for key, arg in op.inputs.items():
        for a in arg.arguments:
            if a.WhichOneof("binding") == "value" and a.value.WhichOneof("value") == "blobFileValue":
                dt, shape = _tensor_info(a.value.type.tensorType)
                out.append((key, dt, shape, a.value.blobFileValue))
    if op.type == "const" and "val" in op.attributes:
        v = op.attributes["val"]
        if v.WhichOneof("value") == "blobFileValue":
            dt, shape = _tensor_info(v.type.tensorType)
            out.append(("val", dt, shape, v.blobFileValue))
    return out


def _feature(f) -> dict[str, Any]:
    from coremltools.proto import FeatureTypes_pb2

    kind = f.type.WhichOneof("Type")
    if kind == "multiArrayType":
        m = f.type.multiArrayType
        d = {"dtype": FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(m.dataType), "shape": list(m.shape)}
        if m.WhichOneof("ShapeFlexibility") == "shapeRange":
            d["ranges"] = [[r.lowerBound, r.upperBound] for r in m.shapeRange.sizeRanges]
        elif m.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            d["enumerated"] = [list(s.shape) for s in m.enumeratedShapes.shapes]
        return d
    if kind == "stateType":
        a = f.type.stateType.arrayType
        return {"dtype": FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(a.dataType), "shape": list(a.shape)}
    return {"type": kind}


def inspect_coreml(package: Path) -> dict[str, Any]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    desc = spec.description
    rep: dict[str, Any] = {
        "kind": "coreml", "file": str(package), "size_bytes": dir_size(package),
        "specification_version": spec.specificationVersion,
        "deployment_target": SPEC_TARGETS.get(spec.specificationVersion, f"spec {spec.specificationVersion}"),
        "model_type": spec.WhichOneof("Type"),
        "inputs": {f.name: _feature(f) for f in desc.input},
        "outputs": {f.name: _feature(f) for f in desc.output},
        "states": {f.name: _feature(f) for f in desc.state},
    }
    if spec.WhichOneof("Type") != "mlProgram":
        return rep
    functions = {}
    for fname, fn in spec.mlProgram.functions.items():
        block = fn.block_specializations[fn.opset]
        census: Counter = Counter()
        weights: Counter = Counter()
        weight_bytes: Counter = Counter()
        stray = []
        for op in _mil_ops(block):
            census[op.type] += 1
            for key, dt, shape, _ in _blob_values(op):
                n = int(np.prod(shape)) if shape else 1
                weights[dt] += n
                weight_bytes[dt] += int(n * _BYTES.get(dt, 4))
                if dt in ("FLOAT32", "FLOAT64") and n * _BYTES[dt] > FP32_WEIGHT_LIMIT:
                    stray.append({"op": op.outputs[0].name if op.outputs else op.type, "dtype": dt, "shape": shape})
        functions[fname] = {
            "opset": fn.opset, "ops": sum(census.values()), "census": dict(census.most_common()),
            "sdpa": census.get("scaled_dot_product_attention", 0),
            "state_reads": census.get("read_state", 0), "state_writes": census.get("write_state", 0) + census.get("coreml_update_state", 0),
            "quantized_weight_ops": census.get("constexpr_blockwise_shift_scale", 0),
            "weight_elements": dict(weights), "weight_bytes": dict(weight_bytes),
            "stray_fp32_weights": stray,
        }
    rep["functions"] = functions
    return rep


def read_blockwise_weights(package: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{output name: {"data": codes, "scale": fp16 scales[, "offset"]}} of every
    ``constexpr_blockwise_shift_scale`` op, read straight from the package's weight blob."""
    import coremltools as ct
    from coremltools.libmilstoragepython import _BlobStorageReader

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    readers: dict[str, Any] = {}
    read = {"INT4": "read_int4_data", "UINT4": "read_uint4_data", "FLOAT16": "read_fp16_data",
            "FLOAT32": "read_float_data", "INT8": "read_int8_data", "UINT8": "read_uint8_data"}
    consts = {}
    out = {}
    for fn in spec.mlProgram.functions.values():
        ops = list(_mil_ops(fn.block_specializations[fn.opset]))
        for op in ops:
            if op.type == "const":
                consts[op.outputs[0].name] = op
        for op in ops:
            if op.type != "constexpr_blockwise_shift_scale":
                continue
            entry = {}
            for key, arg in op.inputs.items():
                a = arg.arguments[0]
                if a.WhichOneof("binding") == "name":  # a reference to a const op
                    blobs = _blob_values(consts[a.name])
                else:
                    blobs = [(key, *_tensor_info(a.value.type.tensorType), a.value.blobFileValue)]
                _, dt, shape, blob = blobs[0]
                fname = blob.fileName.replace("@model_path/weights/", "")
                r = readers.setdefault(fname, _BlobStorageReader(str(weights_dir / fname)))
                vals = np.asarray(getattr(r, read[dt])(blob.offset))
                if dt == "FLOAT16":
                    vals = vals.view(np.float16)
                entry[key] = vals[: int(np.prod(shape))].reshape(shape)
            out[op.outputs[0].name] = entry
    return out


# ---------------------------------------------------------------- ONNX / ExecuTorch
def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph

    def vi(v):
        t = v.type.tensor_type
        return {"dtype": onnx.TensorProto.DataType.Name(t.elem_type),
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]}

    init = Counter()
    for t in g.initializer:
        init[onnx.TensorProto.DataType.Name(t.data_type)] += int(np.prod(t.dims)) if t.dims else 1
    census = Counter(n.op_type for n in g.node)
    external = {e.value for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in external)
    return {"kind": "onnx", "file": str(path), "size_bytes": size,
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "inputs": {v.name: vi(v) for v in g.input}, "outputs": {v.name: vi(v) for v in g.output},
            "functions": {"main": {"ops": len(g.node), "census": dict(census.most_common()),
                                   "weight_elements": dict(init)}}}


def inspect_artifact(directory: str | Path) -> dict[str, Any]:
    """The structural report of an artifact directory (manifest checked by sha256)."""
    directory = Path(directory)
    man = read_manifest(directory)
    path = directory / man["artifact"]
    rep = backend_class(str(man.get("target"))).inspect_model(path)
    rep["artifact"] = str(directory)
    rep["manifest"] = {k: man.get(k) for k in ("name", "target", "flavour", "max_seq_len", "vocab_size",
                                                "quantization", "transforms")}
    rep["artifact_bytes"] = dir_size(directory)
    cfg = ModelConfig.from_dict(man["config"])  # manifests before the kv_cache record: computed the same way
    rep["kv_cache"] = man.get("kv_cache") or {**cfg.kv_cache.to_dict(), "slots": cfg.max_seq_len,
                                              "bytes": cfg.kv_cache_bytes()}
    return rep


def render(rep: dict[str, Any]) -> str:
    """Human-readable text of an ``inspect_artifact`` report."""
    lines = [f"{rep.get('artifact', rep['file'])}  [{rep['kind']}]",
             f"  model file: {rep['file']}  {rep['size_bytes'] / 1e6:.1f} MB"
             f"  (artifact {rep.get('artifact_bytes', rep['size_bytes']) / 1e6:.1f} MB)"]
    if "deployment_target" in rep:
        lines.append(f"  minimum deployment target: {rep['deployment_target']} (spec {rep['specification_version']}), "
                     f"{rep['model_type']}")
    if "opsets" in rep:
        lines.append(f"  opsets: {rep['opsets']}")
    for title in ("inputs", "outputs", "states"):
        for name, f in rep.get(title, {}).items():
            extra = f"  range {f['ranges']}" if "ranges" in f else (f"  enumerated {f['enumerated']}" if "enumerated" in f else "")
            lines.append(f"  {title[:-1]:6} {name}: {f.get('dtype', f.get('type'))} {f.get('shape')}{extra}")
    for fname, fn in rep.get("functions", {}).items():
        lines.append(f"  function {fname}: {fn['ops']} ops")
        for key in ("sdpa", "state_reads", "state_writes", "quantized_weight_ops"):
            if key in fn:
                lines.append(f"    {key}: {fn[key]}")
        lines.append("    census: " + ", ".join(f"{k} {v}" for k, v in fn["census"].items()))
        lines.append("    stored weights (elements by dtype): " +
                     ", ".join(f"{k} {v:,}" for k, v in fn.get("weight_elements", {}).items()))
        if "stray_fp32_weights" in fn:
            stray = fn["stray_fp32_weights"]
            lines.append(f"    stray fp32 weight tensors (> {FP32_WEIGHT_LIMIT // 1024} KiB): "
                         + (", ".join(f"{s['op']} {s['shape']}" for s in stray) if stray else "none"))
    if "manifest" in rep:
        q = rep["manifest"].get("quantization") or {}
        lines.append(f"  manifest: {rep['manifest'].get('name')}, cache {rep['manifest'].get('max_seq_len')}, "
                     f"quantization {q.get('scheme', q)}")
    if "kv_cache" in rep:
        kv = rep["kv_cache"]
        window = f", window {kv['window']} with {kv.get('sinks', 0)} sinks" if kv.get("window") is not None else ""
        size = lambda b: f"{b / 1e6:.1f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"  # noqa: E731
        lines.append(f"  memory: weights {size(rep.get('artifact_bytes', rep['size_bytes']))} + KV cache "
                     f"{size(kv['bytes'])} ({kv['dtype']}, {kv['slots']} slots{window})")
    return "\n".join(lines)
