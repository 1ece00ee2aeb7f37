"""Core ML target: the decoder as an iOS 18 ML Program (``.mlpackage``); see ``lowering``."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.coreml import lowering


@register
class CoreML(Target):
    name = "coreml"
    flavours = lowering.FLAVOURS
    # Traced without weights, int4 codes swapped in before any fp16 copy, and (the run's last
    # consumer) each shared weight freed once the program holds it: the conversion holds the MIL
    # program's codes (1 B/param: coremltools' int4 is an int8 with metadata) plus, while the pass
    # runs, what is not yet swapped of the shared quantization (~0.6 B/param). Measured: the full
    # XGen-7B-8K (6.9B, default 8K cache) peaks at 11070 MiB = 11.6 GB (convert: the
    # read-back of _reconvert; it was 17.0 GB while the shared quantization stayed resident), i.e.
    # (11.6 - 0.6 base - 1.7 transient) / 6.9 = 1.35. The KV cache states (8 GiB there) are traced
    # from calloc'd zeros and declared, never written: not resident, so not counted.
    bytes_per_parameter = 1.4
    relative_cost = 1.6
    # int4 blockwise (block = the group) and int8 per row (block = the row): both one
    # constexpr_blockwise_shift_scale over the shared codes; float weights stay fp16 constants
    precisions = frozenset({"int4", "int8", "float"})

    def lower(self, job):
        return lowering.lower(job)
