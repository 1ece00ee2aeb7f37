"""``to_edge_transform_and_lower`` without the edge-conversion retraces that cannot change the
program (executorch 1.5.1). Measured on SmolLM2 fast: the third decomposition is 50 s of CPU, each
skipped pass retrace 11-12 s, of a ~300 s lowering.

Before partitioning, executorch turns the exported program into edge dialect with up to three
``run_decompositions`` calls (``_gen_edge_manager_for_partitioners``): ``{}`` to functionalize,
then the default table minus the partitioner's preserved ops, then -- after the preserved ops
that pass the partitioner's check were swapped for no-decomp placeholders -- the full default
table. Each call re-exports the whole program under FakeTensorMode with the symbolic query
length. On our decoders the third call finds no op of its table in the graph (every preserved
op passed the check, the second call decomposed the rest), so it only re-derives the graph it
was given.

The first two calls are merged into one. Every ``run_decompositions`` functionalizes (it
re-exports through AOTAutograd's functionalization whatever its table), and the second call's
table does not depend on the functionalized program: XNNPACK's ``ops_to_not_decompose`` returns
a fixed op list (the program only reaches its check function, which is applied after the second
call). So inside ``_gen_edge_manager_for_partitioners`` the ``{}`` call on the exported program
returns it unchanged and marks it pending; the next ``run_decompositions`` on it, with the
table, functionalizes and decomposes in one retrace. Should no decomposition follow (a path that
skips it: no partitioner at all; with a partitioner that has no check function, nothing is
deferred), ``_generate_edge_program`` functionalizes the pending program with ``{}`` first, as
executorch would have. On SmolLM2 this saves one whole-program retrace (~30 s of ~150 s).

Executorch already skips that call on its other path when no table target occurs in the graph
(``contains_any_call_fn_target_op``). ``lean_edge()`` applies a slightly wider test to a program
that is itself the result of a ``run_decompositions`` made while it is active (so already
functional: every call functionalizes): every op of the new table still in
the graph must have been in the previous table with the same decomposition -- it survived that
decomposition, so it is a fixed point of it (``aten.sym_size.int``, which tracing re-creates, is
the one such op on our graphs). Then the program is returned unchanged.

``_generate_edge_program`` then runs edge passes that each end in a full retrace
(``ExportPass.call``) and rewrite only inside it (``call_operator``). Four of them have a
target set that can be read off the graph (``_may_rewrite``): ``NormalizeTransposePass``
(``aten.t``), ``ReplaceBrokenOpsWithFunctionalOpsPass`` (view ops, all ``*_copy`` by then),
``SymToTensorPass`` (a SymInt given to a Tensor argument) and ``RemoveMixedTypeOperators`` (a
binary op with arguments off the promoted dtype); with none present, the retrace only rebuilds
its input and is skipped. Every other pass runs as shipped.

The patches (``ExportedProgram.run_decompositions``, ``_ExportPassBase.call``, and
``_gen_edge_manager_for_partitioners`` and ``_generate_edge_program`` of
``executorch.exir.program._program``) last for the context only and are not applied on an
executorch other than 1.5.1. The .pte is byte-identical (tests/test_executorch.py; SmolLM2
portable and fast checked by sha256).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

from export.targets.executorch.lean_lowering import supported


def _calls(gm) -> list:
    """The call targets of ``gm`` and its control-flow subgraphs."""
    import torch

    return [n.target for mod in gm.modules() if isinstance(mod, torch.fx.GraphModule)
            for n in mod.graph.nodes if n.op == "call_function"]


def _targets(gm) -> set:
    """The ops ``gm`` calls, as decomposition tables key them (an edge op by its ATen op)."""
    import torch

    return {t if isinstance(t, torch._ops.OpOverload) else getattr(t, "_op", t) for t in _calls(gm)}


def _sym_for_tensor(node) -> bool:
    """Does ``node`` pass a symbolic scalar (or a value of unknown type) to a Tensor argument of
    its op's schema, pairing arguments as ``pass_base.map_args`` does? Unknown schema: yes."""
    import torch

    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return isinstance(node.target, torch._ops.OpOverloadPacket)  # other targets never reach call_operator
    for i, arg in enumerate(schema.arguments):
        if arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif not arg.kwarg_only and i < len(node.args):
            value = node.args[i]
        else:
            continue
        if isinstance(arg.type, torch.TensorType) and isinstance(value, torch.fx.Node) and (
                "val" not in value.meta or isinstance(value.meta["val"], (torch.SymInt, torch.SymFloat, torch.SymBool))):
            return True
    return False


