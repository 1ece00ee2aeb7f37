"""ExecuTorch target: the decoder lowered to a ``.pte`` (see ``lowering`` for the flavours)."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.executorch import lowering


@register
class ExecuTorch(Target):
    name = "executorch"
    flavours = lowering.FLAVOURS
    # Traced without fp32 weights, the linears' int4/int8 codes as untouched placeholders unpacked only
    # while XNNPACK packs each (then the shared copy is freed on last use), the KV cache as
    # untouched zeros (ExecuTorch does not serialize a mutable buffer's initial state, so it is
    # never resident), the .pte streamed to its file: what stays resident is the shared
    # quantization and XNNPACK's packed weights. Measured at XGen-7B's width (8K cache): 2.51 GiB
    # at 2 layers, 2.90 GiB at 4, 8.78 GiB for the full 7B (1.03 bytes/parameter above the base
    # and the largest tensor's temporaries; README scale section).
    bytes_per_parameter = 1.1
    relative_cost = 2.8  # measured on SmolLM2: 183 s vs ONNX 65 s, Core ML 104 s
    # int4: 8da4w linears (XNNPACK qd8-f32-qb4w), embedding_4bit; int8: 8da8w linears
    # (qd8-f32-qc8w, one scale per row), embedding_byte; float: fp32
    precisions = frozenset({"int4", "int8", "float"})

    def lower(self, job):
        return lowering.lower(job)
