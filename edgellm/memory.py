"""Memory of this process: peak RSS (resettable, so each stage of an export gets its own) and
the memory the machine has available. Standard library only."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak RSS of this process. Linux: VmHWM, which belongs to the process's own address space;
    ru_maxrss also counts the pages of the parent it was forked from (a bench parent holding
    torch and a model makes every child look as large as itself)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current
    RSS). False where the kernel does not allow it (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int | None:
    """MemAvailable (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
