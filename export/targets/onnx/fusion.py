"""Flavour ``fast``: the traced decoder graph rewritten into what ONNX Runtime's CPU kernels reward.

Attention is recognised on the graph's *structure* (never on node names or scopes), from
each standard opset-23 ``Attention`` node back and forth:

  q     MatMul|MatMulNBits (+ bias Add) -> layout ops -> RoPE -> layout ops -> Attention.Q
  k     MatMul|MatMulNBits (+ bias Add) -> layout ops -> RoPE -> layout ops
          -> ScatterElements(past_key_i, position_ids, .) = present_key_i -> Slice[:n_valid] -> Attention.K
  v     the same without RoPE, into past_value_i -> Attention.V
  mask  Where(arange(S) <= position_ids[:, None], 0, -inf)[:, :n_valid] -> Attention.mask
  out   Attention -> layout ops -> the o projection's MatMul|MatMulNBits

RoPE is the rotate-half ``Concat(x1*cos - x2*sin, x2*cos + x1*sin)`` with x1, x2 the two halves
(Slices) of one tensor and cos/sin rows Gathered by position_ids from tables equal to the
decoder's. "Layout ops" are Reshape/Transpose/Unsqueeze/Squeeze/Identity/Cast; their
composition is followed symbolically (which dim holds T, heads, head dim...) and must come
out as the expected head split and transposes. The layer index is the one of the
``past_key_i`` input the cache write uses. The recognised nodes become one
``GroupQueryAttention`` (rotary fused; q/k/v one fused matmul when they are plain matmuls).
Anything else -- an extra op on a path (a QK-norm, a scaling), another RoPE or mask, a value
also used outside the subgraph -- raises RuntimeError naming the layer and the op, rather than
producing a silently different graph; ``--flavour portable`` exports such models.

Then each residual Add + RMSNormalization becomes ``SkipSimplifiedLayerNormalization``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

from export.targets.onnx.graph import (MS, WEIGHTS_KEY, _const_array, _init, _matmul_nbits, _node, _remove_unused,
                                       _replace, _replace_value)

_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Cast"})
_HINT = "export with --flavour portable (standard opset-23 attention) for this model"

# A layout is a tuple of dims, a dim the tuple of symbolic axes ("atoms") it holds in row-major
# order, () a unit dim. Atoms: T query positions, N filled cache slots, S cache capacity,
# H / Hkv query / kv heads, D head dim, Dh half of it. Atoms of size 1 are dropped (canonical form).


def _is(node, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain == domain


def _is_projection(node) -> bool:
    return _is(node, "MatMul") or _is(node, "MatMulNBits", MS)


def _describe(what) -> str:
    if isinstance(what, str):
        return what
    node = what
    if node is not None and not hasattr(node, "op_type"):  # a Value
        if node.producer() is None:
            kind = "graph input" if node.is_graph_input() else "constant"
            return f"{kind} {node.name!r}"
        node = node.producer()
    if node is None:
        return "a missing input"
    op = node.op_type if node.domain == "" else f"{node.domain}::{node.op_type}"
    return f"op {op} (node {node.name!r})"


def _const(value) -> np.ndarray | None:
    a = _const_array(value)
    if a is None and value is not None:
        p = value.producer()
        if _is(p, "Constant") and "value" in p.attributes:
            a = p.attributes["value"].value.numpy()
    return a


def _ints(value) -> tuple[int, ...] | None:
    a = _const(value)
    return None if a is None or a.dtype.kind not in "iu" else tuple(int(x) for x in a.ravel())


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _padded(node, n: int) -> list:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def _chain_back(value):
    """(source, layout-op nodes from source to ``value`` in order)."""
    nodes = []
    p = value.producer()
    while p is not None and p.domain == "" and p.op_type in _LAYOUT_OPS:
        nodes.append(p)
        value = p.inputs[0]
        p = value.producer()
    return value, nodes[::-1]


def _chain_forward(value):
    """(end, layout-op nodes from ``value`` to end): followed while a value has one consumer."""
    nodes = []
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1:
            break
        n, idx = uses[0]
        if n.domain != "" or n.op_type not in _LAYOUT_OPS or idx != 0:
            break
        nodes.append(n)
        value = n.outputs[0]
    return value, nodes


def _fmt(layout) -> str:
    return "[" + ", ".join("*".join(d) if d else "1" for d in layout) + "]"


def _broadcasts(small, big) -> bool:
    """``small`` broadcasts into ``big`` without changing big's layout."""
    return len(small) <= len(big) and all(s in ((), b) for s, b in zip(small[::-1], big[::-1]))


