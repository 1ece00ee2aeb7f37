"""Eager PyTorch as a Backend: the fp32 decoder or the int4 reference (dequantized weights).

This is the reference every artifact is measured against. ``reference_for(manifest)``
rebuilds exactly the model an artifact was exported from (same recipe, weights, capacity
and, for int4, the same shared quantization), from the shared core alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgellm.decoder import SDPA
from edgellm.config import ModelConfig
from edgellm.errors import EdgeLLMError
from edgellm.memory import available_bytes
from edgellm.model import LoadedModel, model_from_manifest, resolve_model
from edgellm.quant_store import quantize_loaded
from edgellm.quantization import (Quantization, apply_reference, resolve_activation_scheme,
                                  stream_reference)
from runtime.backend import Backend, BackendOptions, Capabilities, register


# An int4 reference whose fp32 copy would exceed this is kept at 4 bits and dequantized weight by
# weight as it is read (the same values, hence the same logits; slower per forward).
STREAM_FP32_ABOVE = 4 << 30

# PyTorch's CPU flash attention walks the keys in blocks of this many cache slots (or all of them
# when fewer); attention here is cut after the last block holding a visible slot.
KV_BLOCK = 512


class FilledBlocksSDPA(SDPA):
    """The decoder's attention over the whole masked cache, bit for bit, at the cost of the filled
    part: key blocks past the last visible slot are fully masked and add exact zeros in the kernel,
    so they are dropped, and K/V heads are shared in the kernel (``enable_gqa``) instead of
    copied by ``repeat_interleave``. At 2048 slots that was most of a decode step's time.
    (Cutting at the exact filled length would change the kernel's last block, hence its rounding;
    ``tests/test_runtime.py`` holds the equality.)"""

    def forward(self, q, k_all, v_all, mask, n, input_pos):
        T = q.shape[1]
        if n is not None:
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
        else:
            slots = k_all.shape[2]
            cut = min(slots, -(-(int(input_pos.max()) + 1) // KV_BLOCK) * KV_BLOCK)
            if cut < slots:
                k_all, v_all, mask = k_all[:, :, :cut], v_all[:, :, :cut], mask[..., :cut]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).reshape(1, T, -1)


def fast_attention(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every canonical ``SDPA`` of ``model`` becomes a ``FilledBlocksSDPA``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is SDPA:
                setattr(parent, name, FilledBlocksSDPA(child.n_heads, child.n_kv_heads, child.head_dim))
    return model


@register
class EagerBackend(Backend):
    kind = "eager"
    accepts = frozenset({"tokenizer", "threads", "max_seq_len", "seed", "n_layers"})

    def __init__(self, model, tokenizer, name: str = "eager", threads: int | None = None):
        self.model = fast_attention(model).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_seq_len = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self.windowed_from(model.config.to_dict())
        # runtime sets OMP_NUM_THREADS=1 for XNNPACK/ORT; eager PyTorch still uses every core.
        self.threads = threads or os.cpu_count() or 1
        self.pos = 0
        self.activation_scheme: str | None = None
        self.quantization: Quantization | None = None
        self.loaded: LoadedModel | None = None
        self.streamed = False  # int4 weights dequantized on every read (``stream_reference``)

    @torch.no_grad()
    def _forward(self, ids: list[int], start: int) -> np.ndarray:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        tokens = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start, start + len(ids), dtype=torch.long)
        return self.model(tokens, pos)[0].numpy()

    def _reset(self) -> None:
        self.model.reset_cache()

    @property
    def _max_chunk(self) -> int:
        return self.max_seq_len if self.ring is None else super()._max_chunk

    @contextmanager
    def perturbed(self, eps: float = 1e-7, seed: int = 0):
        """Within the block, every embedding output is multiplied by (1 + eps * N(0, 1)): a
        float-rounding-sized change. A reference carrying int8 dynamic activations flips some
        rounding decisions under it, and the flips cascade through the layers; how far the
        reference then moves from itself is the noise floor of any comparison against it."""
        g = torch.Generator().manual_seed(seed)
        handle = self.model.embed_tokens.register_forward_hook(
            lambda m, i, out: out * (1 + eps * torch.randn(out.shape, generator=g)))
        try:
            yield self
        finally:
            handle.remove()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(activation_scheme=self.activation_scheme, perturbation=True, threads=True,
                            whole_model_per_call=self.streamed)

    @classmethod
    def from_artifact(cls, directory, manifest, tokenizer, options):
        raise ValueError("eager PyTorch runs no artifact; use eager:RECIPE_OR_CHECKPOINT")

    @classmethod
    def from_loaded(cls, loaded, int4: bool = False, quantization=None, activations: bool | str = False,
                    tokenizer=None, threads: int | None = None) -> "EagerBackend":
        label = "fp32"
        quant = None
        model = None if int4 else loaded.decoder()
        streamed = int4 and 4 * loaded.config.num_parameters() > STREAM_FP32_ABOVE
        if int4:
            quant = quantization or quantize_loaded(loaded)
            if streamed:  # dequantize each weight as it is read
                model = stream_reference(loaded.decoder(skip=set(quant.weights)), quant, activations=activations)
            else:
                model = apply_reference(loaded.decoder(), quant, activations=activations)
            scheme = resolve_activation_scheme(activations)
            label = "int4" + (f"+{scheme}" if scheme else "")
        if tokenizer is None:
            tokenizer = loaded.tokenizer()
        backend = cls(model, tokenizer, name=f"eager:{loaded.recipe.name}:{label}", threads=threads)
        backend.quantization = quant  # reusable for a second reference (e.g. other activation arithmetic)
        backend.loaded = loaded  # likewise: its weights are only read
        backend.streamed = streamed
        backend.activation_scheme = resolve_activation_scheme(activations) if int4 else None
        return backend

    @classmethod
    def from_spec(cls, what: str | None, int4: bool = False, options: BackendOptions = BackendOptions()):
        checkpoint = recipe = None
        if what and (Path(what).is_dir() or what.endswith(".gguf")):
            checkpoint = what
        else:
            recipe = what
        loaded = resolve_model(checkpoint, recipe, max_seq_len=options.max_seq_len, seed=options.seed,
                               n_layers=options.n_layers)
        cache, free = loaded.config.kv_cache_bytes(), available_bytes()
        if free is not None and cache > free:
            raise EdgeLLMError(f"a KV cache of {loaded.config.max_seq_len} slots takes {cache / 2**30:.1f} GiB but "
                               f"{free / 2**30:.1f} GiB is available; lower --max-seq-len")
        return cls.from_loaded(loaded, int4=int4, tokenizer=options.tokenizer, threads=options.threads)

    @classmethod
    def reference_for(cls, manifest: dict[str, Any], int4: bool | None = None, loaded: LoadedModel | None = None,
                      **kw) -> "EagerBackend":
        """The eager model an artifact was exported from (``int4`` defaults to the artifact's;
        ``loaded``: that model already read, e.g. by a previous reference's ``.loaded``)."""
        loaded = loaded or model_from_manifest(manifest)
        cfg = ModelConfig.from_dict(manifest["config"])
        if cfg != loaded.config:  # the same weights with this artifact's cache (another dtype or window)
            loaded = LoadedModel(loaded.recipe, cfg, loaded.weights)
        recorded = manifest.get("quantization", {})
        if int4 is None:
            int4 = recorded.get("scheme", "none") != "none"
        if int4 and "quantization" not in kw:
            quant = quantize_loaded(loaded)
            digest = quant.summary().get("sha256")
            if recorded.get("sha256") and digest != recorded["sha256"]:
                raise ValueError(f"artifact {manifest.get('name')} carries a different int4 quantization than "
                                 f"this edgellm computes now (sha256 {recorded['sha256'][:12]} vs {digest[:12]}); "
                                 f"re-export it with this version")
            kw["quantization"] = quant
        return cls.from_loaded(loaded, int4=int4, **kw)

