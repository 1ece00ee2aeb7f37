"""Core ML target: the decoder as an iOS 18 ML Program (``.mlpackage``); see ``lowering``."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.coreml import lowering


@register
class CoreML(Target):
    name = "coreml"
    flavours = lowering.FLAVOURS
    # Traced without weights, int4 codes swapped in before any fp16 copy: the conversion holds the
    # shared quantization (~0.6 B/param) and the MIL program's codes (1 B/param: coremltools' int4
    # is an int8 with metadata). Measured: XGen-7B width at 2 layers peaks at 3.2 GB (the shared
    # load+quantize stage; conversion 2.7 GB).
    bytes_per_parameter = 2.0
    holds_cache = True

    def lower(self, job):
        return lowering.lower(job)