def _broadcast(a, b):
    r = max(len(a), len(b))
    a, b = ((),) * (r - len(a)) + tuple(a), ((),) * (r - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x and y and x != y:
            return None
        out.append(x or y)
    return tuple(out)


def _axis(a: int, rank: int) -> int | None:
    return a % rank if -rank <= a < rank else None


@dataclass
class _Rope:
    concat: object
    x: object  # the rotated tensor (both Slices' input)
    halves: tuple  # (Slice of x1, Slice of x2)
    cos: object
    sin: object
    nodes: list


@dataclass
class _Layer:
    index: int
    q_mm: object
    k_mm: object
    v_mm: object
    o_mm: object
    qkv: tuple  # the projections' values as GroupQueryAttention reads them (after a bias Add)


class _Matcher:
    """Recognises one Attention node's subgraph (see the module docstring) or raises RuntimeError."""

    def __init__(self, attn, cfg, cos: np.ndarray, sin: np.ndarray, graph_inputs: dict):
        self.attn = attn
        self.where = f"Attention node {attn.name!r}"
        self.position_ids = graph_inputs.get("position_ids")
        self.n_valid = graph_inputs.get("n_valid")
        self.cos, self.sin = cos, sin
        self.sizes = {"T": None, "N": None, "S": cfg.max_seq_len, "H": cfg.n_heads, "Hkv": cfg.n_kv_heads,
                      "D": cfg.head_dim, "Dh": cos.shape[1]}
        self.core: dict = {}  # ordered set of the nodes the GroupQueryAttention replaces

    # ------------------------------------------------------------ helpers

    def fail(self, what, path: str, expected: str):
        raise RuntimeError(
            f"ONNX fusion (flavour fast): {self.where}: unexpected {_describe(what)} on the {path} path; expected "
            f"{expected}. Only the canonical decoder attention is mapped to GroupQueryAttention -- {_HINT}")

    def layout(self, *dims):
        return tuple(tuple(a for a in d if self.sizes[a] != 1) for d in dims)

    def keep(self, *nodes) -> None:
        for n in nodes:
            self.core[n] = None

    def through(self, layout, nodes, path: str):
        for n in nodes:
            out = self._step(layout, n)
            if out is None:
                self.fail(n, path, f"a layout op this matcher can follow on a {_fmt(layout)} tensor")
            layout = out
        return layout

    def _step(self, layout, node):
        op, r = node.op_type, len(layout)
        if op == "Identity":
            return layout
        if op == "Cast":
            return layout if node.inputs[0].dtype is not None and _attr(node, "to") == node.inputs[0].dtype else None
        if op == "Transpose":
            perm = list(_attr(node, "perm", range(r - 1, -1, -1)))
            return tuple(layout[p] for p in perm) if sorted(perm) == list(range(r)) else None
        if op in ("Unsqueeze", "Squeeze"):
            axes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if axes is None:
                return None
            if op == "Unsqueeze":
                ax = [_axis(a, r + len(axes)) for a in axes]
                if None in ax or len(set(ax)) != len(ax):
                    return None
                out = list(layout)
                for a in sorted(ax):
                    out.insert(a, ())
                return tuple(out)
            ax = {_axis(a, r) for a in axes}
            if None in ax or any(layout[a] for a in ax):
                return None
            return tuple(d for j, d in enumerate(layout) if j not in ax)
        if op == "Reshape":
            target = _ints(node.inputs[1])
            return None if target is None else self._reshape(layout, list(target), _attr(node, "allowzero", 0))
        return None

    def _reshape(self, layout, target, allowzero):
        """Regroup the atoms (row-major order is what Reshape keeps) into ``target``'s dims."""
        flat = [a for d in layout for a in d]
        entries = []
        for j, t in enumerate(target):
            if t == 0:
                if allowzero or j >= len(layout):
                    return None
                entries.append(layout[j])  # 0 copies the input dim
            elif t < -1:
                return None
            else:
                entries.append(t)
        if entries.count(-1) > 1:
            return None

        def take(entries, atoms):
            dims = []
            for t in entries:
                if isinstance(t, tuple):
                    if tuple(atoms[:len(t)]) != t:
                        return None
                    dims.append(t)
                    atoms = atoms[len(t):]
                elif t == 1:
                    dims.append(())
                else:
                    n, prod = 0, 1
                    while prod < t and n < len(atoms):
                        if self.sizes[atoms[n]] is None:
                            return None
                        prod *= self.sizes[atoms[n]]
                        n += 1
                    if prod != t:
                        return None
                    dims.append(tuple(atoms[:n]))
                    atoms = atoms[n:]
            return dims, atoms

        if -1 not in entries:
            res = take(entries, flat)
            return None if res is None or res[1] else tuple(res[0])
        k = entries.index(-1)
        left = take(entries[:k], flat)
        if left is None:
            return None
        right = take([t[::-1] if isinstance(t, tuple) else t for t in entries[k + 1:][::-1]], left[1][::-1])
        if right is None:
            return None
        rdims = [d[::-1] for d in right[0]][::-1]
        return tuple(left[0] + [tuple(right[1][::-1])] + rdims)

    def from_n_valid(self, value) -> bool:
        """``value`` is n_valid itself, through value-keeping ops on its single element."""
        while value is not self.n_valid:
            p = None if value is None else value.producer()
            if p is None or p.domain != "":
                return False
            if p.op_type == "Cast":
                import onnx_ir as ir

                if not ir.DataType(_attr(p, "to")).is_integer():
                    return False
            elif p.op_type == "Gather":
                idx = _const(p.inputs[1])
                if idx is None or idx.size != 1 or int(idx.ravel()[0]) not in (0, -1):
                    return False
            elif p.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Identity") and \
                    not (p.op_type == "Concat" and len(p.inputs) == 1):
                return False
            value = p.inputs[0]
        return True

    def prefix_slice(self, sl, layout, atom: str, path: str):
        """Slice(x, [0], n_valid, [axis of ``atom``]) -> layout with that dim now N."""
        ins = _padded(sl, 5)
        axes = _ints(ins[3]) if ins[3] is not None else None
        axis = layout.index((atom,)) if (atom,) in layout else None
        ok = (axis is not None and _ints(ins[1]) == (0,) and axes is not None and len(axes) == 1
              and _axis(axes[0], len(layout)) == axis and (ins[4] is None or _ints(ins[4]) == (1,))
              and self.from_n_valid(ins[2]))
        if not ok:
            self.fail(sl, path, f"a Slice of the first n_valid of the {atom} axis of a {_fmt(layout)} tensor")
        return tuple(("N",) if j == axis else d for j, d in enumerate(layout))

    # ------------------------------------------------------------ pieces

    def check_attention(self) -> None:
        a = self.attn
        want = 1.0 / math.sqrt(self.sizes["D"])
        for name, attr in a.attributes.items():
            v = attr.value
            ok = {"is_causal": lambda: v == 0, "softcap": lambda: v == 0.0, "qk_matmul_output_mode": lambda: v == 0,
                  "scale": lambda: math.isclose(v, want, rel_tol=1e-6), "softmax_precision": lambda: True}.get(name)
            if ok is None or not ok():
                self.fail(f"attribute {name}={v!r} of {_describe(a)}", "attention",
                          "a plain softmax attention (scale 1/sqrt(head_dim), no softcap, "
                          "not is_causal: the mask is an input)")
        ins = list(a.inputs)
        if len(ins) < 4 or any(v is None for v in ins[:4]) or any(v is not None for v in ins[4:]):
            self.fail(a, "attention", "Attention(Q, K, V, attn_mask) without past or nonpad inputs")
        for o in a.outputs[1:]:
            if o is not None and (o.uses() or o.is_graph_output()):
                self.fail(a, "attention", "only Attention's first output in use")
        self.keep(a)

    def cache_write(self, value, kind: str, path: str):
        """Attention's K/V input: layout ops <- Slice[:n_valid] <- ScatterElements(past_<kind>_i, ., .)."""
        src, chain = _chain_back(value)
        sl = src.producer()
        if not _is(sl, "Slice"):
            self.fail(src, path, "a Slice of the cache's first n_valid slots")
        scat = sl.inputs[0].producer()
        if not _is(scat, "ScatterElements"):
            self.fail(sl.inputs[0], path, f"the ScatterElements writing past_{kind}_i")
        past = scat.inputs[0]
        m = re.fullmatch(rf"past_{kind}_(\d+)", past.name or "") if past.is_graph_input() else None
        if m is None:
            self.fail(past, path, f"a cache write into a graph input past_{kind}_i")
        i = int(m.group(1))
        present = scat.outputs[0]
        if not (present.is_graph_output() and present.name == f"present_{kind}_{i}"):
            self.fail(scat, path, f"the cache write of past_{kind}_{i} to be the graph output present_{kind}_{i}")
        cache = self.layout((), ("Hkv",), ("S",), ("D",))
        axis = _attr(scat, "axis", 0)
        red = _attr(scat, "reduction", "none")
        red = red.decode() if isinstance(red, bytes) else red
        if _axis(axis, 4) != cache.index(("S",)) or red != "none":
            self.fail(scat, path, "a ScatterElements (no reduction) along the cache's sequence axis")
        self.check_indices(scat, path)
        n = self.prefix_slice(sl, cache, "S", path)
        if self.through(n, chain, path) != n:
            self.fail(chain[-1], path, f"K/V read as {_fmt(n)}")
        self.keep(scat, sl, *chain)
        return i, scat

    def check_indices(self, scat, path: str) -> None:
        """ScatterElements indices: position_ids along the sequence axis, (Expand-ed) to the updates."""
        idx = scat.inputs[1]
        if _is(idx.producer(), "Expand"):
            idx = idx.producer().inputs[0]
        src, chain = _chain_back(idx)
        if src is not self.position_ids:
            self.fail(src, path, "cache write indices made of position_ids")
        lay = self.through(self.layout(("T",)), chain, path)
        heads = self.layout((), ("Hkv",), ("T",), ("D",))
        if not (len(lay) == 4 and _broadcasts(lay, heads) and lay[2] == ("T",)):
            self.fail(scat, path, f"cache write indices position_ids laid out as [1, 1, T, 1] (got {_fmt(lay)})")

    def rope(self, value, path: str) -> _Rope:
        expected = "the rotate-half RoPE Concat(x1*cos - x2*sin, x2*cos + x1*sin)"
        cat = value.producer()
        if not _is(cat, "Concat") or len(cat.inputs) != 2:
            self.fail(value, path, expected)
        sub, add = (v.producer() for v in cat.inputs)
        for n, v, op in ((sub, cat.inputs[0], "Sub"), (add, cat.inputs[1], "Add")):
            if not _is(n, op):
                self.fail(v, path, f"the {op} of {expected}")
        muls = [v.producer() for v in (*sub.inputs, *add.inputs)]
        for m, v in zip(muls, (*sub.inputs, *add.inputs)):
            if not _is(m, "Mul"):
                self.fail(v, path, f"a Mul of {expected}")
        m1, m2 = muls[:2]
        for m3, m4 in ((muls[2], muls[3]), (muls[3], muls[2])):  # Add and every Mul commute
            for flips in itertools.product((0, 1), repeat=4):
                (x1, c1), (x2, s1), (x2b, c2), (x1b, s2) = [
                    (m.inputs[f], m.inputs[1 - f]) for m, f in zip((m1, m2, m3, m4), flips)]
                if x1 is x1b and x2 is x2b and c1 is c2 and s1 is s2 and x1 is not x2:
                    h1, h2 = x1.producer(), x2.producer()
                    if _is(h1, "Slice") and _is(h2, "Slice") and h1.inputs[0] is h2.inputs[0]:
                        return _Rope(cat, h1.inputs[0], (h1, h2), c1, s1, [cat, sub, add, *muls, h1, h2])
        self.fail(value, path, expected + " of two Slices of one tensor")

    def check_rope(self, r: _Rope, layout, path: str):
        """The halves are [0, D/2) and [D/2, D) of the head dim of ``layout``; cos/sin rows broadcast."""
        if ("D",) not in layout:
            self.fail(r.concat, path, f"RoPE over the head dim (the rotated tensor is {_fmt(layout)})")
        axis, half, D = layout.index(("D",)), self.sizes["Dh"], self.sizes["D"]
        for h, lo, hi in ((r.halves[0], 0, half), (r.halves[1], half, D)):
            ins = _padded(h, 5)
            ends = _ints(ins[2])
            axes = _ints(ins[3]) if ins[3] is not None else None
            ok = (_ints(ins[1]) == (lo,) and ends is not None and len(ends) == 1
                  and (ends[0] == hi if lo == 0 else ends[0] >= hi)
                  and axes is not None and len(axes) == 1 and _axis(axes[0], len(layout)) == axis
                  and (ins[4] is None or _ints(ins[4]) == (1,)))
            if not ok:
                self.fail(h, path, f"the RoPE halves x[..., :{half}] and x[..., {half}:] of the head dim")
        if _axis(_attr(r.concat, "axis", 0), len(layout)) != axis:
            self.fail(r.concat, path, "the RoPE halves concatenated along the head dim")
        x1 = tuple(self.layout(("Dh",))[0] if j == axis else d for j, d in enumerate(layout))
        self.check_table(r.cos, self.cos, x1, path, "cos")
        self.check_table(r.sin, self.sin, x1, path, "sin")

    def check_table(self, value, table: np.ndarray, x1, path: str, which: str) -> None:
        src, chain = _chain_back(value)
        g = src.producer()
        expected = f"the RoPE {which} rows Gathered by position_ids from the decoder's {which} table"
        if _is(g, "Gather") and _attr(g, "axis", 0) == 0:
            nd = False
        elif _is(g, "GatherND") and _attr(g, "batch_dims", 0) == 0:
            nd = True
        else:
            self.fail(src, path, expected)
        data = _const(g.inputs[0])
        if data is None or data.shape != table.shape or not np.array_equal(data, table):
            self.fail(g, path, expected + " (the table's values differ)")
        isrc, ichain = _chain_back(g.inputs[1])
        if isrc is not self.position_ids:
            self.fail(isrc, path, expected)
        idx = self.through(self.layout(("T",)), ichain, path)
        if nd:
            if not idx or idx[-1] != ():
                self.fail(g, path, expected)
            idx = idx[:-1]
        lay = self.through(idx + self.layout(("Dh",)), chain, path)
        if not _broadcasts(lay, x1):
            self.fail(chain[-1] if chain else g, path,
                      f"{which} rows laid out to broadcast along T and the head dim of {_fmt(x1)} (got {_fmt(lay)})")

    def projection(self, value, path: str):
        """``value`` = MatMul|MatMulNBits(x, W) (+ constant bias): returns (the matmul node, value)."""
        expected = f"the {path} projection MatMul/MatMulNBits (+ bias Add)"
        p = value.producer()
        if _is(p, "Add"):
            for a, b in (tuple(p.inputs), tuple(p.inputs)[::-1]):
                if _is_projection(a.producer()) and _const(b) is not None:
                    self.keep(p)
                    return a.producer(), value
            self.fail(value, path, expected)
        if not _is_projection(p):
            self.fail(value, path, expected)
        return p, value

    def projected(self, value, final, path: str, heads: str, rope: bool):
        """``value`` (laid out as ``final``) <- layout ops <- [RoPE <- layout ops] <- [1, T, heads*D] projection."""
        src, after = _chain_back(value)
        x, before, r = src, [], None
        if rope:
            r = self.rope(src, path)
            x, before = _chain_back(r.x)
        mm, out = self.projection(x, path)
        if out.shape is None or len(out.shape) != 3:
            self.fail(mm, path, f"a [1, T, {heads}*D] projection output")
        lay = self.through(self.layout((), ("T",), (heads, "D")), before, path)
        if rope:
            self.check_rope(r, lay, path)
            self.keep(*r.nodes)
        end = self.through(lay, after, path)
        if end != final:
            self.fail(after[-1] if after else src, path, f"{path} laid out as {_fmt(final)}, got {_fmt(end)}")
        self.keep(mm, *before, *after)
        return mm, out

    def check_mask(self, mask) -> None:
        path = "mask"
        expected = "the causal mask Where(arange(S) <= position_ids[:, None], 0, -inf)[:, :n_valid]"
        src, chain = _chain_back(mask)
        sl = src.producer()
        if not _is(sl, "Slice"):
            self.fail(src, path, expected)
        wsrc, wchain = _chain_back(sl.inputs[0])
        w = wsrc.producer()
        if not _is(w, "Where"):
            self.fail(wsrc, path, expected)
        cond, zero, neg = w.inputs
        z, ninf = _const(zero), _const(neg)
        if (z is None or z.size != 1 or z.ndim > 2 or z.ravel()[0] != 0 or ninf is None or ninf.size != 1
                or ninf.ndim > 2 or not ninf.ravel()[0] <= -1e30):
            self.fail(w, path, expected)
        c = cond.producer()
        if _is(c, "LessOrEqual"):
            ar, pos = c.inputs
        elif _is(c, "GreaterOrEqual"):
            pos, ar = c.inputs
        else:
            self.fail(cond, path, expected)
        S = self.sizes["S"]
        arange = _const(ar)
        if (arange is None or arange.size != S or arange.ndim not in (1, 2) or arange.shape[-1] != S
                or not np.array_equal(arange.ravel(), np.arange(S))):
            self.fail(c, path, expected + " (the slot positions differ)")
        psrc, pchain = _chain_back(pos)
        if psrc is not self.position_ids:
            self.fail(psrc, path, expected)
        lay = _broadcast(self.layout(*([()] * (arange.ndim - 1)), ("S",)),
                         self.through(self.layout(("T",)), pchain, path))
        if lay != self.layout(("T",), ("S",)):
            self.fail(c, path, expected)
        lay = self.prefix_slice(sl, self.through(lay, wchain, path), "S", path)
        lay = self.through(lay, chain, path)
        if not _broadcasts(lay, self.layout((), ("H",), ("T",), ("N",))):
            self.fail(chain[-1] if chain else sl, path, f"a [T, n_valid] mask, got {_fmt(lay)}")

    def output(self):
        """Attention -> layout ops -> the o projection; returns the o projection's matmul."""
        value, chain = _chain_forward(self.attn.outputs[0])
        uses = list(value.uses())
        o = uses[0].node if len(uses) == 1 and uses[0].idx == 0 and not value.is_graph_output() else None
        if not _is_projection(o):
            self.fail(uses[0].node if uses else value, "output",
                      "the o projection MatMul/MatMulNBits reading the attention")
        lay = self.through(self.layout((), ("H",), ("T",), ("D",)), chain, "output")
        if lay != self.layout((), ("T",), ("H", "D")):
            self.fail(chain[-1] if chain else self.attn, "output",
                      f"the attention read as [1, T, H*D], got {_fmt(lay)}")
        self.keep(*chain)
        return o

    # ------------------------------------------------------------ all of it

    def match(self) -> _Layer:
        self.check_attention()
        q, k, v, mask = self.attn.inputs[:4]
        i, k_write = self.cache_write(k, "key", "k")  # the cache the layer writes names it
        self.where = f"layer {i} ({self.where})"
        j, v_write = self.cache_write(v, "value", "v")
        if j != i:
            self.fail(v_write, "v", f"the cache write into past_value_{i}")
        heads = self.layout((), ("Hkv",), ("T",), ("D",))
        k_mm, k_out = self.projected(k_write.inputs[2], heads, "k", "Hkv", rope=True)
        v_mm, v_out = self.projected(v_write.inputs[2], heads, "v", "Hkv", rope=False)
        q_mm, q_out = self.projected(q, self.layout((), ("H",), ("T",), ("D",)), "q", "H", rope=True)
        if not (q_mm.inputs[0] is k_mm.inputs[0] is v_mm.inputs[0]):
            self.fail(k_mm if k_mm.inputs[0] is not q_mm.inputs[0] else v_mm, "k/v",
                      "q, k and v projections of one input")
        self.check_mask(mask)
        o_mm = self.output()
        allowed = {**self.core, o_mm: None}
        for n in self.core:
            for out in n.outputs:
                for use in out.uses():
                    if use.node not in allowed:
                        self.fail(use.node, "attention",
                                  f"no use of {out.name!r} ({_describe(n)}) outside the attention subgraph")
                if out.is_graph_output() and not _is(n, "ScatterElements"):
                    self.fail(n, "attention", f"no graph output ({out.name!r}) inside the attention subgraph")
        return _Layer(i, q_mm, k_mm, v_mm, o_mm, (q_out, k_out, v_out))


def match_attention(graph, cfg, cos: np.ndarray, sin: np.ndarray) -> list[_Layer]:
    """Every layer's attention subgraph, recognised from its Attention node; in layer order."""
    inputs = {v.name: v for v in graph.inputs}
    layers: dict[int, _Layer] = {}
    for node in graph:
        if _is(node, "Attention"):
            m = _Matcher(node, cfg, cos, sin, inputs).match()
            if m.index in layers:
                raise RuntimeError(f"ONNX fusion (flavour fast): two Attention nodes write past_key_{m.index}; {_HINT}")
            layers[m.index] = m
    if sorted(layers) != list(range(cfg.n_layers)):
        raise RuntimeError(f"ONNX fusion (flavour fast): expected one Attention per layer 0..{cfg.n_layers - 1}, "
                           f"recognised layers {sorted(layers)}; {_HINT}")
    return [layers[i] for i in range(cfg.n_layers)]


# --------------------------------------------------------------------------- rewrite

def _fuse_qkv(graph, q_mm, k_mm, v_mm, prefix: str):
    """One matmul for q, k and v (same input, no bias): [q | k | v] along N."""
    if q_mm.op_type == "MatMulNBits":
        if not all(n.op_type == "MatMulNBits" for n in (k_mm, v_mm)):
            return None
        ins = [[_const_array(x) for x in n.inputs[1:]] for n in (q_mm, k_mm, v_mm)]
        if any(len(i) != len(ins[0]) for i in ins):
            return None
        attrs = {k: v.value for k, v in q_mm.attributes.items()}
        same = ("K", "bits", "block_size", "accuracy_level")
        if any(_attr(n, a) != attrs.get(a) for n in (k_mm, v_mm) for a in same):
            return None  # e.g. an override gave one projection another precision: kept apart
        Ns = [n.attributes["N"].value for n in (q_mm, k_mm, v_mm)]
        K, group, bits = attrs["K"], attrs["block_size"], attrs["bits"]
        nb = K // group
        t = {"data": np.concatenate([i[0] for i in ins]).reshape(sum(Ns), K * bits // 8),
             "scales": np.concatenate([i[1].reshape(-1, nb) for i in ins])}
        if len(ins[0]) > 2:
            t["zero_points"] = np.concatenate([i[2].reshape(n, -1) for i, n in zip(ins, Ns)])
        weights = ",".join(n.metadata_props[WEIGHTS_KEY] for n in (q_mm, k_mm, v_mm))
        node = _matmul_nbits(graph, q_mm.inputs[0], t, f"{prefix}.qkv_proj", K, sum(Ns), group,
                             attrs["accuracy_level"], weights, bits)
    else:
        if not all(n.op_type == "MatMul" for n in (k_mm, v_mm)):
            return None
        ws = [_const_array(n.inputs[1]) for n in (q_mm, k_mm, v_mm)]
        if any(w is None for w in ws):
            return None
        w = _init(graph, f"{prefix}.qkv_proj.weight", np.concatenate(ws, axis=1))
        node = _node("", "MatMul", [q_mm.inputs[0], w], name=f"{prefix}.qkv_proj/MatMul")
    graph.insert_before(q_mm, node)
    return node


def fuse_for_ort_cpu(model, cfg, cos: np.ndarray | None, sin: np.ndarray | None, progress=print) -> None:
    """GroupQueryAttention (+ fused QKV) per layer and SkipSimplifiedLayerNormalization. The
    attention is fused only over a plain fp32 cache with full rotary (what GroupQueryAttention
    carries); otherwise it stays as traced and the norms are still fused."""
    if cos is None or cfg.kv_cache.dtype != "fp32" or cfg.kv_cache.window is not None:
        progress(f"onnx: kv_cache {cfg.kv_cache.to_dict()}: GroupQueryAttention fusion skipped (portable attention "
                 f"kept; it carries a plain fp32 cache)")
    elif cos.shape[1] * 2 != cfg.head_dim:
        progress("onnx: partial rotary: GroupQueryAttention fusion skipped (portable attention kept)")
    else:
        _fuse_attention(model, cfg, cos, sin)
    _fuse_norms(model, progress)


def _fuse_attention(model, cfg, cos: np.ndarray, sin: np.ndarray) -> None:
    import onnx_ir as ir

    g = model.graph
    layers = match_attention(g, cfg, cos, sin)  # before any rewrite: a refused graph is left as traced
    inputs = {v.name: v for v in g.inputs}
    outputs = {v.name: v for v in g.outputs}
    first = next(iter(g))
    one = _init(g, "gqa.one", np.array(1, np.int64))
    nm1 = _node("", "Sub", [inputs["n_valid"], one], name="gqa/seqlens")
    seqlens_i64 = nm1.outputs[0]
    cast1 = _node("", "Cast", [seqlens_i64], attributes={"to": ir.DataType.INT32}, name="gqa/seqlens_i32")
    shape1 = _init(g, "gqa.shape1", np.array([1], np.int64))
    rs = _node("", "Reshape", [cast1.outputs[0], shape1], name="gqa/seqlens_k")
    total = _node("", "Cast", [inputs["n_valid"]], attributes={"to": ir.DataType.INT32}, name="gqa/total_len")
    for n in (nm1, cast1, rs, total):
        g.insert_before(first, n)
    rs.outputs[0].name, total.outputs[0].name = "seqlens_k", "total_seq_len"
    cos_v, sin_v = _init(g, "rope.cos_cache", cos.astype(np.float32)), _init(g, "rope.sin_cache", sin.astype(np.float32))
    for layer in layers:
        i = layer.index
        p = f"layers.{i}.self_attn"
        gqa_in = list(layer.qkv)
        if all(v is mm.outputs[0] for v, mm in zip(layer.qkv, (layer.q_mm, layer.k_mm, layer.v_mm))):
            qkv = _fuse_qkv(g, layer.q_mm, layer.k_mm, layer.v_mm, p)  # no bias: one matmul
            if qkv is not None:
                gqa_in = [qkv.outputs[0], None, None]
        attrs = {"num_heads": cfg.n_heads, "kv_num_heads": cfg.n_kv_heads, "do_rotary": 1,
                 "rotary_interleaved": 0, "scale": 1.0 / math.sqrt(cfg.head_dim)}
        node = _node(MS, "GroupQueryAttention",
                     gqa_in + [inputs[f"past_key_{i}"], inputs[f"past_value_{i}"], rs.outputs[0],
                               total.outputs[0], cos_v, sin_v],
                     attributes=attrs, num_outputs=3, name=f"{p}/GroupQueryAttention")
        g.insert_before(layer.o_mm, node)
        layer.o_mm.replace_input_with(0, node.outputs[0])
        for j, kind in ((1, "key"), (2, "value")):
            _replace_value(outputs[f"present_{kind}_{i}"], node.outputs[j])
    _remove_unused(model)


def _fuse_norms(model, progress) -> None:
    g = model.graph
    layers = sum(1 for n in g if n.op_type == "GroupQueryAttention")
    skip = 0
    for node in list(g):
        if node.op_type != "RMSNormalization":
            continue
        x, gamma = node.inputs[0], node.inputs[1]
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        add = x.producer()
        if add is not None and add.op_type == "Add" and all(_const_array(a) is None for a in add.inputs):
            new = _node(MS, "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], gamma],
                        attributes={"epsilon": float(eps)}, num_outputs=4, name=f"{node.name}/Skip")
            g.insert_before(node, new)
            _replace(g, node, new, [(node.outputs[0], new.outputs[0])])
            _replace_value(add.outputs[0], new.outputs[3])
            skip += 1
    _remove_unused(model)
    _topological_sort(model)
    progress(f"onnx: {layers} GroupQueryAttention, {skip} SkipSimplifiedLayerNormalization")


def _topological_sort(model) -> None:
    from onnx_ir.passes.common import TopologicalSortPass

    TopologicalSortPass()(model)
