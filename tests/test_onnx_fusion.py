"""The ``fast`` ONNX flavour's attention fusion (``export.targets.onnx.fusion``) on the tiny recipe.

The decoder is traced once; each test fuses a fresh copy of that graph. The canonical graph
becomes one GroupQueryAttention per layer with the portable graph's logits; a graph with
anything else on an attention path (an inserted op, other RoPE tables) is refused with a
RuntimeError naming the layer and the op, and left as it was.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

PROMPT, DECODE = [1, 2, 3, 4, 5], [7, 11, 13]


@pytest.fixture(scope="module")
def traced():
    """(the traced portable graph as a ModelProto, config, cos, sin) of the tiny decoder."""
    import onnx_ir as ir

    from edgellm.model import resolve_model
    from export import transforms
    from export.targets.onnx import lowering

    model = resolve_model(recipe="tiny").decoder()
    transforms.apply(model, list(lowering.FLAVOURS[0].transforms))
    proto = ir.to_proto(lowering.trace(model))
    return proto, model.config, model.rope.cos.numpy(), model.rope.sin.numpy()


def _graph(traced):
    import onnx_ir as ir

    return ir.from_proto(traced[0])


def _fuse(traced, model):
    from export.targets.onnx.fusion import fuse_for_ort_cpu

    _, cfg, cos, sin = traced
    fuse_for_ort_cpu(model, cfg, cos, sin, progress=lambda s: None)


def _ops(model) -> collections.Counter:
    return collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph)


def _logits(model, cfg) -> np.ndarray:
    """Prefill PROMPT then decode DECODE one token at a time: every logits row, stacked."""
    import onnx_ir as ir
    import onnxruntime as ort

    from export.targets.onnx.graph import MS

    if any(n.domain == MS for n in model.graph):
        model.opset_imports[MS] = 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shape = (1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    past = {f"past_{k}_{i}": np.zeros(shape, np.float32) for i in range(cfg.n_layers) for k in ("key", "value")}
    rows, pos = [], 0
    for chunk in [PROMPT] + [[t] for t in DECODE]:
        T = len(chunk)
        feed = {"input_ids": np.array([chunk], np.int64), "position_ids": np.arange(pos, pos + T, dtype=np.int64),
                "n_valid": np.array(pos + T, np.int64), **past}
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, feed)))
        rows.append(out["logits"][0])
        past = {k: out["present" + k[len("past"):]] for k in past}
        pos += T
    return np.concatenate(rows)


def _projections(traced, model, layer: int):
    from export.targets.onnx.fusion import match_attention

    _, cfg, cos, sin = traced
    return match_attention(model.graph, cfg, cos, sin)[layer]


def _insert(model, value, consumer, op: str, inputs=(), attributes=None):
    """A node ``op(value, *inputs)`` between ``value`` and ``consumer`` (None: every use moves to it)."""
    import onnx_ir as ir

    node = ir.node(op, [value, *inputs], attributes, name=f"inserted_{op}")
    model.graph.insert_after(value.producer(), node)
    for use in list(value.uses()):
        if use.node is not node and (consumer is None or use.node is consumer):
            use.node.replace_input_with(use.idx, node.outputs[0])
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    return node


def _const(model, name: str, array):
    from export.targets.onnx.graph import _init

    return _init(model.graph, name, np.asarray(array, np.float32))


def test_canonical_graph_fuses_and_matches_portable(traced):
    _, cfg, _, _ = traced
    portable, fast = _graph(traced), _graph(traced)
    _fuse(traced, fast)
    ops = _ops(fast)
    assert ops["com.microsoft::GroupQueryAttention"] == cfg.n_layers
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * cfg.n_layers
    for gone in ("Attention", "ScatterElements", "Concat", "Slice", "Transpose", "GatherND"):
        assert ops[f"ai.onnx::{gone}"] == 0, f"{gone} left after the fusion: {dict(ops)}"
    assert ops["ai.onnx::MatMul"] == 5 * cfg.n_layers + 1  # fused qkv, o, gate, up, down; lm_head
    gqa = [n for n in fast.graph if n.op_type == "GroupQueryAttention"]
    assert [n.outputs[1].name for n in gqa] == [f"present_key_{i}" for i in range(cfg.n_layers)]
    assert [n.inputs[3].name for n in gqa] == [f"past_key_{i}" for i in range(cfg.n_layers)]
    ref, got = _logits(portable, cfg), _logits(fast, cfg)
    assert got.shape == (len(PROMPT) + len(DECODE), cfg.vocab_size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_layout_ops_on_the_path_are_followed(traced):
    """An Identity and an Unsqueeze/Squeeze pair on the q path keep the layout: still fused, same logits."""
    import onnx_ir as ir

    _, cfg, _, _ = traced
    model = _graph(traced)
    q_mm = _projections(traced, model, 0).q_mm
    reshape = next(iter(q_mm.outputs[0].uses())).node
    ident = _insert(model, q_mm.outputs[0], reshape, "Identity")
    axes = ir.Value(name="inserted_axes", const_value=ir.tensor(np.array([0], np.int64)))
    model.graph.register_initializer(axes)
    unsq = _insert(model, ident.outputs[0], reshape, "Unsqueeze", [axes])
    _insert(model, unsq.outputs[0], reshape, "Squeeze", [axes])
    ref = _logits(_graph(traced), cfg)
    _fuse(traced, model)
    assert _ops(model)["com.microsoft::GroupQueryAttention"] == cfg.n_layers
    np.testing.assert_allclose(_logits(model, cfg), ref, rtol=0, atol=1e-4)


def _mul_before_rope_on_q(traced, model):
    """A scaling of layer 1's q between the projection and the head split (before RoPE)."""
    q_mm = _projections(traced, model, 1).q_mm
    reshape = next(iter(q_mm.outputs[0].uses())).node
    _insert(model, q_mm.outputs[0], reshape, "Mul", [_const(model, "inserted_scale", 2.0)])


