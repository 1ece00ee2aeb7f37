"""Weights as a lazy mapping: names and shapes up front, each tensor read when it is asked for.

``load_checkpoint(path)`` returns ``(ModelConfig, Weights)`` for an HF folder (safetensors,
sharded or not, memory-mapped; PyTorch ``.bin`` shards loaded with ``mmap=True``) or a GGUF
file (memory-mapped, dequantized tensor by tensor). A tensor comes back in its stored dtype
(bf16 stays bf16; GGUF's block formats come back fp32) with the decoder's own (HF LLaMA)
name: format differences are absorbed by the checkpoint's architecture family
(``edgellm.architectures``), so the decoder never branches on where its weights came from.
``random_weights`` serves seeded random weights through the same interface, each tensor a
function of its name and the seed (so a 7B dry run never holds more than the tensor asked for).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from edgellm import architectures, gguf_file
from edgellm.config import ModelConfig
from edgellm.decoder import Decoder
from edgellm.errors import CheckpointError

__all__ = ["Weights", "CheckpointError", "load_checkpoint", "load_hf_folder", "load_gguf", "random_weights",
           "read_hf_config"]


class Weights(Mapping):
    """name -> tensor, read on access (``reader(name)``); ``shapes`` known without reading."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], reader: Callable[[str], torch.Tensor], origin: str):
        self.shapes = dict(shapes)
        self._reader = reader
        self.origin = origin  # where the weights came from (recorded in manifests)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._reader(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def truncated(self, n_layers: int) -> "Weights":
        """The first ``n_layers`` blocks and every non-block tensor (dry runs of big models)."""
        keep = {k: s for k, s in self.shapes.items()
                if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
        return Weights(keep, self._reader, self.origin)


# --------------------------------------------------------------------------- HF folders


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; pass an HF model folder or a .gguf file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]} which is missing from {folder}")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no weights in {folder}: expected model.safetensors, sharded safetensors "
                              f"with model.safetensors.index.json, or pytorch_model*.bin")
    return files


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read weights from {path} (corrupt or truncated?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


class _Shard:
    """One weights file, opened again for each tensor read: safetensors memory-mapped, ``.bin``
    loaded with mmap, the mapping living only as long as the tensor read from it -- a mapping
    held open keeps every page already consumed in the process's RSS (13.8 GB over a 7B run)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as st:
                    self.names = list(st.keys())
                    self.shapes = {n: tuple(st.get_slice(n).get_shape()) for n in self.names}
            else:
                state = self._load_bin()
                self.names = list(state)
                self.shapes = {n: tuple(t.shape) for n, t in state.items()}
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or truncated shard
            raise _corrupt(path, e) from None

    def _load_bin(self) -> dict[str, torch.Tensor]:
        return torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)

    def read(self, name: str) -> torch.Tensor:
        try:
            if self.path.suffix != ".safetensors":
                return self._load_bin()[name]
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as st:
                return st.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise _corrupt(self.path, e) from None


def load_hf_folder(folder: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    folder = Path(folder)
    hf = read_hf_config(folder)
    arch = architectures.for_hf(hf)
    try:
        cfg = arch.config_from_hf(hf, max_seq_len)
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'} lacks the required field {e.args[0]!r}") from None
    where: dict[str, tuple[_Shard, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _hf_weight_files(folder):
        shard = _Shard(f)
        for k in shard.names:
            name = arch.hf_tensor_name(k)
            if name is not None:
                where[name] = (shard, k)
                shapes[name] = shard.shapes[k]
    if "lm_head.weight" not in shapes and not cfg.tie_embeddings:
        raise CheckpointError(f"{folder} has no lm_head.weight but config.json does not tie the embeddings; "
                              f"set tie_word_embeddings: true in config.json or add the output head")

    def read(name: str) -> torch.Tensor:
        shard, key = where[name]
        return shard.read(key)

    return cfg, Weights(shapes, read, str(folder))


# --------------------------------------------------------------------------- GGUF


def load_gguf(path: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    """A llama GGUF: tensors dequantized to fp32 on access (F16/BF16/F32 kept as stored)."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf_file.open_reader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    arch = architectures.for_gguf(gguf_file.field(reader, "general.architecture"))
    cfg = arch.config_from_gguf(reader, max_seq_len)
    tensors, shapes = {}, {}
    for t in reader.tensors:
        name = arch.gguf_tensor_name(t.name)
        if name is not None:
            tensors[name] = t
            shapes[name] = tuple(int(s) for s in reversed(t.shape))

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shapes[name]))
        return arch.gguf_tensor_fix(name, w, cfg)

    return cfg, Weights(shapes, read, str(path))


def load_checkpoint(path: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, max_seq_len)
    if path.is_dir():
        return load_hf_folder(path, max_seq_len)
    raise CheckpointError(f"checkpoint {path} is neither an HF folder nor a .gguf file")


# --------------------------------------------------------------------------- random


RANDOM_ORIGIN = re.compile(r"random\(seed=(\d+)\)")
RANDOM_STD = 0.02


def decoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the decoder of ``cfg`` holds, with its shape (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One seeded random weight, a function of (name, seed) alone: norms near 1, everything else
    normal with std 0.02. Any tensor can be made without making the others."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = RANDOM_STD * torch.randn(shape, generator=gen)
    return t.to(dtype)


def random_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """Seeded random weights for dry runs at any size, generated tensor by tensor on access."""
    shapes = decoder_shapes(cfg)
    return Weights(shapes, lambda name: random_tensor(name, shapes[name], seed), f"random(seed={seed})")
