"""One export run: load once, quantize once, lower to each requested target.

A target (``export.targets``) traces ``job.decoder(flavour)`` -- the one decoder with the
flavour's source transforms applied -- consumes ``job.quant`` (the one quantization) and
writes its files through ``job.writer()`` (the one artifact contract).
"""

from __future__ import annotations

import math
import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from edgellm import checks
from edgellm.artifact import ArtifactWriter, artifact_name
from edgellm.decoder import Decoder, buffer_source
from edgellm.errors import EdgeLLMError
from edgellm.memory import available_bytes, peak_rss_mb, reset_peak_rss
from edgellm.model import LoadedModel, resolve_model
from edgellm.quant_store import quantize_loaded
from edgellm.quantization import Quantization, apply_reference, precision_of
from edgellm.rope import frozen_note
from edgellm.workers import cores, run_jobs
from export import targets as target_registry
from export import transforms
from export.targets import Flavour, Target


@dataclass
class ExportJob:
    loaded: LoadedModel
    quant: Quantization | None  # None = fp32
    out_root: Path
    target: Target
    flavour_name: str | None = None  # as asked for (None = the target's default; not in the folder name)
    progress: Callable[[str], None] = print
    # wall time and peak RSS per stage (shared stages such as load+quantize first), for the manifest
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    # the run's last use of a quantization it made itself: the target may free each quantized
    # weight once it holds its own form of it (QuantizedWeight.release)
    last_use: bool = False

    @contextmanager
    def stage(self, name: str):
        """Time one stage of this export and take its own peak RSS (see ``edgellm.memory``)."""
        with measured_stage(f"{self.target.name}: {name}", self.progress) as record:
            yield
        self.stages[name] = record

    @property
    def flavour(self) -> Flavour:
        return self.target.flavour(self.flavour_name)

    @property
    def quant_name(self) -> str:
        return "int4" if self.quant is not None else "fp32"

    @property
    def name(self) -> str:
        q = self.quant_name + (f"-{self.flavour_name}" if self.flavour_name else "")
        return artifact_name(self.loaded.recipe.name, self.target.name, q + kv_suffix(self.loaded.config.kv_cache))

    def decoder(self, quantized_reference: bool = False, meta: bool = False) -> Decoder:
        """The decoder in this flavour's formulation, with fp32 weights, (``quantized_reference``)
        the dequantized int4 ones, or (``meta``) none: on the meta device, to trace without weights."""
        if meta:
            with torch.device("meta"):
                return transforms.apply(Decoder(self.loaded.config), list(self.flavour.transforms))
        model = self.loaded.decoder()
        if quantized_reference and self.quant is not None:
            apply_reference(model, self.quant)
        return transforms.apply(model, list(self.flavour.transforms))

    def tensor_source(self) -> Callable[[str], torch.Tensor | None]:
        """state-dict name -> its value, for a decoder traced without weights (``decoder(meta=True)``):
        a weight is read from the checkpoint when asked for (fp32, one at a time), a weight the
        shared quantization replaces gives None, and a buffer (RoPE tables, mask positions, cache)
        comes from a one-layer, two-row-vocabulary decoder that has the same buffers as the full one."""
        weights = self.loaded.weights
        quantized = set(self.quant.weights) if self.quant is not None else set()
        buffers = buffer_source(self.loaded.config, lambda m: transforms.apply(m, list(self.flavour.transforms)))

        def value(name: str) -> torch.Tensor | None:
            if name in quantized:
                return None
            if name in weights:
                return weights[name].float()
            try:
                return buffers(name)
            except KeyError:
                raise RuntimeError(f"{self.target.name}: traced tensor {name!r} is neither a weight nor a buffer") from None

        return value

    def writer(self) -> ArtifactWriter:
        return ArtifactWriter(self.out_root / self.name)

    def manifest(self, artifact_file: str, transforms: list[dict], **extra) -> dict[str, Any]:
        rec, cfg = self.loaded.recipe, self.loaded.config
        m = {
            "name": self.name, "target": self.target.name, "flavour": self.flavour.name, "artifact": artifact_file,
            "recipe": rec.to_dict(), "config": cfg.to_dict(), "weights": self.loaded.origin,
            "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
            "bos_id": rec.bos_id, "eos_ids": rec.eos_ids, "chat_template": rec.chat_template,
            "quantization": self.quant.summary() if self.quant is not None else {"scheme": "none"},
            "transforms": list(transforms),
            "export": {"stages": dict(self.stages), "seconds": round(sum(v["seconds"] for v in self.stages.values()), 2),
                       "peak_rss_mb": max((v["peak_rss_mb"] for v in self.stages.values()), default=None)},
        }
        m["kv_cache"] = {**cfg.kv_cache.to_dict(), "slots": cfg.max_seq_len, "bytes": cfg.kv_cache_bytes()}
        note = frozen_note(cfg.rope, cfg.max_seq_len)
        if note:
            m["rope_note"] = note
        m.update(extra)
        return m

    def write_tokenizer(self, writer: ArtifactWriter):
        tok = self.loaded.tokenizer()
        tok.save(writer.dir)
        return tok


