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
    # program's codes (1 B/param: coremltools' int4 is an int8 with metadata), and its KV cache
    # states in fp16. Fitted to two full-size runs (README scale section): XGen-7B-8K with its 8K
    # cache peaked at 11070 MiB (0.6 GB base + 6.9B x 1.0 + 4.3 GB fp16 states = 11.8 GB) and
    # XVERSE-13B at 2048 slots at 14.31 GiB (0.6 + 13.7B x 1.0 + 0.8 = 15.2 GB); the 4B mobile
    # configuration at 2048 at 4.48 GiB (0.6 + 3.7B x 1.07 + 0.3 = 4.8 GB). 1.07 covers all three.
    bytes_per_parameter = 1.07
    transient_bytes_per_element = 0.0  # inside the per-parameter figure: no tensor is held in fp32
    relative_cost = 1.6
    # int4 blockwise (block = the group) and int8 per row (block = the row): both one
    # constexpr_blockwise_shift_scale over the shared codes; float weights stay fp16 constants
    precisions = frozenset({"int4", "int8", "float"})

    def resident_cache_bytes(self, cfg) -> int:
        return cfg.kv_cache_bytes("fp16") if cfg.kv_cache.dtype == "fp32" else cfg.kv_cache_bytes()

    def lower(self, job):
        return lowering.lower(job)
