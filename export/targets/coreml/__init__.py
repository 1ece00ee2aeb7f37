"""Core ML target: the decoder as an iOS 18 ML Program (``.mlpackage``); see ``lowering``."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.coreml import lowering


@register
class CoreML(Target):
    name = "coreml"
    flavours = lowering.FLAVOURS
    bytes_per_parameter = 12.0  # fp32 decoder traced, fp16 program converted (see the README's scale section)

    def lower(self, job):
        return lowering.lower(job)
