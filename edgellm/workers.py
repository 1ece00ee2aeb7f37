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


def _worker(q, threads: int, fn, job: int, args: tuple) -> None:
    """One job in its own process: its messages, then its result or its exception, go to ``q``."""
    global _QUEUE
    _QUEUE = q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _stop)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        q.put((job, "done", fn(*args, progress=_Progress(job))))
    except BaseException as e:  # noqa: B036 -- reported to the parent, which decides
        try:
            q.put((job, "error", e))
        except Exception:  # an exception that does not pickle still ends the run, as a message
            q.put((job, "error", RuntimeError(f"{type(e).__name__}: {e}")))


class _Progress:
    """A worker's ``progress(message)`` (a log line) with ``.status(message)`` (the live line)."""

    def __init__(self, job: int):
        self.job = job

    def __call__(self, message: str) -> None:
        _QUEUE.put((self.job, "line", message))

    def status(self, message: str) -> None:
        _QUEUE.put((self.job, "status", message))


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, progress=print,
             poll_seconds: float = 0.2) -> list[Any]:
    """``[fn(*args, progress=...) for args in jobs]``, at most ``workers`` at a time, each job in
    its own spawned process (``fn`` and ``args`` must pickle; give the longest job first). Each
    job's messages reach ``progress`` (its ``.status`` shows every running job's current stage).
    The first failure stops the other jobs (SIGTERM: their cleanup runs) and is raised here."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    threads = max(1, cores() // max(1, workers))
    status = getattr(progress, "status", None)
    current: dict[int, str] = {}
    results: dict[int, Any] = {}
    running: dict[int, Any] = {}
    todo = list(enumerate(jobs))
    try:
        while todo or running:
            while todo and len(running) < max(1, workers):
                i, args = todo.pop(0)
                p = ctx.Process(target=_worker, args=(q, threads, fn, i, tuple(args)), daemon=True)
                p.start()
                running[i] = p
            try:
                job, kind, payload = q.get(timeout=poll_seconds)
            except queue_mod.Empty:
                for i, p in list(running.items()):
                    if not p.is_alive() and p.exitcode != 0:  # died without a word (e.g. killed)
                        raise RuntimeError(f"worker for job {i} exited with code {p.exitcode}")
                continue
            if kind == "done":
                results[job] = payload
                running.pop(job).join()
            elif kind == "error":
                running.pop(job).join()
                raise payload
            else:
                if kind == "line":
                    progress(payload)
                current[job] = payload
                if status is not None:
                    status("  ·  ".join(current[j] for j in sorted(current)))
        return [results[i] for i in range(len(jobs))]
    finally:
        for p in running.values():  # on failure or interruption: SIGTERM -> each job's cleanup
            p.terminate()
        for p in running.values():
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
