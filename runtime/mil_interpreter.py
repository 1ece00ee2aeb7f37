"""A numpy reference interpreter for saved Core ML ML Programs (how parity is proven on Linux).

No Apple runtime runs on Linux, so the *saved* ``.mlpackage`` is executed here op by op: the
MIL program is loaded back from the package's spec and weight blobs with coremltools' own
milproto loader, then every op of ``main`` is evaluated with a small numpy kernel written
from the MIL op definitions — including the states (``read_state`` /
``coreml_update_state``) and the int4/int8 ``constexpr_blockwise_shift_scale`` weights. An op
without a kernel is an error naming it, never a silent fallback.

Precision emulated: every tensor between ops has the dtype the program declares (fp16 for
the fp16 ops, fp32 where the program keeps fp32, fp16 states); each op computes in fp32 from
its inputs and rounds once to its output dtype (fp32 accumulation, as Core ML's GPU/CPU
matmuls do). constexpr weights are materialized once as fp16(scale * (codes - offset)), which is
exact: int4/int8 codes (and offsets) are exact in fp32, and an fp16 scale (11 significant bits)
times an integer below 2^9 has at most 20, so the one rounding is the final cast to fp16 — the
value the op defines (int4 per block, int8 per row alike).
It is slow by design (single-threaded numpy), but it executes exactly the program that ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

_F32 = np.float32


def load_program(package: str | Path):
    """The pymil Program of a saved .mlpackage (spec + weight blobs)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return spec, load(spec, spec.specificationVersion, str(weights))


def np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


def _f(x):
    return np.asarray(x, dtype=_F32)


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    idx = []
    for i in range(len(shape)):
        s = int(stride[i]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))
            continue
        b = None if (begin_mask is not None and begin_mask[i]) else int(begin[i])
        e = None if (end_mask is not None and end_mask[i]) else int(end[i])
        idx.append(slice(b, e, s))
    return tuple(idx)


def _slice_args(a):
    return (a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"), a.get("squeeze_mask"))


def _reshape(x, shape):
    shape = [int(d) for d in np.atleast_1d(shape)]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _expand_dims(x, axes):
    rank = x.ndim + len(np.atleast_1d(axes))
    for a in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, a)
    return x


def _slice_update(a):
    x = np.array(a["x"], copy=True)
    idx = _slices(x.shape, *_slice_args(a))
    x[idx] = np.asarray(a["update"]).reshape(x[idx].shape)
    return x


def _sdpa(a):
    k, v, m = a["key"], a["value"], a.get("attn_mask")
    if m is not None and m.dtype != bool and m.shape[-1] == k.shape[-2]:
        # Key slots hidden from every query row (additive mask ≤ -1e4: the static cache's unused
        # tail) get softmax weight exp(-1e4 + ...) == 0.0 exactly in fp32; skipping them changes no
        # bit of the result and makes attention cost proportional to the filled length.
        live = np.flatnonzero((m > -1e4).reshape(-1, m.shape[-1]).any(0))
        if live.size < m.shape[-1]:
            k, v, m = np.take(k, live, axis=-2), np.take(v, live, axis=-2), np.take(m, live, axis=-1)
    q, k, v = _f(a["query"]), _f(k), _f(v)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(_F32(q.shape[-1]))
    if m is not None:
        s = np.where(m, s, -np.inf) if m.dtype == bool else s + _f(m)
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


