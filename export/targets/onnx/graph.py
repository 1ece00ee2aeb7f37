"""Small onnx-ir graph helpers shared by the ONNX lowering (``lowering``) and its fusions (``fusion``)."""

from __future__ import annotations

import numpy as np

MS = "com.microsoft"
WEIGHTS_KEY = "edgellm.weights"  # node metadata: "state-dict name:rows,..." of a quantized node


def _init(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    v = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                 type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(v)
    return v


def _node(domain: str, op_type: str, inputs, attributes=None, **kw):
    import onnx_ir as ir

    return ir.node(op_type, inputs, attributes, domain=domain, **kw)


def _replace(graph, old, new_node, outputs=None):
    """Insert ``new_node`` before ``old`` and move the uses (and names) of old's outputs to it."""
    graph.insert_before(old, new_node)
    pairs = outputs if outputs is not None else list(zip(old.outputs, new_node.outputs))
    for o, n in pairs:
        _replace_value(o, n)


def _replace_value(old, new) -> None:
    """``new`` takes over old's uses, name, type and shape (it computes the same tensor)."""
    name = old.name
    new.type = new.type or old.type
    new.shape = new.shape or old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def _const_array(value) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _remove_unused(model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    used = {id(v) for n in model.graph.all_nodes() for v in n.inputs if v is not None}
    used |= {id(v) for v in model.graph.outputs}
    for name, v in list(model.graph.initializers.items()):
        if id(v) not in used and not v.is_graph_input():
            del model.graph.initializers[name]


def _matmul_nbits(graph, a, t: dict[str, np.ndarray], name: str, K: int, N: int, group: int, level: int,
                  weights: str | None = None, bits: int = 4):
    """MatMulNBits over ``t`` (``data`` [N, K*bits/8] uint8, ``scales`` [N, K/group], optional
    packed ``zero_points``): int4 nibbles, or int8 codes + 128 (the op's default zero point)."""
    nb = K // group
    b = _init(graph, f"{name}.qweight", t["data"].reshape(N, nb, group * bits // 8))
    s = _init(graph, f"{name}.scales", t["scales"].reshape(N * nb))
    inputs = [a, b, s]
    if "zero_points" in t:
        inputs.append(_init(graph, f"{name}.qzeros", t["zero_points"].reshape(-1)))
    return _node(MS, "MatMulNBits", inputs, attributes={
        "K": K, "N": N, "bits": bits, "block_size": group, "accuracy_level": level}, name=f"{name}/MatMulNBits",
        metadata_props={WEIGHTS_KEY: weights or f"{name}.weight:{N}"})