def _qk_norm_on_k(traced, model):
    """A QK-norm on layer 0's k heads (RMSNormalization over the head dim, after the head split)."""
    _, cfg, _, _ = traced
    k_mm = _projections(traced, model, 0).k_mm
    split = next(iter(k_mm.outputs[0].uses())).node.outputs[0]
    _insert(model, split, None, "RMSNormalization", [_const(model, "k_norm", np.ones(cfg.head_dim))],
            {"axis": -1, "epsilon": 1e-6})


def _mul_after_rope_on_q(traced, model):
    """A scaling of layer 0's q after RoPE (between the RoPE Concat and the transpose)."""
    attn = next(n for n in model.graph if n.op_type == "Attention")
    transpose = attn.inputs[0].producer()
    _insert(model, transpose.inputs[0], transpose, "Mul", [_const(model, "inserted_scale", 0.5)])


@pytest.mark.parametrize("edit,layer,op", [
    (_mul_before_rope_on_q, 1, "Mul"),
    (_qk_norm_on_k, 0, "RMSNormalization"),
    (_mul_after_rope_on_q, 0, "Mul"),
], ids=["mul-before-rope-q", "qk-norm-k", "mul-after-rope-q"])
def test_unexpected_op_is_refused(traced, edit, layer, op):
    model = _graph(traced)
    edit(traced, model)
    before = _ops(model)
    with pytest.raises(RuntimeError) as err:
        _fuse(traced, model)
    msg = str(err.value)
    assert f"layer {layer}" in msg and f"op {op}" in msg and "--flavour portable" in msg, msg
    assert _ops(model) == before  # refused before any rewrite


def test_other_rope_tables_are_refused(traced):
    from export.targets.onnx.fusion import fuse_for_ort_cpu

    _, cfg, cos, sin = traced
    model = _graph(traced)
    with pytest.raises(RuntimeError, match=r"layer 0 .*RoPE cos .*table's values differ.*--flavour portable"):
        fuse_for_ort_cpu(model, cfg, cos * 1.5, sin, progress=lambda s: None)
