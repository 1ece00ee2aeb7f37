"""ONNX Runtime (CPU) as a Backend for ``export.targets.onnx.lowering`` artifacts.

The KV cache is one float32 buffer per past/present pair, allocated once; with IOBinding
each ``present_i`` output is bound to the same memory as ``past_i``, so the in-graph cache
write (ScatterElements, or GroupQueryAttention's shared buffer) updates it in place and no
cache is copied between calls.

``accuracy_level`` selects MatMulNBits' compute mode at load time: the artifact stores 4
(activations quantized to int8 per block -- the fast path); 0 or 1 computes with exactly
dequantized float weights (parity mode). It is a node attribute, so the graph is rewritten in
memory before the session is created (the weights themselves are untouched).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backend import Backend, BackendOptions, Capabilities, register
from runtime.inspect import inspect_onnx

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _session_source(model_path: Path, manifest: dict[str, Any], accuracy_level: int | None):
    """The model for InferenceSession: the file as is, or (another accuracy level) a rewritten copy
    in memory. Returns (path-or-bytes, session config entries): a rewritten graph with external
    weights finds them in the artifact's directory (ONNX Runtime refuses a symlink to them)."""
    stored = manifest.get("onnx", {}).get("matmulnbits_accuracy_level")
    if accuracy_level is None or stored is None or accuracy_level == stored:
        return str(model_path), {}
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS} (0/1 exact dequantized float, 4 int8 "
                         f"activations), got {accuracy_level!r}")
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = int(accuracy_level)
    data = manifest.get("onnx", {}).get("external_data")
    folder = {"session.model_external_initializers_file_folder_path": str(model_path.parent.resolve())}
    return model.SerializeToString(), folder if data else {}


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


@register
class OnnxBackend(Backend):
    kind = "onnx"
    accepts = frozenset({"tokenizer", "threads", "accuracy_level"})

    def __init__(self, model_path: Path, manifest: dict[str, Any], tokenizer=None, threads: int | None = None,
                 accuracy_level: int | None = None, name: str | None = None):
        import onnxruntime as ort

        io = manifest.get("onnx") or {}
        if not io.get("inputs") or not io.get("cache_shape"):
            raise ValueError(f"{model_path.parent}: manifest has no 'onnx' section (inputs, cache_shape); "
                             f"re-export it with python -m export --target onnx")
        so = ort.SessionOptions()
        if not os.environ.get("EDGELLM_VERBOSE"):  # its warnings (the overridable ``logits_from``) are ours to judge
            so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        src, entries = _session_source(model_path, manifest, accuracy_level)
        for key, value in entries.items():
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.max_seq_len = int(manifest["max_seq_len"])
        self.vocab_size = int(manifest["vocab_size"])
        self.windowed_from(manifest.get("config"))
        self.threads = threads
        self.accuracy_level = accuracy_level if accuracy_level is not None else io.get("matmulnbits_accuracy_level")
        level = f":acc{self.accuracy_level}" if self.accuracy_level is not None else ""
        int4 = (manifest.get("quantization") or {}).get("scheme", "none") != "none"
        self.activation_scheme = "int8-block-sym" if int4 and self.accuracy_level == 4 else None
        self.name = name or f"onnx:{manifest.get('name', model_path.parent.name)}{level}"
        self.pos = 0
        self._past = [n for n in io["inputs"] if n.startswith("past_")]
        self._present = [n for n in io["outputs"] if n.startswith("present_")]
        inputs = {i.name: i for i in self.session.get_inputs()}  # an fp16/int8 cache: its own types
        self._cache = [np.zeros(inputs[n].shape, _NUMPY[inputs[n].type]) for n in self._past]
        cache_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._cache]
        # One-token steps: every input is a numpy array of ours shared with its bound OrtValue
        # (rewritten in place, never rebound) and the logits land in a buffer of ours; longer
        # calls bind their inputs per call and let ORT allocate the logits.
        self._step_in = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros(1, np.int64),
                         "n_valid": np.zeros((), np.int64)}
        self._step_in_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._step_in.items()}
        self._step_logits = np.zeros((1, 1, self.vocab_size), np.float32)
        self._step_value = ort.OrtValue.ortvalue_from_numpy(self._step_logits)
        # ``logits_from`` (an input with a default of 0 = every row): -1 computes the head over
        # the last row only, which is all a prefill returns.
        self._logits_from = "logits_from" in inputs or any(
            i.name == "logits_from" for i in self.session.get_overridable_initializers())
        # (bound as OrtValues: bind_cpu_input looks the name up among the required inputs only)
        self._last_only = ort.OrtValue.ortvalue_from_numpy(np.full((), -1, np.int64))
        self._all_rows = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int64))
        self._binding = b = self.session.io_binding()
        b.bind_ortvalue_output("logits", self._step_value)  # first: get_outputs() follows binding order
        for past, present, value in zip(self._past, self._present, cache_values):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)  # in place: present_i is past_i's memory
        self._cache_values = cache_values
        self._bind_step()

    def _bind_step(self) -> None:
        b = self._binding
        for k, v in self._step_in_values.items():
            b.bind_ortvalue_input(k, v)
        b.bind_ortvalue_output("logits", self._step_value)  # rebinding a name keeps its place in the output order
        if self._logits_from:
            b.bind_ortvalue_input("logits_from", self._all_rows)
        self._step_bound = True

    def _run_chunk(self, ids: list[int], start: int, logits_from=None) -> np.ndarray:
        T = len(ids)
        b = self._binding
        b.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        b.bind_cpu_input("position_ids", np.arange(start, start + T, dtype=np.int64))
        b.bind_cpu_input("n_valid", np.asarray(start + T, dtype=np.int64))
        if self._logits_from:
            b.bind_ortvalue_input("logits_from", logits_from if logits_from is not None else self._all_rows)
        b.bind_output("logits", "cpu")
        self._step_bound = False
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[0]

    def _step(self, token: int, start: int) -> np.ndarray:
        if not self._step_bound:
            self._bind_step()
        step = self._step_in
        step["input_ids"][0, 0] = token
        step["position_ids"][0] = start
        step["n_valid"][()] = start + 1
        self.session.run_with_iobinding(self._binding)
        return self._step_logits[0].copy()  # ours: the next step rewrites the bound buffer

    def _forward(self, ids: list[int], start: int) -> np.ndarray:
        if len(ids) == 1:
            return self._step(ids[0], start)
        return self._run_chunk(ids, start, None)

    def _forward_last(self, ids: list[int], start: int) -> np.ndarray:
        if len(ids) == 1:
            return self._step(ids[0], start)[0]
        return self._run_chunk(ids, start, self._last_only if self._logits_from else None)[-1]

    def _reset(self) -> None:
        # Slots past n_valid are never read; zeroing keeps a reset backend bit-for-bit fresh.
        for a in self._cache:
            a.fill(0)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(activation_scheme=self.activation_scheme, threads=True)

    @classmethod
    def inspect_model(cls, path: Path) -> dict[str, Any]:
        return inspect_onnx(path)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], tokenizer,
                      options: BackendOptions) -> "OnnxBackend":
        return cls(directory / manifest["artifact"], manifest, tokenizer, threads=options.threads,
                   accuracy_level=options.accuracy_level)
