"""ExecuTorch target: the decoder lowered to a ``.pte`` (see ``lowering`` for the flavours)."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.executorch import lowering


@register
class ExecuTorch(Target):
    name = "executorch"
    flavours = lowering.FLAVOURS
    # Traced without fp32 weights, but the program holds the int4 codes one per byte (torchao's
    # IntxUnpackedToInt8Tensor, what XNNPACK consumes) beside the shared quantization, and
    # lowering adds XNNPACK's packed copies and the .pte buffer: 4.6 GB for XGen-7B's width at
    # 2 layers; the full XGen-7B was killed at 23.8 GB (README scale section).
    bytes_per_parameter = 3.5
    holds_cache = True

    def lower(self, job):
        return lowering.lower(job)
