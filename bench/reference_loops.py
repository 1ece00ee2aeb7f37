"""The thinnest way to run our artifacts, to measure what ``python -m runtime bench`` adds.

Two references, each run in its own process by ``bench.compare``:
  * ``runner``: ExecuTorch's C++ ``TextLLMRunner`` (the runner the Android/iOS apps link) on
    our ``.pte``, through the wheel's binding; its own tokenizer (the artifact's
    ``tokenizer.json``), its own greedy sampling, and its own timestamps (``Stats``: prefill from
    the start of inference (tokenizing included) to the end of prompt evaluation, decode as ExecuTorch's report
    computes it, generated tokens over the time after prompt evaluation);
  * ``ort-loop``: a minimal ONNX Runtime loop on our ``.onnx``: one session with the backend's
    options, the cache and every one-token input bound once with IOBinding (inputs are numpy
    arrays shared with their OrtValues and rewritten in place), argmax on the bound logits.

Both time a ``--prompt``-token prefill and ``--decode`` greedy steps, after one warm-up, and
print ``RESULT {json}`` with ``prefill_tok_s`` and ``decode_tok_s``.

    python -m bench.reference_loops runner|ort-loop ARTIFACT_DIR --threads N --prompt 64 --decode 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _prompt_text(art: Path, n: int) -> str:
    """The first ``n`` tokens of a packaged text, as text (the runner tokenizes it itself)."""
    from edgellm.assets import fetch
    from edgellm.tokenizer import Tokenizer

    tok = Tokenizer.load(art)
    return tok.decode(tok.encode(fetch("us-constitution.txt").read_text()[:20000])[:n])


def runner(art: Path, threads: int, prompt: int, decode: int, runs: int) -> dict:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (kernels the program may call)
    import executorch.kernels.quantized  # noqa: F401

    from runtime.backends.executorch import set_threads

    set_threads(threads)  # the process-wide pool the runner's XNNPACK delegates are built with
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    m = _manifest(art)
    r = TextLLMRunner(str(art / m["artifact"]), str(art / m["executorch"]["runner_tokenizer"]))
    text = _prompt_text(art, prompt)
    points = []
    for i in range(1 + runs):
        stats = []
        r.reset()
        r.generate(text, GenerationConfig(echo=False, max_new_tokens=decode, temperature=0.0, warming=i == 0),
                   stats_callback=stats.append)  # no token callback: a piece may be a partial UTF-8
        # sequence, which the binding cannot hand to Python (UnicodeDecodeError); the runner prints its pieces
        s = stats[-1]
        if i:
            points.append({"prompt_tokens": s.num_prompt_tokens, "decode_tokens": s.num_generated_tokens,
                           "prefill_tok_s": s.num_prompt_tokens * 1000 / max(1, s.prompt_eval_end_ms - s.inference_start_ms),
                           "decode_tok_s": s.num_generated_tokens * 1000 / max(1, s.inference_end_ms - s.prompt_eval_end_ms)})
    return _median(points)


def ort_loop(art: Path, threads: int, prompt: int, decode: int, runs: int) -> dict:
    import onnxruntime as ort

    from runtime.bench import bench_prompt

    m = _manifest(art)
    io = m["onnx"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(art / m["artifact"]), so, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in io["inputs"] if n.startswith("past_")]
    present = [n for n in io["outputs"] if n.startswith("present_")]
    b = sess.io_binding()
    for p_name, q_name in zip(past, present):
        v = ort.OrtValue.ortvalue_from_numpy(np.zeros(inputs[p_name].shape, types[inputs[p_name].type]))
        b.bind_ortvalue_input(p_name, v)
        b.bind_ortvalue_output(q_name, v)
    step = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros(1, np.int64),
            "n_valid": np.zeros((), np.int64)}
    step_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in step.items()}  # share the arrays' memory
    logits = np.zeros((1, 1, int(m["vocab_size"])), np.float32)
    logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
    if any(i.name == "logits_from" for i in sess.get_overridable_initializers()):  # the head over the last row only
        b.bind_ortvalue_input("logits_from", ort.OrtValue.ortvalue_from_numpy(np.full((), -1, np.int64)))
    ids = bench_prompt(prompt, int(m["vocab_size"]))
    points = []
    for i in range(1 + runs):
        t0 = time.perf_counter()
        b.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        b.bind_cpu_input("position_ids", np.arange(len(ids), dtype=np.int64))
        b.bind_cpu_input("n_valid", np.asarray(len(ids), np.int64))
        b.bind_output("logits", "cpu")
        sess.run_with_iobinding(b)
        tok = int(b.get_outputs()[0].numpy()[0, -1].argmax())  # the last row (the only one with logits_from)
        t1 = time.perf_counter()
        for k, v in step_values.items():
            b.bind_ortvalue_input(k, v)
        b.bind_ortvalue_output("logits", logits_value)
        for p in range(len(ids), len(ids) + decode):
            step["input_ids"][0, 0], step["position_ids"][0], step["n_valid"][()] = tok, p, p + 1
            sess.run_with_iobinding(b)
            tok = int(logits.argmax())
        t2 = time.perf_counter()
        if i:
            points.append({"prompt_tokens": len(ids), "decode_tokens": decode,
                           "prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": decode / (t2 - t1)})
    return _median(points)


def _median(points: list[dict]) -> dict:
    return {k: float(np.median([p[k] for p in points])) for k in points[0]}


LOOPS = {"runner": runner, "ort-loop": ort_loop}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loop", choices=sorted(LOOPS))
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args(argv)
    print("\nRESULT " + json.dumps(LOOPS[a.loop](a.artifact, a.threads, a.prompt, a.decode, a.runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
