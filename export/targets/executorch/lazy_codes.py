"""Linear codes that exist one weight at a time, while XNNPACK packs them (executorch 1.5.1).

torchao's ``IntxUnpackedToInt8Tensor`` holds one byte per code (int4 or int8), and
torch.export, to_edge and the partitioner only need its shape and dtype: the values are first
read when XNNPACK's preprocess serializes a delegated weight
(``NodeVisitor.get_serialized_buffer_index`` -> ``get_param_tensor``), which packs int4 codes two
a byte into its named data and copies int8 codes as they are. So a linear's codes are traced as
``untouched_zeros`` (not resident) and ``LazyCodes`` hands the real codes (int4 unpacked from the
shared quantization, int8 its stored tensor itself) to that one read, then forgets them -- and,
releasing, the shared weight too. The codes XNNPACK stores are the same bytes as before, so is
the .pte.

A placeholder that no XNNPACK preprocess asked for would be serialized as zeros: ``check``
refuses that after lowering.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from edgellm.decoder import untouched_zeros


def check_codes(codes: torch.Tensor, qw, name: str = "") -> torch.Tensor:
    """``codes``, if they are int8 of ``qw``'s shape and in its range (int4 [-8, 7]; int8
    [-128, 127], any byte); a view into a larger storage is copied (XNNPACK serializes a
    weight's whole storage)."""
    where = f"{name}: " if name else ""
    if codes.dtype != torch.int8 or tuple(codes.shape) != tuple(qw.shape):
        raise ValueError(f"{where}int{qw.bits} codes must be int8 {tuple(qw.shape)}, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    lo, hi = qw.quant_range
    if qw.bits == 4 and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"{where}int4 codes outside [{lo}, {hi}] (got [{int(codes.min())}, {int(codes.max())}])")
    if not codes.is_contiguous() or codes.storage_offset() or codes.untyped_storage().nbytes() != codes.numel():
        codes = codes.clone(memory_format=torch.contiguous_format)
    return codes


class LazyCodes:
    """Placeholder storages -> the quantized weights whose codes they stand for."""

    def __init__(self, release: bool = False):
        self.release = release  # free each shared weight once packed (this run's last consumer)
        self._pending: dict[int, tuple[str, object, torch.Tensor]] = {}
        self.packed = 0
        self.on_packed = None  # progress: on_packed(packed, total), a long 7B lowering shows where it is

    def placeholder(self, name: str, qw) -> torch.Tensor:
        t = untouched_zeros(qw.shape, torch.int8)
        self._pending[t.untyped_storage().data_ptr()] = (name, qw, t)  # held: the address stays its own
        return t

    def resolve(self, t):
        """``t`` itself, or, if it is a placeholder, its weight's codes (once)."""
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.device.type != "cpu" or not t.numel():
            return t
        entry = self._pending.pop(t.untyped_storage().data_ptr(), None)
        if entry is None:
            return t
        name, qw, _ = entry
        codes = check_codes(qw.codes, qw, name)
        if self.release:
            qw.release()
        self.packed += 1
        if self.on_packed is not None:
            self.on_packed(self.packed, self.packed + len(self._pending))
        return codes

    def check(self) -> None:
        if self._pending:
            names = sorted(n for n, _, _ in self._pending.values())
            raise RuntimeError(f"executorch: {len(names)} quantized weights were not packed by XNNPACK (e.g. {names[:3]}); "
                               "their placeholder codes would be serialized as zeros")

    @contextlib.contextmanager
    def reading(self):
        """While active, XNNPACK's constant reads resolve placeholders."""
        from executorch.backends.xnnpack.operators import node_visitor

        orig = node_visitor.get_param_tensor
        node_visitor.get_param_tensor = lambda ep, node: self.resolve(orig(ep, node))
        try:
            yield self
        finally:
            node_visitor.get_param_tensor = orig


@contextlib.contextmanager
def constants_shared_with_preprocess():
    """While active, the copy of each partition that ``to_backend`` hands XNNPACK's preprocess
    shares the partition's constant tensors instead of deep-copying them.

    ``lower_all_submodules_to_backend`` copies every partition's program before the first
    preprocess runs (``BackendDetails.copy_exported_program_for_preprocess``, a deepcopy "in
    case backends change graph inside preprocess") and keeps the copies until the last one is
    done: every delegated constant twice at once (a 7B's int8 codes: 6.9 GB more; placeholders
    would be written out in full). Preprocess may rewrite the copy's graph and tables, which stay
    copies; it reads the tensors (packing, casting) into new ones and writes none of them.
    """
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_for_preprocess(cls, edge_program, compile_specs):
        memo = {id(v): v for table in (edge_program.state_dict, edge_program.constants)
                for v in table.values() if isinstance(v, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    had = "copy_exported_program_for_preprocess" in XnnpackBackend.__dict__
    orig = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_for_preprocess)
    try:
        yield
    finally:
        if had:
            XnnpackBackend.copy_exported_program_for_preprocess = orig
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess
