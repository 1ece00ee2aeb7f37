"""ExecuTorch lowering without the XNNPACK retraces that cannot change anything (executorch 1.5.1).

``XnnpackBackend.preprocess`` runs 17 passes over every delegated partition, and 15 of them end
with ``ExportPass.call`` -- a full re-interpretation of the partition under FakeTensorMode with
the symbolic query length. On a decoder none of them matches anything (upsample-bilinear, batch
norm, PReLU, conv1d, SDPA patterns, ...; measured on SmolLM2: 0 of 61 partitions changed by any
of them), so those retraces only rebuild the graph they were given: ~85 % of preprocess time.

``lean_lowering()`` keeps the pass list and order; while it is active:

- a pass that rewrites the graph *before* its retrace (the usual XNNPACK pattern: mutate in
  place, then ``super().call``) gets its retrace skipped when the graph's structure (nodes,
  targets, args, kwargs) is unchanged since the pass began -- retracing an unchanged graph
  re-derives the same metadata, and node meta is carried over by a retrace anyway, so
  meta-only edits (tags) survive;
- the two passes that do their work *inside* the retrace (``call_operator``) are skipped when
  they provably have nothing to do: ``DimOrderOpsRevertPass`` when no dim-order op is in the
  partition, ``ConstPropPass`` when no op has only constant (get_attr/literal) inputs. Any
  other pass overriding an ``ExportPass`` callback runs unchanged.

The patches (``XNNPACKPassManager.transform``, ``_ExportPassBase.call``) last for the context
only, and nothing is patched on an executorch version other than 1.5.1 (the library then
behaves as shipped). The produced .pte is byte-identical to the unpatched lowering's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import torch

SUPPORTED_EXECUTORCH = "1.5.1"
_CALLBACKS = ("call_operator", "call_sym", "call_getitem", "call_cond", "call_map", "call_scan", "call_while",
              "call_delegate", "call_submodule", "placeholder", "output")


def _signature(gm: torch.fx.GraphModule) -> tuple:
    """The graph's structure: per node op, target, args and kwargs (nodes by position)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return ("%", index.get(a, a.name))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *map(arg, a))
        if isinstance(a, dict):
            return ("dict", *((k, arg(v)) for k, v in a.items()))
        return repr(a)

    return tuple((n.op, str(n.target), arg(n.args), arg(n.kwargs)) for n in gm.graph.nodes)


def _has_work_in_retrace(p, gm: torch.fx.GraphModule) -> bool:
    """For a pass that works inside the retrace: can it change anything in ``gm``?"""
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.dim_order_ops_registry import MemoryFormatOpsMap
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsRevertPass

    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    if type(p) is DimOrderOpsRevertPass:
        return any(n.target in MemoryFormatOpsMap for n in calls)
    if type(p) is ConstPropPass:  # folds only ops whose inputs are all constants, never placeholders
        return any(all(i.op == "get_attr" for i in n.all_input_nodes) for n in calls)
    return True  # unknown: run it


def supported() -> bool:
    """The executorch version these patches were written against is installed."""
    try:
        return importlib.metadata.version("executorch") == SUPPORTED_EXECUTORCH
    except importlib.metadata.PackageNotFoundError:
        return False


@contextlib.contextmanager
def lean_lowering():
    """While active, XNNPACK preprocess skips retraces that would rebuild an unchanged graph."""
    if not supported():
        yield False
        return

    from executorch.backends.xnnpack._passes import XNNPACKPass, XNNPACKPassManager
    from executorch.exir.pass_base import ExportPass, _ExportPassBase
    from executorch.exir.program._program import _transform
    from torch.fx.passes.infra.pass_base import PassResult

    current = {"pass": None, "before": None}
    orig_call, orig_transform = _ExportPassBase.call, XNNPACKPassManager.transform

    def call(self, graph_module):
        if self is current["pass"] and _signature(graph_module) == current["before"]:
            return PassResult(graph_module, True)  # the retrace would rebuild the same graph
        return orig_call(self, graph_module)

    def transform(self):
        ep = self.exported_program
        for pass_ in self.passes:
            if not issubclass(pass_, ExportPass):
                raise RuntimeError(f"Expecting an ExportPass, but got pass: {pass_}")
            p = pass_(ep) if issubclass(pass_, XNNPACKPass) else pass_()
            in_retrace = any(
                getattr(type(p), c, None) is not getattr(ExportPass, c, None) for c in _CALLBACKS)
            if in_retrace:
                if _has_work_in_retrace(p, ep.graph_module):
                    ep = _transform(ep, p)
                continue
            current["pass"], current["before"] = p, _signature(ep.graph_module)
            try:
                ep = _transform(ep, p)
            finally:
                current["pass"] = current["before"] = None
        return ep

    _ExportPassBase.call, XNNPACKPassManager.transform = call, transform
    try:
        yield True
    finally:
        _ExportPassBase.call, XNNPACKPassManager.transform = orig_call, orig_transform


@contextlib.contextmanager
def partitions_recompiled_once():
    """While active, carving the delegated partitions out of the program regenerates the
    program's Python code once, not once per partition (executorch 1.5.1).

    ``create_submodule_from_nodes`` moves each partition into a submodule and then re-sorts the
    whole top-level graph (``legalize_graph``), whose ``gm.graph = new_graph`` recompiles the
    graph module: Python source for every node of the program, per partition (61 on SmolLM2,
    ~5 % of the lowering). Between partitions nothing runs the program's code -- the partitions
    are found, fused, inserted and erased on its ``Graph`` -- so while
    ``_create_partitions_in_graph_module`` runs, ``legalize_graph`` sorts exactly as shipped
    but leaves the recompile to its end, which recompiles once from the final graph. Code
    generation reads only the graph, so the result is the same module; the .pte (built from the
    graph, never from its code) is byte-identical.
    """
    if not supported():
        yield False
        return

    from executorch.exir import lowered_backend_module
    from executorch.exir.backend import backend_api

    orig_legalize, orig_create = lowered_backend_module.legalize_graph, backend_api._create_partitions_in_graph_module
    stale = []

    def legalize_graph(gm):
        if "recompile" in vars(gm):  # an instance override already: leave it alone
            return orig_legalize(gm)
        gm.__dict__["recompile"] = lambda: None  # the graph setter's recompile, deferred
        try:
            return orig_legalize(gm)
        finally:
            del gm.__dict__["recompile"]
            stale.append(gm)

    def create_partitions_in_graph_module(tagged_graph_module, *args, **kwargs):
        try:
            return orig_create(tagged_graph_module, *args, **kwargs)
        finally:
            while stale:
                gm = stale.pop()
                if not any(gm is g for g in stale):
                    gm.recompile()

    lowered_backend_module.legalize_graph = legalize_graph
    backend_api._create_partitions_in_graph_module = create_partitions_in_graph_module
    try:
        yield True
    finally:
        lowered_backend_module.legalize_graph, backend_api._create_partitions_in_graph_module = \
            orig_legalize, orig_create
