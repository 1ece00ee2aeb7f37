"""Every registered backend through the same checks (the Backend contract of runtime.backend).

Each backend runs a tiny fp32 artifact of its target (eager runs the tiny recipe): logits of the
right shape and dtype that agree with eager PyTorch, decode continuing prefill, forward_all
returning every position, reset reproducing a fresh run, clear errors for a full cache, an id
outside the vocabulary and an option the backend does not take, and declared capabilities.
"""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.backend import Backend, BackendOptions, CacheOverflowError, Capabilities, backend_class, kinds

IDS = [1, 17, 300, 4242, 9, 77, 1234, 5]


def test_every_backend_module_registers_its_kind():
    assert set(kinds()) == {"eager", "executorch", "onnx", "coreml"}
    for kind in kinds():
        cls = backend_class(kind)
        assert issubclass(cls, Backend) and cls.kind == kind
        assert "tokenizer" in cls.accepts and cls.accepts <= {f for f in BackendOptions.__dataclass_fields__}


@pytest.fixture(scope="module")
def eager():
    return runtime.load("eager:tiny")


@pytest.fixture(scope="module", params=kinds())
def backend(request, export_artifact, eager):
    if request.param == "eager":
        return eager
    return runtime.load(export_artifact(request.param, "tiny", "none"))


def test_contract(backend, eager):
    assert isinstance(backend.capabilities, Capabilities)
    assert backend.tokenizer is not None and backend.max_seq_len == eager.max_seq_len
    backend.reset()
    first = backend.prefill(IDS[:5])
    assert first.dtype == np.float32 and first.shape == (backend.vocab_size,)
    steps = [backend.decode(i) for i in IDS[5:]]
    assert backend.pos == len(IDS)
    backend.reset()
    rows = backend.forward_all(IDS)
    assert rows.shape == (len(IDS), backend.vocab_size)
    np.testing.assert_allclose(rows[4], first, rtol=0, atol=5e-3)
    np.testing.assert_allclose(rows[5:], np.stack(steps[:-1] + [steps[-1]])[: len(IDS) - 5], rtol=0, atol=5e-3)
    eager.reset()
    ref = eager.forward_all(IDS)
    tol = 5e-2 if backend.kind == "coreml" else 1e-4  # Core ML computes in fp16
    assert np.abs(rows - ref).max() <= tol * max(1.0, np.abs(ref).max())
    backend.reset()
    assert np.array_equal(backend.forward_all(IDS), rows)  # a reset backend is a fresh one


def test_clear_errors(backend):
    backend.reset()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        backend.prefill([backend.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        backend.prefill([])
    with pytest.raises(CacheOverflowError, match="exceeds the KV cache capacity"):
        backend.prefill([1] * (backend.max_seq_len + 1))
    backend.reset()


@pytest.mark.parametrize("kind", kinds())
def test_an_option_the_backend_does_not_take_is_refused(kind, export_artifact):
    cls = backend_class(kind)
    unused = sorted(set(BackendOptions.__dataclass_fields__) - cls.accepts - {"engine"} or {"engine"})
    field = unused[0]
    value = {"threads": 2, "accuracy_level": 0, "max_seq_len": 64, "seed": 3, "n_layers": 1, "engine": "coreml"}[field]
    spec = "eager:tiny" if kind == "eager" else str(export_artifact(kind, "tiny", "none"))
    with pytest.raises(ValueError, match=f"the {kind} backend does not take {field}"):
        runtime.load(spec, **{field: value})