def _mixed_types(node) -> bool:
    """Would ``RemoveMixedTypeOperators`` cast an argument of ``node``? Its ``call_operator``
    acts on a binary op of its allow list (``add``/``mul``/``sub.Tensor``, ``div.Tensor(_mode)``,
    ``minimum``): every Tensor argument whose dtype is not the ops' promoted dtype
    (``elementwise_dtypes`` over all positional arguments) gets an ``_to_copy``. Read off the
    arguments' ``val``; a symbolic scalar, an argument without one, or a Node in ``kwargs``:
    yes."""
    import torch
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND as KIND, elementwise_dtypes

    aten = torch.ops.aten
    kinds = {aten.add.Tensor: KIND.DEFAULT, aten.mul.Tensor: KIND.DEFAULT, aten.sub.Tensor: KIND.DEFAULT,
             aten.div.Tensor: KIND.INT_TO_FLOAT, aten.div.Tensor_mode: KIND.DEFAULT, aten.minimum.default: KIND.DEFAULT}
    if node.target not in kinds or len(node.args) <= 1:
        return False
    kind = kinds[node.target]
    if node.target == aten.div.Tensor_mode and node.kwargs.get("rounding_mode") is None:
        kind = KIND.INT_TO_FLOAT
    if any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
        return True
    values = []
    for a in node.args:
        v = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if not isinstance(v, (torch.Tensor, bool, int, float)):  # SymInt/SymFloat/SymBool, None, lists: don't guess
            return True
        values.append(v)
    promoted = elementwise_dtypes(*values, type_promotion_kind=kind)[1]
    return any(isinstance(v, torch.Tensor) and v.dtype != promoted for v in values)


def _may_rewrite(p, gm) -> bool:
    """Can edge pass ``p`` (one that rewrites only inside its retrace, in ``call_operator``)
    change ``gm``? ``NormalizeTransposePass`` rewrites only ``aten.t``,
    ``ReplaceBrokenOpsWithFunctionalOpsPass`` only view ops (``is_view``), ``SymToTensorPass``
    only a SymInt/SymFloat/SymBool given to a Tensor argument, ``RemoveMixedTypeOperators`` only
    a binary op whose dtypes differ from the promoted one (``_mixed_types``); any other pass: yes."""
    import torch
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import (
        ReplaceBrokenOpsWithFunctionalOpsPass)
    from executorch.exir.passes.sym_to_tensor_pass import SymToTensorPass

    if type(p) is NormalizeTransposePass:
        return torch.ops.aten.t.default in _targets(gm)
    if type(p) is SymToTensorPass:
        return any(_sym_for_tensor(n) for mod in gm.modules() if isinstance(mod, torch.fx.GraphModule)
                   for n in mod.graph.nodes if n.op == "call_function")
    if type(p) is RemoveMixedTypeOperators:
        return any(_mixed_types(n) for mod in gm.modules() if isinstance(mod, torch.fx.GraphModule)
                   for n in mod.graph.nodes if n.op == "call_function")
    if type(p) is ReplaceBrokenOpsWithFunctionalOpsPass:  # call_operator sees OpOverload(Packet)s and edge ops
        from executorch.exir.dialects.edge._ops import EdgeOpOverload

        ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, EdgeOpOverload)
        return any(getattr(t, "is_view", True) for t in _calls(gm) if isinstance(t, ops))
    return True


