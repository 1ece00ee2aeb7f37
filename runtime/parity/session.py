"""A parity run over several SPECs: load them, build each eager reference once per activation
arithmetic, run the harness -- in this process, or with the SPECs split over worker processes
(``edgellm.workers``) when cores and memory allow, since each reference group is an
independent, single-threaded decode loop.
"""

from __future__ import annotations

import json
from typing import Any

from edgellm.artifact import dir_size, read_manifest
from edgellm.config import ModelConfig
from edgellm.memory import available_bytes
from edgellm.workers import cores, run_jobs
from runtime.backend import load, spec_class
from runtime.backends.eager import EagerBackend
from runtime.parity.harness import ParityReport, run_parity

# Relative parity cost per target (SmolLM2, measured): Core ML's interpreter is the slowest
# to load and run, ExecuTorch's int8-activation reference needs a noise floor, ONNX is quick.
_COST = {"coreml": 3.0, "executorch": 2.0, "onnx": 1.0}


def is_eager(spec: str) -> bool:
    return spec == "eager" or spec.startswith("eager:")


def compare(specs: list[str], reference: str | None = None, *, threads: int | None = None, steps: int = 32,
            text: str | None = None, text_tokens: int = 512, accuracy_level: int | None = None,
            progress=print) -> list[ParityReport]:
    """One report per reference: ``reference`` for every SPEC if given, else for each activation
    arithmetic among the artifacts the eager model carrying it (rebuilt from the first manifest;
    one alive at a time, each an fp32 copy of the model, the checkpoint read once).
    ``accuracy_level`` is given to the SPECs whose backend takes one (ONNX); at 0 their
    arithmetic is exact, so their reference is the weight-only one."""
    status = getattr(progress, "status", progress)
    opts = {"threads": threads} if threads is not None else {}
    candidates = {}
    for s in specs:
        status(f"loading {s}")
        level = {"accuracy_level": accuracy_level} \
            if accuracy_level is not None and "accuracy_level" in spec_class(s).accepts else {}
        candidates[s] = load(s, **opts, **level)
    manifests = [read_manifest(s, verify=False) for s in specs if not is_eager(s)]
    if reference is not None:
        groups = {None: candidates}
    else:
        groups: dict[Any, dict] = {}
        for s, be in candidates.items():  # the reference computes with the artifact's cache arithmetic too
            kv = json.dumps((read_manifest(s, verify=False).get("config") or {}).get("kv_cache"), sort_keys=True) \
                if not is_eager(s) else None
            groups.setdefault((be.capabilities.activation_scheme, kv), {})[s] = be
    shared: dict = {}
    reports = []
    for key, group in groups.items():
        scheme = key[0] if key is not None else None
        first = next((read_manifest(s, verify=False) for s in group if not is_eager(s)), manifests[0] if manifests else None)
        if reference is not None:
            status(f"loading reference {reference}")
            ref = load(reference, **opts)
        else:
            status(f"rebuilding the eager reference ({scheme or 'no activation quantization'}) from the manifest")
            ref = EagerBackend.reference_for(first, activations=scheme or False, **shared)
            shared.update(loaded=ref.loaded, quantization=ref.quantization)
        reports.append(run_parity(group, ref, steps=steps, text=text, text_tokens=text_tokens,
                                  with_noise_floor=ref.capabilities.activation_scheme is not None,
                                  progress=progress))
        del ref
    return reports


def _worker_bytes(specs: list[str]) -> int:
    """A worker's memory: the fp32 eager reference (4 bytes/parameter) plus its artifacts."""
    params = max((ModelConfig.from_dict(read_manifest(s, verify=False)["config"]).num_parameters()
                  for s in specs if not is_eager(s)), default=0)
    return 4 * params + sum(dir_size(s) for s in specs if not is_eager(s)) + (600 << 20)


def split(specs: list[str], workers: int) -> list[list[str]]:
    """SPECs in ``workers`` buckets of about equal cost (longest first, each to the lightest)."""
    def cost(s):
        return 1.0 if is_eager(s) else _COST.get(str(read_manifest(s, verify=False).get("target")), 1.0)

    buckets: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(workers)]
    for s in sorted(specs, key=lambda s: -cost(s)):
        i = min(range(workers), key=lambda i: buckets[i][0])
        buckets[i] = (buckets[i][0] + cost(s), buckets[i][1] + [s])
    # each bucket keeps the caller's order, so reports come out in it
    return [[s for s in specs if s in b] for _, b in buckets if b]


def parity_workers(specs: list[str], reference: str | None, jobs: int | None,
                   available: int | None = None) -> int:
    """Workers for a parity run: ``jobs`` if given, else one per core up to one per SPEC, as many
    as memory holds (each rebuilds its own reference); 1 with an explicit reference."""
    if jobs is not None:
        return max(1, min(jobs, len(specs)))
    if reference is not None or len(specs) < 2:
        return 1
    n = min(len(specs), cores())
    available = available_bytes() if available is None else available
    if available is None:
        return 1
    while n > 1 and n * _worker_bytes(specs) > 0.8 * available:
        n -= 1
    return n


def compare_all(specs: list[str], reference: str | None = None, *, jobs: int | None = None, progress=print,
                **kw) -> list[ParityReport]:
    """``compare`` with the SPECs split over ``parity_workers`` processes (the same figures: each
    reference is rebuilt from the same manifest and verified against its quantization digest)."""
    workers = parity_workers(specs, reference, jobs)
    if workers < 2:
        return compare(specs, reference, progress=progress, **kw)
    progress(f"parity of {len(specs)} artifacts in {workers} worker processes")
    buckets = split(specs, workers)
    per_bucket = run_jobs(_compare_in_worker, [(b, reference, kw) for b in buckets], len(buckets), progress)
    return [r for reports in per_bucket for r in reports]


def _compare_in_worker(specs, reference, kw, progress):
    return compare(specs, reference, progress=progress, **kw)
