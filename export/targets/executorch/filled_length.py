"""Let XNNPACK take attention over the filled cache slots, whose count is known only at run time.

The portable flavour attends to slots ``0..n-1`` with ``n = input_pos[-1] + 1`` read in the graph
(``export.transforms.mask_filled_from_positions``): TextLLMRunner calls ``forward(tokens,
input_pos)`` only, so no input's shape carries the filled length and ``n`` is a data-dependent
("unbacked") size, checked ``1 <= n <= capacity``. XNNPACK's partitioner (executorch 1.5.1,
``XNNPartitionerConfig._check_node_has_valid_dtype``) refuses any tensor with an unbacked size,
because XNNPACK cannot take an empty tensor and an unbacked size might be 0. Left outside, the
attention ran in single-threaded portable kernels; over the whole capacity instead, it read every
slot at every step (SmolLM2 at 2048 slots: 18.9 ms per token against 7.5 ms for ``fast``).

``xnnpack_takes_filled_lengths()`` narrows that refusal, for the context only, to the case it
exists for: a tensor is still refused when its element count is not provably non-zero from the
sizes' ranges (``statically_known_true(numel > 0)``). The delegate then sizes the attention from
the actual tensors at each call; the serialized dims are the upper bounds (capacity), as for the
query length. The slices of the cache stay outside (XNNPACK takes no run-time scalar).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def xnnpack_takes_filled_lengths():
    import executorch.backends.xnnpack.partition.config.xnnpack_config as config
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    refuses = config.has_free_unbacked_symbols

    def may_be_empty(value) -> bool:
        return refuses(value) and not statically_known_true(value.numel() > 0)

    config.has_free_unbacked_symbols = may_be_empty
    try:
        yield
    finally:
        config.has_free_unbacked_symbols = refuses
