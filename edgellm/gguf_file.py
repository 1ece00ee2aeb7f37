"""GGUF files, read two ways: the key/value header alone (fast, for tokenizers and ids) and
tensor by tensor through ``gguf.GGUFReader`` (memory-mapped, for weights)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_fields(path: str | Path) -> dict[str, Any]:
    """The GGUF key/value header only (gguf.GGUFReader also maps every tensor: ~10x slower)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic); pass a .gguf model file")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")

        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", errors="surrogateescape")

        def value(vtype):
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, n = read("<I"), read("<Q")
                if itype in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[itype]
                    size = struct.calcsize(fmt)
                    return list(struct.unpack(f"<{n}{fmt[1]}", f.read(size * n)))
                return [value(itype) for _ in range(n)]
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            raise ValueError(f"{path}: unknown GGUF value type {vtype}; the file is corrupt or newer than edgellm")

        out = {}
        for _ in range(n_kv):
            key = string()
            out[key] = value(read("<I"))
        return out


def open_reader(path: str | Path):
    """``gguf.GGUFReader`` over a memory map of the file (tensors are read on access)."""
    import gguf

    return gguf.GGUFReader(str(path))


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()