def _blockwise(a):
    data = a["data"].astype(_F32)
    scale = _f(a["scale"])
    if a.get("offset") is not None:
        off = a["offset"].astype(_F32)
        for ax in range(data.ndim):
            off = np.repeat(off, data.shape[ax] // off.shape[ax], axis=ax)
        data = data - off
    for ax in range(data.ndim):
        scale = np.repeat(scale, data.shape[ax] // scale.shape[ax], axis=ax)
    return scale * data


def _tile(x, reps):
    """``np.tile`` as one broadcast copy: the same array (a copy decides no rounding), without
    np.tile's repeat per axis, which was a sixth of a decode step (K/V heads tiled for GQA over
    the whole 2048-slot cache)."""
    x = np.asarray(x)
    reps = [int(r) for r in np.atleast_1d(reps)]
    if len(reps) < x.ndim:
        reps = [1] * (x.ndim - len(reps)) + reps
    x = x.reshape((1,) * (len(reps) - x.ndim) + x.shape)
    pairs = [d for r, n in zip(reps, x.shape) for d in (r, n)]
    src = x.reshape([d for n in x.shape for d in (1, n)])
    return np.broadcast_to(src, pairs).reshape([r * n for r, n in zip(reps, x.shape)])


def _concat(a):
    vals = [np.asarray(v) for v in a["values"]]
    if any(v.ndim == 0 for v in vals):
        vals = [np.atleast_1d(v) for v in vals]
    if a.get("interleave"):
        raise NotImplementedError("MIL interpreter: concat with interleave=True has no kernel "
                                  "(edgellm's converted programs do not emit it)")
    return np.concatenate(vals, axis=int(a["axis"]))


def _real_div(a):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer):
        return np.floor_divide(x, y)
    return _f(x) / _f(y)


def _reduce(fn):
    def k(a):
        axes = a.get("axes")
        axes = tuple(int(i) for i in np.atleast_1d(axes)) if axes is not None else None
        return fn(_f(a["x"]), axis=axes, keepdims=bool(a.get("keep_dims", False)))
    return k


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# op type -> kernel(inputs: dict) -> array (cast to the op's declared output dtype afterwards)
KERNELS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "linear": lambda a: _f(a["x"]) @ _f(a["weight"]).T + (_f(a["bias"]) if a.get("bias") is not None else 0),
    "matmul": lambda a: (np.swapaxes(_f(a["x"]), -1, -2) if a.get("transpose_x") else _f(a["x"]))
    @ (np.swapaxes(_f(a["y"]), -1, -2) if a.get("transpose_y") else _f(a["y"])),
    "add": lambda a: np.add(a["x"], a["y"], dtype=None if np.asarray(a["x"]).dtype.kind in "iub" else _F32),
    "sub": lambda a: np.subtract(a["x"], a["y"], dtype=None if np.asarray(a["x"]).dtype.kind in "iub" else _F32),
    "mul": lambda a: np.multiply(a["x"], a["y"], dtype=None if np.asarray(a["x"]).dtype.kind in "iub" else _F32),
    "real_div": _real_div,
    "floor_div": lambda a: np.floor_divide(a["x"], a["y"]),
    "pow": lambda a: np.power(_f(a["x"]), _f(a["y"])),
    "maximum": lambda a: np.maximum(a["x"], a["y"]),
    "minimum": lambda a: np.minimum(a["x"], a["y"]),
    "equal": lambda a: np.equal(a["x"], a["y"]),
    "not_equal": lambda a: np.not_equal(a["x"], a["y"]),
    "greater": lambda a: np.greater(a["x"], a["y"]),
    "greater_equal": lambda a: np.greater_equal(a["x"], a["y"]),
    "less": lambda a: np.less(a["x"], a["y"]),
    "less_equal": lambda a: np.less_equal(a["x"], a["y"]),
    "logical_and": lambda a: np.logical_and(a["x"], a["y"]),
    "logical_or": lambda a: np.logical_or(a["x"], a["y"]),
    "logical_not": lambda a: np.logical_not(a["x"]),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "rsqrt": lambda a: 1.0 / np.sqrt(_f(a["x"]) + _F32(a.get("epsilon", 1e-12))),
    "sqrt": lambda a: np.sqrt(_f(a["x"])),
    "exp": lambda a: np.exp(_f(a["x"])),
    "cos": lambda a: np.cos(_f(a["x"])),
    "sin": lambda a: np.sin(_f(a["x"])),
    "mod": lambda a: np.mod(a["x"], a["y"]),  # MIL's x - floor(x / y) * y: torch.remainder's sign
    "neg": lambda a: -_f(a["x"]),
    "silu": lambda a: _f(a["x"]) * _sigmoid(_f(a["x"])),
    "sigmoid": lambda a: _sigmoid(_f(a["x"])),
    "softmax": lambda a: (lambda e: e / e.sum(int(a["axis"]), keepdims=True))(
        np.exp(_f(a["x"]) - _f(a["x"]).max(int(a["axis"]), keepdims=True))),
    "clip": lambda a: np.clip(_f(a["x"]), a["alpha"], a["beta"]),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "cast": lambda a: np.asarray(a["x"]),
    "identity": lambda a: a["x"],
    "shape": lambda a: np.array(np.shape(a["x"]), dtype=np.int32),
    "reshape": lambda a: _reshape(np.asarray(a["x"]), a["shape"]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a: _expand_dims(np.asarray(a["x"]), a["axes"]),
    "squeeze": lambda a: np.squeeze(a["x"], axis=tuple(int(i) for i in a["axes"]) if a.get("axes") is not None else None),
    "tile": lambda a: _tile(a["x"], a["reps"]),
    "concat": _concat,
    "gather": lambda a: np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0))),
    "slice_update": _slice_update,
    "slice_by_index": lambda a: np.asarray(a["x"])[_slices(np.shape(a["x"]), *_slice_args(a))],
    "fill": lambda a: np.full([int(d) for d in a["shape"]], a["value"]),
    "scaled_dot_product_attention": _sdpa,
    "constexpr_blockwise_shift_scale": _blockwise,
}


