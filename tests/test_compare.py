"""bench.compare end to end on the tiny model (no timed assertions): interleaved rounds, a peer
that cannot be built reported with its reason, the JSON / markdown / PNG report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_runs_ours_reports_an_unbuildable_peer_and_writes_the_report(export_artifact, tmp_path):
    arts = [export_artifact("onnx", "tiny"), export_artifact("executorch", "tiny", "int4", "portable")]
    out = tmp_path / "compare"
    p = subprocess.run([sys.executable, "-m", "bench.compare", "--recipe", "tiny", "--systems", "edgellm-onnx",
                        "edgellm-pte-portable", "llama.cpp", "ref-ort-loop-onnx", "--artifact", *map(str, arts), "--threads", "1",
                        "--rounds", "2", "--prompt", "8", "--decode", "8", "--max-seq-len", "256", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert set(rows) == {"edgellm-onnx", "edgellm-pte-portable", "llama.cpp", "ref-ort-loop-onnx"}
    ref = rows["ref-ort-loop-onnx"]  # the minimal loop on the same file: ours / it, per round
    assert ref["kind"] == "reference" and ref["artifact"] == rows["edgellm-onnx"]["artifact"]
    assert ref["ours_over_reference_decode_tok_s_1t"] > 0 and ref["decode_tok_s_1t_vs_best_peer"] is None
    for name in ("edgellm-onnx", "edgellm-pte-portable"):
        r = rows[name]
        assert r["error"] is None and r["artifact"] in map(str, arts)
        assert r["decode_tok_s_1t"]["n"] == 2 and r["decode_tok_s_1t"]["min"] > 0
        assert r["decode_tok_s_1t"]["min"] <= r["decode_tok_s_1t"]["median"] <= r["decode_tok_s_1t"]["max"]
        assert r["prefill_tok_s_1t"]["median"] > 0 and 0 < r["of_bound_1t"]
        assert r["decode_tok_s_1t_vs_best_peer"] is None  # no peer was measured: no ratio is invented
    assert "GGUF" in rows["llama.cpp"]["error"] and rows["llama.cpp"]["decode_tok_s_1t"] is None
    assert len(report["bandwidth_gbs"]["1"]) == 2 and min(report["bandwidth_gbs"]["1"]) > 0
    md = (out / "compare.md").read_text()
    assert "| llama.cpp | - | not built: " in md and "| edgellm-onnx |" in md
    assert "edgellm-onnx / ref-ort-loop-onnx (same file" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
