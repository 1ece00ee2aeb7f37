"""ONNX target: the decoder traced once to ONNX and rewritten for ONNX Runtime; see ``lowering``."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.onnx import lowering


@register
class Onnx(Target):
    name = "onnx"
    flavours = lowering.FLAVOURS

    def lower(self, job):
        return lowering.lower(job)