class MILInterpreter:
    """Executes ``main`` of a saved ML Program; ``states`` persist between calls until ``reset``."""

    def __init__(self, package: str | Path, function: str = "main"):
        self.spec, self.program = load_program(package)
        self.fn = self.program.functions[function]
        self.consts: dict[str, np.ndarray] = {}
        self.plan = []
        self.state_specs = {}
        for name, var in self.fn.inputs.items():
            if _is_state(var):
                self.state_specs[name] = (tuple(int(d) for d in var.sym_type.wrapped_type().get_shape()),
                                          np.dtype(np.float16))
        for op in self.fn.operations:
            out = op.outputs
            if op.op_type == "const":
                self.consts[out[0].name] = np.asarray(out[0].val)
                continue
            if op.op_type in ("read_state", "coreml_update_state") or op.op_type in KERNELS:
                self.plan.append((op.op_type, op.name, _input_names(op), out[0].name, np_dtype(out[0])
                                  if op.op_type not in ("read_state", "coreml_update_state") else None))
            else:
                raise NotImplementedError(f"MIL interpreter: no kernel for op {op.op_type!r} ({op.name})")
        # constexpr weights never change: materialize them once (fp16 values held as fp32 for BLAS)
        plan = []
        for step in self.plan:
            kind, name, ins, out, dt = step
            if kind.startswith("constexpr_"):
                val = KERNELS[kind]({k: self._get(v, {}) for k, v in ins.items()})
                self.consts[out] = np.asarray(val).astype(dt).astype(_F32)
            else:
                plan.append(step)
        self.plan = plan
        used = {r for _, _, ins, _, _ in plan for v in ins.values() for r in (v if isinstance(v, list) else [v])}
        used.update(o.name for o in self.fn.outputs)
        self.consts = {k: v for k, v in self.consts.items() if k in used}  # drop the codes once materialized
        self.outputs = [v.name for v in self.fn.outputs]
        # Each step's constant inputs are looked up once here, not on every call (the per-op
        # lookups were a tenth of a decode step): (kind, ins, out, dtype, constants, live, lists).
        self._steps = []
        for kind, _, ins, out, dt in plan:
            fixed = {k: self.consts[v] for k, v in ins.items() if isinstance(v, str) and v in self.consts}
            fixed.update({k: None for k, v in ins.items() if v is None})
            live = [(k, v) for k, v in ins.items() if isinstance(v, str) and v not in self.consts]
            lists = [(k, v) for k, v in ins.items() if isinstance(v, list)]
            self._steps.append((kind, ins, out, dt, fixed, live, lists))
        self.reset()

    def reset(self) -> None:
        self.states = {n: np.zeros(shape, dtype) for n, (shape, dtype) in self.state_specs.items()}

    def _get(self, ref, env):
        if isinstance(ref, list):
            return [self._get(r, env) for r in ref]
        if ref is None:
            return None
        if ref in env:
            return env[ref]
        return self.consts[ref]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name, var in self.fn.inputs.items():
            if name in self.state_specs:
                continue
            if name not in inputs:
                raise ValueError(f"MIL interpreter: missing input {name!r}")
            env[name] = np.asarray(inputs[name]).astype(np_dtype(var))
        for kind, ins, out, dt, fixed, live, lists in self._steps:
            if kind == "read_state":
                env[out] = self.states[ins["input"]]
                continue
            if kind == "coreml_update_state":
                val = np.asarray(self._get(ins["value"], env))
                self.states[ins["state"]] = val.astype(np.float16, copy=False)  # no kernel writes its inputs
                env[out] = val
                continue
            args = dict(fixed)
            for k, v in live:
                args[k] = env[v]
            for k, v in lists:
                args[k] = self._get(v, env)
            env[out] = np.asarray(KERNELS[kind](args)).astype(dt, copy=False)
        return {n: env[n] if n in env else self.consts[n] for n in self.outputs}


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _input_names(op) -> dict[str, Any]:
    out = {}
    for k, v in op.inputs.items():
        out[k] = [x.name for x in v] if isinstance(v, (list, tuple)) else v.name
    return out