@contextmanager
def measured_stage(label: str, progress=print):
    """Yields a dict that, when the block ends, holds its wall seconds and peak RSS (MB)."""
    record: dict[str, float] = {}
    status = getattr(progress, "status", None)  # a live display shows the stage while it runs
    if status is not None:
        status(f"{label} …")
    reset_peak_rss()
    t = time.time()
    yield record
    record.update(seconds=round(time.time() - t, 2), peak_rss_mb=round(peak_rss_mb(), 1))
    progress(f"{label}: {record['seconds']:.1f}s, peak RSS {record['peak_rss_mb']:.0f} MB")


def quantize_for(loaded: LoadedModel, scheme: str | None = None, progress=print) -> Quantization | None:
    """The shared quantization of ``loaded`` per its recipe (``scheme`` overrides: int4/none)."""
    qcfg = loaded.recipe.quantization
    scheme = scheme or qcfg.scheme
    if scheme == "none":
        return None
    t = time.time()
    tenth = [0]

    show = getattr(progress, "status", progress)  # a live display's line, else a line per tenth

    def report(done: int, total: int):  # a 7B takes minutes
        if total >= 20 and done * 10 // total > tenth[0]:
            tenth[0] = done * 10 // total
            show(f"quantizing: {done}/{total} tensors, {time.time() - t:.0f}s")

    q = quantize_loaded(loaded, progress=report, note=progress)
    kinds = {}
    for _, qw in q.unique():
        kinds[qw.bits] = kinds.get(qw.bits, 0) + 1
    what = ", ".join(f"{n} int4 (group {qcfg.group_size})" if bits == 4 else f"{n} int8 (per row)"
                     for bits, n in sorted(kinds.items()))
    progress(f"quantized {len(q.unique())} tensors ({qcfg.method}) in {time.time() - t:.1f}s: {what}")
    return q


# The estimate of an export's peak: ~0.6 GB of libraries, each target's measured resident bytes
# per parameter (``Target.bytes_per_parameter``, from 7B and 13B runs: see the README's scale
# section), the temporaries of quantizing and writing the largest tensor
# (``Target.transient_bytes_per_element``) and the KV cache where the program holds it as its
# state (``Target.resident_cache_bytes``: Core ML; the others trace calloc'd zeros they never write).
EXPORT_BASE_BYTES = 600 << 20


def kv_suffix(spec) -> str:
    """The artifact name's mark of a KV cache other than the plain fp32 one: -kvint8, -w512s4."""
    return (f"-kv{spec.dtype}" if spec.dtype != "fp32" else "") + \
        (f"-w{spec.window}s{spec.sinks}" if spec.window is not None else "")


class MemoryRefused(EdgeLLMError):
    """The export's estimated peak exceeds the memory this machine has available."""


def estimated_peak_bytes(cfg, target: Target) -> int:
    largest = max(cfg.vocab_size * cfg.dim, cfg.dim * cfg.hidden_dim, cfg.n_heads * cfg.head_dim * cfg.dim)
    return int(EXPORT_BASE_BYTES + target.bytes_per_parameter * cfg.num_parameters()
               + target.transient_bytes_per_element * largest + target.resident_cache_bytes(cfg))


def estimated_artifact_bytes(loaded: LoadedModel, quantized: bool = True) -> int:
    """Disk an artifact takes, per tensor at its precision: int4 0.5 bytes a weight plus an fp32
    scale a group (ONNX's form, the largest; measured 4.31 GB for XGen-7B's .onnx, 0.64 B/param),
    int8 1 byte plus the same, float 4 (a tied head once), plus the tokenizer files."""
    qcfg, tied = loaded.recipe.quantization, loaded.config.tie_embeddings
    per_weight = {"int4": 0.5 + 4 / qcfg.group_size, "int8": 1 + 4 / qcfg.group_size, "float": 4.0}
    total = 0.0
    for name, shape in loaded.weights.shapes.items():
        if tied and name == "lm_head.weight":
            continue
        total += math.prod(shape) * (per_weight[precision_of(name, qcfg, tied)] if quantized else 4.0)
    return int(total) + (16 << 20)


def check_memory(loaded: LoadedModel, chosen: list[Target], available: int | None = None) -> None:
    """Refuse up front an export that would not fit, naming the numbers and a depth that would."""
    available = available_bytes() if available is None else available
    cfg = loaded.config
    worst = max(chosen, key=lambda t: estimated_peak_bytes(cfg, t))
    need = estimated_peak_bytes(cfg, worst)
    if available is None or need <= available:
        return
    one, two = (estimated_peak_bytes(replace(cfg, n_layers=n), worst) for n in (1, 2))  # linear in depth
    per_layer = max(two - one, 1)
    fits = max(0, (available - (one - per_layer)) // per_layer)
    hint = (f"--n-layers {min(fits, cfg.n_layers - 1)} would fit (a depth-truncated dry run)" if fits >= 1
            else "no depth of this width fits")
    held = worst.resident_cache_bytes(cfg)
    cache = f" plus its KV cache state of {held / 2**30:.1f} GiB, which --max-seq-len shrinks" if held else ""
    raise MemoryRefused(
        f"{loaded.recipe.name}: exporting {cfg.num_parameters() / 1e9:.2f}B parameters to {worst.name} needs an "
        f"estimated {need / 2**30:.1f} GiB ({worst.bytes_per_parameter:g} bytes/parameter{cache}) but "
        f"{available / 2**30:.1f} GiB is available; {hint}, or pass --skip-memory-check to try anyway")


def _precisions(qcfg) -> set[str]:
    """Every precision a quantization config can give a tensor."""
    return {qcfg.linears, qcfg.embedding, qcfg.head_precision, *qcfg.overrides.values()}


def resolve_targets(names: list[str] | str, loaded: LoadedModel | None = None) -> list[Target]:
    """Targets by name; ``all`` = the recipe's ``targets`` (every registered target if it names none)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise EdgeLLMError(f"targets must be target names ({', '.join(target_registry.names())} or all), "
                           f"got {names!r}")
    if names == ["all"]:
        names = (loaded.recipe.targets if loaded is not None and loaded.recipe.targets else None) \
            or target_registry.names()
    return [target_registry.get(n) for n in names]


def run_export(targets: list[str] | str, recipe=None, checkpoint=None, *, quant: str | None = None,
               max_seq_len: int | None = None, out: str | Path = "out", flavour: str | None = None,
               seed: int = 0, n_layers: int | None = None, progress=print, loaded: LoadedModel | None = None,
               quantization: Quantization | None = None, memory_check: bool = True,
               jobs: int | None = None, kv_cache: dict[str, Any] | None = None) -> dict[str, Path]:
    """Export to each target from one load and one quantization; returns {target: artifact dir}.

    ``loaded``/``quantization`` let callers (tests, benches) reuse an already computed model
    and quantization instead of recomputing them. ``jobs``: targets lowered at once, each in a
    worker process (None = as many as idle cores and memory allow, see ``export_workers``);
    only when this call resolves the model itself, so a worker can resolve it again.
    ``kv_cache``: keys of ``KVCacheConfig`` over the recipe's (``edgellm.model.kv_cache_config``).
    """
    shared: dict[str, dict[str, float]] = {}
    # Everything that can be wrong with the request is found before any heavy work.
    if quant not in (None, "int4", "none"):
        raise EdgeLLMError(f"quant {quant!r} is not supported; use int4 or none")
    resolve_targets(targets)
    checks.output_dir(out)
    if jobs is not None:
        checks.integer(jobs, "--jobs", 1, 64, fix="targets lowered at once, each in its own process")
    request = None
    if loaded is None:
        request = dict(checkpoint=checkpoint, recipe=recipe, max_seq_len=max_seq_len, seed=seed, n_layers=n_layers,
                       kv_cache=kv_cache)
        loaded = resolve_model(**request)
        progress(f"{loaded.recipe.name}: weights from {loaded.origin}")
    chosen = resolve_targets(targets, loaded)
    asked = _precisions(loaded.recipe.quantization) if quant != "none" else set()
    for t in chosen:
        refused = t.flavour(flavour).kv_refusal(loaded.config.kv_cache)
        if refused:
            able = [f"{o.name} --flavour {f.name}" for o in map(target_registry.get, target_registry.names()) for f in o.flavours
                    if f.kv_refusal(loaded.config.kv_cache) is None]
            raise EdgeLLMError(f"target {t.name} (flavour {t.flavour(flavour).name}) cannot carry {refused}; "
                               f"targets that can: {', '.join(able) or 'none'}")
        missing = sorted(asked - t.precisions)
        if missing:
            raise EdgeLLMError(f"target {t.name} cannot carry {', '.join(missing)} weights (it carries "
                               f"{', '.join(sorted(t.precisions))}); change quantization in the recipe or "
                               f"choose another target")
    if memory_check:
        check_memory(loaded, chosen)
    loaded.tokenizer()  # resolved (and checked against the vocabulary) now, written with each artifact
    checks.output_dir(out, need_bytes=sum(estimated_artifact_bytes(loaded, quant != "none") for _ in chosen))
    owned = False
    if quant == "none":
        quantization = None
    elif quantization is None:
        with measured_stage("load+quantize", progress) as shared["load+quantize"]:
            quantization = quantize_for(loaded, quant, progress)
        owned = True
    workers = export_workers(jobs, loaded, chosen, quantization) if request is not None else 1
    if workers > 1:
        progress(f"lowering {len(chosen)} targets in {workers} worker processes")
        data = pickle.dumps(quantization, protocol=pickle.HIGHEST_PROTOCOL)
        order = sorted(chosen, key=lambda t: -t.relative_cost)  # the longest first
        root = Path(out)
        made = [p for p in (root, *root.parents) if not p.exists()]  # made here, so removed here on failure
        root.mkdir(parents=True, exist_ok=True)
        try:
            paths = run_jobs(_lower_in_worker, [(request, t.name, flavour, str(out), data, shared) for t in order],
                             workers, progress)
        except BaseException:
            for p in made:  # innermost first, once each worker has removed its own temp folder
                try:
                    p.rmdir()
                except OSError:
                    break
            raise
        done = dict(zip((t.name for t in order), paths))
        return {t.name: done[t.name] for t in chosen}
    results = {}
    for i, target in enumerate(chosen):
        results[target.name] = _lower(ExportJob(loaded, quantization, Path(out), target, flavour, progress,
                                                stages=dict(shared), last_use=owned and i == len(chosen) - 1))
    return results


def _lower(job: ExportJob) -> Path:
    t = time.time()
    path = job.target.lower(job)
    job.progress(f"{job.target.name}: wrote {path} in {time.time() - t:.1f}s")
    return path


def _lower_in_worker(request: dict, target: str, flavour: str | None, out: str, quantization: bytes,
                     shared: dict, progress) -> Path:
    """One target in a worker process (``edgellm.workers``): the model re-resolved lazily from the
    same request, the parent's quantization unpickled (bit for bit the one computed once)."""
    loaded = resolve_model(**request)
    quant = pickle.loads(quantization)
    return _lower(ExportJob(loaded, quant, Path(out), target_registry.get(target), flavour, progress,
                            stages=dict(shared), last_use=quant is not None))


def export_workers(jobs: int | None, loaded: LoadedModel, chosen: list[Target],
                   quantization: Quantization | None, available: int | None = None) -> int:
    """How many targets to lower at once: ``jobs`` if given, else one per idle core, as many as
    the machine's memory holds side by side (each worker has its own copy of the quantization);
    1 = in this process, one after the other (what a 7B gets on a 24 GiB machine)."""
    if jobs is not None:
        return max(1, min(jobs, len(chosen)))
    n = min(len(chosen), cores())
    if n < 2:
        return 1
    available = available_bytes() if available is None else available
    if available is None:
        return 1
    quant_bytes = quantization.summary()["bytes"] if quantization is not None else 0
    peaks = sorted((estimated_peak_bytes(loaded.config, t) + quant_bytes for t in chosen), reverse=True)
    while n > 1 and sum(peaks[:n]) > 0.8 * available:
        n -= 1
    return n
