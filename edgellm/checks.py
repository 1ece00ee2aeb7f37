"""Checks of user-given values, shared by the CLIs, the Python API and the recipe parser.

Each failure is one ``EdgeLLMError`` naming the value, what is allowed and the fix, raised before
any heavy work: a 7B export should not run for ten minutes and then trip on ``--out``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from edgellm.errors import EdgeLLMError

# A ceiling on thread counts: more threads than this only spin (``bench --threads 10000`` once
# drove the load average to 530).
THREADS_PER_CORE = 4


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {_num(lo)}"
    return f"{'<' if hi_open else '≤'} {_num(hi)}"


def integer(value, what: str, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """``value`` as an int within [lo, hi] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise EdgeLLMError(f"{what} must be an integer, got {value!r}{_fix(fix)}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise EdgeLLMError(f"{what} must be an integer {_range_text(lo, hi)}, got {value}{_fix(fix)}")
    return value


def number(value, what: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, fix: str = "") -> float:
    """``value`` as a finite float within the bounds (open or closed)."""
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise EdgeLLMError(f"{what} must be a number, got {value!r}{_fix(fix)}") from None
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        allowed = _range_text(lo, hi, lo_open, hi_open) if (lo is not None or hi is not None) else "finite"
        raise EdgeLLMError(f"{what} must be a finite number {allowed}, got {value}{_fix(fix)}")
    return value


def threads(value, what: str = "--threads") -> int:
    cores = os.cpu_count() or 1
    return integer(value, what, 1, cores * THREADS_PER_CORE,
                   fix=f"this machine has {cores} core(s); more threads than {THREADS_PER_CORE} per core only spin")


def text(value, what: str, fix: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        raise EdgeLLMError(f"{what} must be a non-empty string, got {value!r}{_fix(fix)}")
    return value


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_dir(path: str | os.PathLike, what: str = "--out", need_bytes: int = 0) -> Path:
    """A folder we can create files in (created later, by the writer), with ``need_bytes`` free."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgeLLMError(f"{what} {path} is a file, not a folder; pass a folder (it is created if missing)")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise EdgeLLMError(f"{what} {path}: {base} is a file, so no folder can be created there; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise EdgeLLMError(f"{what} {path} is not writable ({base} is read-only or not yours); choose another {what}")
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise EdgeLLMError(f"{what} {path}: the artifact needs about {need_bytes / 1e6:,.0f} MB but only "
                               f"{free / 1e6:,.0f} MB is free on {base}; free some space or choose another {what}")
    return path


def output_file(path: str | os.PathLike, what: str) -> Path:
    """A file path whose folder exists and is writable (so a report is not lost after the work)."""
    path = Path(path)
    if path.is_dir():
        raise EdgeLLMError(f"{what} {path} is a folder; give a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise EdgeLLMError(f"{what} {path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EdgeLLMError(f"{what} {path} is not writable; choose another path")
    return path


def input_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EdgeLLMError(f"{what} {path} " + ("is a folder; give a file" if path.is_dir() else "does not exist"))
    if not os.access(path, os.R_OK):
        raise EdgeLLMError(f"{what} {path} is not readable; check its permissions")
    return path