def _same(f, g) -> bool:
    """The same decomposition. A table is rebuilt per call, with a fresh ``partial`` of a fresh
    closure-free local function per CompositeImplicitAutograd op: same code, no captured state,
    equal arguments is the same function."""
    if f is g:
        return True
    if isinstance(f, functools.partial) and isinstance(g, functools.partial):
        return _same(f.func, g.func) and f.args == g.args and f.keywords == g.keywords
    code = getattr(f, "__code__", None)
    return (code is not None and code is getattr(g, "__code__", None) and f.__closure__ is None
            and g.__closure__ is None and f.__defaults__ == g.__defaults__ and f.__globals__ is g.__globals__)


def _fixed_point(gm, table: dict, prev: dict) -> bool:
    """Would decomposing ``gm`` (the output of a decomposition with ``prev``) with ``table`` keep
    every op? Yes if each op of ``table`` in the graph was decomposed by the same function before."""
    return all(op in prev and _same(prev[op], table[op]) for op in _targets(gm) if op in table)


@contextlib.contextmanager
def lean_edge():
    """While active, the edge conversion's functionalizing ``run_decompositions({})`` is folded
    into the decomposition that follows it, and ``run_decompositions`` on an already decomposed
    program that the table cannot change (``_fixed_point``) returns the program itself instead
    of re-exporting it."""
    if not supported():
        yield False
        return

    from executorch.exir.pass_base import _ExportPassBase
    from torch.export.exported_program import ExportedProgram
    from torch.fx.passes.infra.pass_base import PassResult

    from executorch.exir.program import _program

    made = weakref.WeakKeyDictionary()  # program -> the table a run_decompositions in this context made it with
    pending = weakref.WeakSet()  # programs whose functionalizing run_decompositions({}) is deferred
    orig, orig_gen, orig_edge = (ExportedProgram.run_decompositions, _program._gen_edge_manager_for_partitioners,
                                 _program._generate_edge_program)
    deferring = [False]

    def run_decompositions(self, decomp_table=None, decompose_custom_triton_ops=False):
        if deferring[0] and decomp_table is not None and not decomp_table and not decompose_custom_triton_ops \
                and self not in made:
            pending.add(self)  # functionalized by the decomposition that follows (or _generate_edge_program)
            return self
        if self in pending:
            pending.discard(self)  # one retrace functionalizes and decomposes
        prev = made.get(self)
        if decomp_table is not None and prev is not None and not decompose_custom_triton_ops \
                and _fixed_point(self.graph_module, decomp_table, prev):
            return self  # functional already, and nothing the table could decompose: the retrace is a copy
        out = orig(self, decomp_table, decompose_custom_triton_ops)
        made[out] = dict(decomp_table) if decomp_table is not None else None
        return out

    orig_call = _ExportPassBase.call

    def call(self, graph_module):
        if not _may_rewrite(self, graph_module):
            return PassResult(graph_module, False)  # its retrace would rebuild the same graph
        return orig_call(self, graph_module)

    def gen_edge_manager_for_partitioners(partitioner, aten_programs, *args, **kwargs):
        # Defer only where a decomposition always follows: no partitioner of a method takes the
        # path that skips it when no table op is in the (then unfunctionalized) graph.
        deferring[0] = not any(_program._can_skip_using_EDGE_DO_NOT_DECOMP(p, ep)
                               for name, ep in aten_programs.items() for p in (partitioner or {}).get(name, []))
        try:
            return orig_gen(partitioner, aten_programs, *args, **kwargs)
        finally:
            deferring[0] = False

    def generate_edge_program(config, program, *args, **kwargs):
        if program in pending:  # no decomposition followed: functionalize as executorch would have
            pending.discard(program)
            program = orig(program, {})
        return orig_edge(config, program, *args, **kwargs)

    ExportedProgram.run_decompositions, _ExportPassBase.call = run_decompositions, call
    _program._gen_edge_manager_for_partitioners = gen_edge_manager_for_partitioners
    _program._generate_edge_program = generate_edge_program
    try:
        yield True
    finally:
        ExportedProgram.run_decompositions, _ExportPassBase.call = orig, orig_call
        _program._gen_edge_manager_for_partitioners, _program._generate_edge_program = orig_gen, orig_edge
