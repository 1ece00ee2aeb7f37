"""Independent jobs side by side in spawned worker processes, their progress on the parent's display.

Why: an export's targets and a parity run's reference groups are independent, and each is
minutes of single-threaded Python (ExecuTorch's ``to_edge``, Core ML's conversion, an eager
decode loop); on a machine with idle cores they can run at once. Spawned, not forked: torch's
thread pools do not survive a fork. Workers ignore Ctrl-C and turn SIGTERM into an exception,
so when the parent is interrupted or a job fails, the parent terminates them and each one's
cleanup (``ArtifactWriter``'s temp folder) still runs. Standard library only.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
from collections.abc import Callable, Sequence
from typing import Any

_QUEUE = None  # in a worker: where its progress goes


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Stopped(BaseException):
    """SIGTERM in a worker: raised where the job is, so its cleanup runs."""


def _stop(signum, frame):
    raise _Stopped()


def _init(q, threads: int) -> None:
    global _QUEUE
    _QUEUE = q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _stop)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class _Progress:
    """A worker's ``progress(message)`` (a log line) with ``.status(message)`` (the live line)."""

    def __init__(self, job: int):
        self.job = job

    def __call__(self, message: str) -> None:
        _QUEUE.put((self.job, "line", message))

    def status(self, message: str) -> None:
        _QUEUE.put((self.job, "status", message))


def _run(fn, job: int, args: tuple):
    return fn(*args, progress=_Progress(job))


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, progress=print,
             poll_seconds: float = 0.1) -> list[Any]:
    """``[fn(*args, progress=...) for args in jobs]``, at most ``workers`` at a time, each in its
    own spawned process (``fn`` and ``args`` must pickle; start the longest job first). Each
    job's messages reach ``progress`` (its ``.status`` shows every running job's current stage).
    The first failure stops the other jobs and is raised here."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    threads = max(1, cores() // max(1, workers))
    status = getattr(progress, "status", None)
    current: dict[int, str] = {}
    pool = ctx.Pool(workers, initializer=_init, initargs=(q, threads))
    try:
        pending = [pool.apply_async(_run, (fn, i, tuple(args))) for i, args in enumerate(jobs)]
        while True:
            try:
                job, kind, message = q.get(timeout=poll_seconds)
            except queue_mod.Empty:
                pass
            else:
                if kind == "line":
                    progress(message)
                current[job] = message
                if status is not None:
                    status("  ·  ".join(current[j] for j in sorted(current)))
                continue
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # raises the job's exception
            if all(r.ready() for r in pending):
                break
        while True:  # the last messages
            try:
                job, kind, message = q.get_nowait()
            except queue_mod.Empty:
                break
            if kind == "line":
                progress(message)
        results = [r.get() for r in pending]
        pool.close()
        pool.join()
        return results
    finally:
        pool.terminate()  # on any exit path: a no-op after close/join, else SIGTERM -> each job's cleanup
        pool.join()
