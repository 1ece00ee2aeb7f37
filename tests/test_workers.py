"""Jobs in worker processes (edgellm.workers) and the export that lowers targets side by side:
results in order, progress streamed, the first failure stops the rest with their cleanup run,
and a parallel export writes exactly the bytes of a sequential one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.workers import run_jobs
from helpers import ctrl_c_reaches

ROOT = Path(__file__).resolve().parent.parent


def _square(x, progress):
    progress(f"squaring {x}")
    progress.status(f"still squaring {x}")
    t0 = time.time()
    time.sleep(0.3)
    return x * x, os.getpid(), t0, time.time()


def _fails(message, progress):
    time.sleep(0.5)
    raise EdgeLLMError(message)


def _slow_with_cleanup(marker, progress):
    progress("started")
    try:
        time.sleep(120)
    finally:
        Path(marker).write_text("cleaned up")


class _Recorder:
    def __init__(self):
        self.lines, self.statuses = [], []

    def __call__(self, message):
        self.lines.append(message)

    def status(self, message):
        self.statuses.append(message)


def test_results_in_order_progress_streamed_at_most_workers_at_once():
    rec = _Recorder()
    out = run_jobs(_square, [(i,) for i in range(4)], workers=2, progress=rec)
    assert [r[0] for r in out] == [0, 1, 4, 9]
    pids = {r[1] for r in out}
    assert len(pids) == 4 and os.getpid() not in pids  # each job in its own spawned process
    for _, _, start, _ in out:  # never more than two at once
        assert sum(1 for _, _, s, e in out if s <= start < e) <= 2
    assert sorted(rec.lines) == [f"squaring {i}" for i in range(4)]
    assert any("still squaring" in s for s in rec.statuses)


def test_a_failure_is_raised_and_stops_the_other_jobs_with_their_cleanup(tmp_path):
    marker = tmp_path / "cleanup"
    rec = _Recorder()
    t = time.time()
    with pytest.raises(EdgeLLMError, match="bad input in job 1"):
        run_jobs(_dispatch, [("slow", str(marker)), ("fail", "bad input in job 1")], workers=2, progress=rec)
    assert time.time() - t < 60  # not the 120 s the slow job would take
    assert marker.read_text() == "cleaned up"  # SIGTERM became an exception inside the job


def _dispatch(kind, arg, progress):
    return (_slow_with_cleanup if kind == "slow" else _fails)(arg, progress)


def _files(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":  # creation time and per-stage timings differ by nature
                m = json.loads(data)
                m.pop("created", None)
                m.pop("export", None)
                data = json.dumps(m, sort_keys=True).encode()
            out[str(p.relative_to(d))] = data
    return out


@pytest.mark.slow
def test_parallel_export_writes_the_bytes_of_a_sequential_one(tmp_path):
    from export.pipeline import run_export

    lines = []
    par = run_export(["onnx", "coreml"], recipe="tiny", out=tmp_path / "par", jobs=2, progress=lines.append)
    assert any("in 2 worker processes" in line for line in lines), lines
    seq = run_export(["onnx", "coreml"], recipe="tiny", out=tmp_path / "seq", jobs=1, progress=lambda s: None)
    assert list(par) == list(seq) == ["onnx", "coreml"]
    for target in par:
        a, b = _files(par[target]), _files(seq[target])
        assert a.keys() == b.keys() and a, target
        different = [name for name in a if a[name] != b[name]]
        assert different == [], (target, different)


def test_export_workers_follow_cores_memory_and_the_request(tiny):
    from export import targets
    from export.pipeline import estimated_peak_bytes, export_workers

    chosen = [targets.get(n) for n in ("executorch", "onnx", "coreml")]
    assert export_workers(1, tiny, chosen, None) == 1
    assert export_workers(8, tiny, chosen, None) == 3  # never more than the targets
    plenty = 64 << 30
    auto = export_workers(None, tiny, chosen, None, available=plenty)
    assert auto == min(3, len(os.sched_getaffinity(0)))
    one_fits = int(max(estimated_peak_bytes(tiny.config, t) for t in chosen) / 0.8) + 1
    assert export_workers(None, tiny, chosen, None, available=one_fits) == 1  # memory for one at a time


def test_sigint_during_a_parallel_export_exits_130_and_leaves_nothing(tmp_path):
    """Ctrl-C while two workers lower: the parent stops them, each removes its temp folder, and the
    --out folder the export created is removed too."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "export", "--target", "all", "--recipe", "tiny", "--out", str(out),
                          "--jobs", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         start_new_session=True, preexec_fn=ctrl_c_reaches)
    for line in p.stdout:  # interrupt once both workers are tracing
        if "trac" in line:
            break
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert not out.exists(), list(out.rglob("*"))


def test_parity_split_over_workers_gives_the_figures_of_one_process(export_artifact):
    """Each worker rebuilds its reference from the same manifest: the same rows, whatever the split."""
    from runtime.parity.session import compare_all, split

    specs = [str(export_artifact("executorch", "tiny", "int4", "portable")), str(export_artifact("onnx", "tiny", "int4"))]
    assert split(specs, 2) == [[specs[0]], [specs[1]]] and split(specs, 1) == [specs]
    lines = []
    kw = dict(steps=4, text="We the People of the United States, in Order to form a more perfect Union, " * 4,
              text_tokens=48, threads=1)
    par = compare_all(specs, jobs=2, progress=lines.append, **kw)
    assert any("in 2 worker processes" in line for line in lines), lines
    seq = compare_all(specs, jobs=1, progress=lambda s: None, **kw)

    def figures(reports):
        return [{k: v for k, v in vars(row).items() if k != "seconds"} for rep in reports for row in rep.rows]

    assert figures(par) == figures(seq) and len(figures(seq)) == 2
