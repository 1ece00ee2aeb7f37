"""One export run: load once, quantize once, lower to each requested target.

A target is a module ``export.to_<target>`` with ``lower(job: ExportJob) -> Path``; it traces
``job.decoder(options)`` (the one decoder), consumes ``job.quant`` (the one quantization) and
writes its files through ``job.writer(...)`` (the one artifact contract). A target whose
module is missing is reported as unavailable, never faked.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from export.decoder import Decoder, DecoderOptions
from export.loading import LoadedModel
from export.rope import frozen_note
from runtime.artifact import ArtifactWriter, artifact_name

TARGET_MODULES = {"executorch": "export.to_executorch", "onnx": "export.to_onnx", "coreml": "export.to_coreml"}


class TargetUnavailable(RuntimeError):
    pass


def target_module(target: str):
    if target not in TARGET_MODULES:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGET_MODULES)}, all")
    try:
        return importlib.import_module(TARGET_MODULES[target])
    except ModuleNotFoundError as e:
        if e.name == TARGET_MODULES[target]:
            raise TargetUnavailable(f"target {target} is not built in this edgellm version") from None
        raise


def available_targets() -> list[str]:
    out = []
    for t in TARGET_MODULES:
        try:
            target_module(t)
            out.append(t)
        except TargetUnavailable:
            pass
    return out


@dataclass
class ExportJob:
    loaded: LoadedModel
    quant: Any | None  # export.quantize.Quantization, or None for fp32
    out_root: Path
    target: str
    variant: str | None = None  # target-specific flavour, e.g. ExecuTorch "portable" / "fast"
    progress: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quant_name(self) -> str:
        return "int4" if self.quant is not None else "fp32"

    @property
    def name(self) -> str:
        q = self.quant_name + (f"-{self.variant}" if self.variant else "")
        return artifact_name(self.loaded.recipe.name, self.target, q)

    def decoder(self, options: DecoderOptions | None = None, quantized_reference: bool = False) -> Decoder:
        """The decoder with fp32 weights, or (``quantized_reference``) the dequantized int4 ones."""
        model = self.loaded.decoder(options)
        if quantized_reference and self.quant is not None:
            from export.quantize import apply_reference

            apply_reference(model, self.quant)
        return model

    def writer(self) -> ArtifactWriter:
        return ArtifactWriter(self.out_root / self.name)

    def manifest(self, artifact_file: str, options: DecoderOptions | None = None, **extra) -> dict[str, Any]:
        rec, cfg = self.loaded.recipe, self.loaded.config
        m = {
            "name": self.name, "target": self.target, "variant": self.variant, "artifact": artifact_file,
            "recipe": rec.to_dict(), "config": cfg.to_dict(), "weights": self.loaded.weights,
            "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
            "bos_id": rec.bos_id, "eos_ids": rec.eos_ids, "chat_template": rec.chat_template,
            "quantization": self.quant.summary() if self.quant is not None else {"scheme": "none"},
            "decoder_options": options.to_dict() if options is not None else None,
        }
        note = frozen_note(cfg.rope, cfg.max_seq_len)
        if note:
            m["rope_note"] = note
        m.update(extra)
        return m

    def write_tokenizer(self, writer: ArtifactWriter) -> None:
        self.loaded.tokenizer().save(writer.dir)


def quantize_for(loaded: LoadedModel, scheme: str | None = None, progress=print):
    """The shared quantization of ``loaded`` per its recipe (``scheme`` overrides: int4/none)."""
    qcfg = loaded.recipe.quantization
    scheme = scheme or qcfg.scheme
    if scheme == "none":
        return None
    from export.quantize import quantize

    t = time.time()
    q = quantize(loaded.state, qcfg, tied=loaded.config.tie_embeddings)
    progress(f"quantized {len(q.weights)} tensors to int4 (group {qcfg.group_size}) in {time.time() - t:.1f}s")
    return q


def run_export(targets: list[str] | str, recipe=None, checkpoint=None, *, quant: str | None = None,
               max_seq_len: int | None = None, out: str | Path = "out", variant: str | None = None,
               seed: int = 0, n_layers: int | None = None, progress=print, loaded: LoadedModel | None = None,
               quantization=None) -> dict[str, Path]:
    """Export to each target from one load and one quantization; returns {target: artifact dir}.

    ``loaded``/``quantization`` let callers (tests, benches) reuse an already computed model
    and quantization instead of recomputing them.
    """
    from export.loading import resolve_model

    targets = [targets] if isinstance(targets, str) else list(targets)
    modules = {t: target_module(t) for t in targets}  # fail fast on unavailable targets
    if loaded is None:
        t = time.time()
        loaded = resolve_model(checkpoint, recipe, max_seq_len=max_seq_len, seed=seed, n_layers=n_layers)
        progress(f"loaded {loaded.recipe.name} ({loaded.weights}) in {time.time() - t:.1f}s")
    if quantization is None:
        quantization = quantize_for(loaded, quant, progress)
    elif quant == "none":
        quantization = None
    results = {}
    for target, mod in modules.items():
        t = time.time()
        job = ExportJob(loaded, quantization, Path(out), target, variant, progress)
        results[target] = mod.lower(job)
        progress(f"{target}: wrote {results[target]} in {time.time() - t:.1f}s")
    return results
