"""What both command lines share: one-line usage errors, one error path with documented exit
codes, and a quiet terminal.

Exit codes (README, "Exit codes"): 0 success, 1 bad input (the message names the fix), 2 usage
(unknown flag, missing argument), 3 OS or I/O error (no space, read-only, permission), 4
internal error (a bug; ``--debug`` shows the traceback), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). Whatever the exit, temporary files are removed: SIGTERM is turned into an
exception so every ``finally`` runs.

Quiet (the default when run from a shell): file descriptors 1 and 2 are pointed at a log file,
so the libraries' C++ loggers, Python warnings, logging handlers and progress bars land there
and not on the user's terminal; our own output goes to the saved terminal streams (and
``sys.stdout``, so a plain ``print`` still reaches the user). ``--verbose`` shows everything.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TextIO

from edgellm.assets import home
from edgellm.errors import EdgeLLMError

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_IO, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (not the usage block), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common_flags(parser: argparse.ArgumentParser, default=False) -> None:
    """``--debug`` and ``--verbose``; subcommand parsers pass ``argparse.SUPPRESS`` so a flag given
    before the subcommand is not reset by the subparser's default."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the full traceback too")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show the libraries' warnings and log lines instead of keeping them in the log file")


def logs_dir() -> Path:
    return home() / "logs"


class Terminal:
    """The user's output streams; in quiet mode everything else goes to ``log``."""

    def __init__(self, quiet: bool, log: Path | None = None):
        self.quiet = quiet and log is not None
        self.log = log if self.quiet else None
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: list[int] = []
        self.keep_log_at: Path | None = None  # where the log is moved at the end (beside an artifact)

    def __enter__(self) -> "Terminal":
        if not self.quiet:
            return self
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError:  # no place for a log: stay verbose rather than fail
            self.quiet, self.log = False, None
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self._sys = (sys.stdout, sys.stderr)
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        sys.stdout = self.out
        return self

    def __exit__(self, *exc):
        if not self._saved:
            return
        for stream in (sys.stdout, sys.stderr, self._sys[0], self.out, self.err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self._sys
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self.out.close()
        self.err.close()
        self._saved = []
        if self.keep_log_at is not None:
            try:
                shutil.move(self.log, self.keep_log_at)
            except OSError:
                pass

    @contextmanager
    def activity(self, console):
        """A live line (spinner, current stage, elapsed time) under the log lines; yields
        ``progress(message)``, which logs the message and makes it the current stage."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
            task = bar.add_task("starting")
            t0 = time.time()

            def progress(message: str) -> None:
                bar.console.print(f"[dim]{time.time() - t0:7.1f}s[/dim]  {message}", highlight=False)
                bar.update(task, description=message)

            # the live line alone (a stage that starts), without a log line
            progress.status = lambda message: bar.update(task, description=message)
            yield progress

    def console(self, stderr: bool = False):
        """A rich Console on the user's terminal, wide enough for tables in logs and CI."""
        from rich.console import Console

        stream = self.err if stderr else self.out
        return Console(file=stream, width=None if stream.isatty() else 200, log_path=False)


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup runs."""


@contextmanager
def _sigterm_raises():
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_OS_FIXES = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "check the permissions or write somewhere else",
    errno.EPERM: "check the permissions or write somewhere else",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file; check the path",
    errno.EISDIR: "the path is a folder; give a file",
}


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted; nothing partial was kept"
    if isinstance(e, Terminated):
        return EXIT_TERMINATED, "terminated; nothing partial was kept"
    if isinstance(e, (EdgeLLMError, ValueError)):
        return EXIT_INPUT, one_line(e)
    if isinstance(e, MemoryError):
        return EXIT_IO, "out of memory; try a smaller model (--n-layers) or cache (--max-seq-len)"
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        fix = _OS_FIXES.get(e.errno)
        return EXIT_IO, one_line(f"{e.strerror or e}{where}" + (f"; {fix}" if fix else ""))
    return EXIT_INTERNAL, one_line(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback "
                                   f"and please report it")


def run(command: Callable[[Terminal], int], *, prog: str, debug: bool = False, verbose: bool = False,
        capture: bool = True) -> int:
    """Run ``command(terminal)`` with the one error path. ``capture`` False (in-process callers
    such as tests) keeps the process's streams as they are."""
    quiet = capture and not verbose and not os.environ.get("EDGELLM_VERBOSE")
    log = logs_dir() / f"{prog.replace('python -m ', '').replace(' ', '-').replace('.', '-')}.log"
    with Terminal(quiet, log) as term, _sigterm_raises():
        t0 = time.time()
        try:
            return command(term)
        except BaseException as e:  # noqa: B036 -- the one place every exit is turned into a code
            if isinstance(e, SystemExit):
                raise
            code, message = describe_error(e)
            if debug:
                traceback.print_exc(file=term.err)
            hint = f" (library output: {term.log})" if code == EXIT_INTERNAL and term.log else ""
            print(f"error: {message}{hint}", file=term.err)
            if code == EXIT_INTERNAL and term.log:
                traceback.print_exc(file=sys.stderr)  # into the log, for the report
            return code
        finally:
            if term.log is not None:
                print(f"[{prog}: {time.time() - t0:.1f}s]", file=sys.stderr)
