"""ExecuTorch target: the decoder lowered to a ``.pte`` (see ``lowering`` for the flavours)."""

from __future__ import annotations

from export.targets import Target, register
from export.targets.executorch import lowering


@register
class ExecuTorch(Target):
    name = "executorch"
    flavours = lowering.FLAVOURS
    bytes_per_parameter = 12.0  # the fp32 decoder is traced and lowered (see the README's scale section)

    def lower(self, job):
        return lowering.lower(job)
