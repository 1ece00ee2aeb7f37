"""ONNX target: the decoder traced once to ONNX and rewritten for ONNX Runtime; see ``lowering``."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.onnx import lowering


@register
class Onnx(Target):
    name = "onnx"
    flavours = lowering.FLAVOURS
    # traced without weights: XGen-7B width at 2 layers (0.82B parameters) peaked at 4.68 GB
    bytes_per_parameter = 1.2  # traced without weights: XGen-7B peaks at 10.2 GB (README scale section)
    relative_cost = 1.0
    # int8: MatMulNBits / GatherBlockQuantized bits=8 (lowering module docstring)
    precisions = frozenset({"int4", "int8", "float"})

    def lower(self, job):
        return lowering.lower(job)
