"""A loaded model's shared quantization, and calibrated quantizations kept on disk.

A GPTQ run costs minutes (SmolLM2) to hours (a 7B); loading its codes and scales back costs
seconds. An export, its parity reference in another process, and the next export of the same
weights to another target all need the very same codes, so a calibrated quantization is stored
once under ``$EDGELLM_HOME/quantizations`` (default ``~/.cache/edgellm``), keyed by everything
that determines it: the weights' bytes, the model and quantization configs, the calibration
token ids and the quantizing code itself. An entry is verified on load (its digest recomputed)
and written to a temp name, then renamed. Data-free methods are recomputed: they take seconds.
``EDGELLM_QUANT_CACHE=0`` turns the store off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgellm import calibration, quant_methods, quantization
from edgellm.assets import home
from edgellm.quantization import Quantization, QuantizedWeight, quantize

CALIBRATED = frozenset({"gptq"})
KEEP = 4  # entries kept (newest first): a SmolLM2 entry is ~90 MB, a 7B one ~4 GB
_CODE = (quantization, quant_methods, calibration)  # a change to any of these changes the key


def store_dir() -> Path:
    return home() / "quantizations"


def enabled() -> bool:
    return os.environ.get("EDGELLM_QUANT_CACHE", "1") != "0"


def quantize_loaded(loaded, progress: Callable[[int, int], None] | None = None,
                    note: Callable[[str], None] | None = None) -> Quantization:
    """The shared quantization of ``loaded`` (a LoadedModel) per its recipe. Calibrated methods
    read the packaged calibration text and come from, or go to, the store; ``note`` is told which."""
    qcfg = loaded.recipe.quantization
    tied = loaded.config.tie_embeddings
    if qcfg.method not in CALIBRATED:
        return quantize(loaded.weights, qcfg, tied=tied, progress=progress)
    tokens = calibration.calibration_tokens(loaded.tokenizer().encode, qcfg.calibration_tokens)
    path = store_dir() / f"{_key(loaded, tokens)}.safetensors" if enabled() else None
    if path is not None and path.exists():
        try:
            q = load(path, qcfg)
            os.utime(path)  # most recently used: kept longest
            if note:
                note(f"calibrated quantization read from {path}")
            return q
        except Exception as e:  # a damaged entry is recomputed, never trusted
            if note:
                note(f"ignoring unreadable stored quantization {path.name} ({e})")
            path.unlink(missing_ok=True)
    q = quantize(loaded.weights, qcfg, tied=tied, progress=progress, model_config=loaded.config,
                 calibration=tokens)
    if path is not None:
        try:
            save(q, path)
            _evict(path.parent)
        except OSError as e:  # a full or read-only cache costs the next run time, nothing else
            if note:
                note(f"could not store the calibrated quantization ({e.strerror or e})")
    return q


def _key(loaded, tokens: torch.Tensor) -> str:
    """sha256 of the weights' bytes (streamed, one tensor at a time), configs, calibration ids
    and the quantizing code."""
    # The cache capacity never enters GPTQ (its windows have their own RoPE tables), so a
    # 512-slot and a 2048-slot load of one checkpoint share an entry.
    model = {**dataclasses.asdict(loaded.config), "max_seq_len": None, "kv_cache": None}  # the cache never enters the calibration
    h = hashlib.sha256()
    h.update(json.dumps({"quant": dataclasses.asdict(loaded.recipe.quantization), "tied": loaded.config.tie_embeddings,
                         "model": model, "torch": torch.__version__},
                        sort_keys=True, default=str).encode())
    for mod in _CODE:
        h.update(Path(mod.__file__).read_bytes())
    h.update(tokens.numpy().tobytes())
    for name in sorted(loaded.weights):
        t = loaded.weights[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        del t
    return h.hexdigest()


def save(q: Quantization, path: Path) -> None:
    """Codes, scales and zero points of each unique tensor, plus what rebuilds the Quantization."""
    tensors, meta = {}, {}
    first = {}
    for name, qw in q.unique():
        first[id(qw)] = name
        meta[name] = {"bits": qw.bits, "group_size": qw.group_size, "shape": list(qw.shape)}
        tensors[f"{name}/packed"] = qw.packed
        tensors[f"{name}/scales"] = qw.scales
        if qw.zero_points is not None:
            tensors[f"{name}/zero_points"] = qw.zero_points
    aliases = {n: first[id(qw)] for n, qw in q.weights.items() if first[id(qw)] != n}
    header = {"weights": meta, "aliases": aliases, "calibration": q.calibration, "sha256": q.summary()["sha256"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"edgellm": json.dumps(header)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, qcfg) -> Quantization:
    """The stored Quantization, its digest checked against the one recorded when it was saved."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["edgellm"])
        weights = {}
        for name, m in header["weights"].items():
            zp = f"{name}/zero_points"
            qw = QuantizedWeight.from_packed(f.get_tensor(f"{name}/packed"), f.get_tensor(f"{name}/scales"),
                                             f.get_tensor(zp) if zp in f.keys() else None,
                                             m["group_size"], m["bits"], tuple(m["shape"]))
            weights[name] = qw
    for alias, name in header["aliases"].items():
        weights[alias] = weights[name]
    q = Quantization(qcfg, weights, header["calibration"])
    if q.summary()["sha256"] != header["sha256"]:
        raise ValueError("digest mismatch")
    return q


def _evict(folder: Path) -> None:
    entries = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in entries[KEEP:]:
        p.unlink(missing_ok=True)
