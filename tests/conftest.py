"""Session fixtures: the SmolLM2 model, its one quantization and one export per artifact kind.

Exports are the expensive part of the suite, so each (recipe, target, quant, flavour) is
exported once per test run into a directory every pytest-xdist worker shares, under a file
lock: the first worker to ask exports it, the others wait for it and reuse it.
"""

from __future__ import annotations


import edgellm  # noqa: E402,F401  (environment defaults before torch loads)

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """One directory for the whole run: the workers' common parent under xdist, else basetemp."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


@contextmanager
def exclusive(shared: Path, name: str):
    """Hold ``name``'s lock across worker processes (released when the process dies, too)."""
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (trained weights) at a 512-slot cache: a LoadedModel."""
    from edgellm.model import resolve_model

    return resolve_model(recipe="smollm2-135m", max_seq_len=512)


@pytest.fixture(scope="session")
def smollm2_quant(smollm2, shared_dir):
    """The shared int4 quantization of SmolLM2: GPTQ runs once per run, and the other workers
    read it back from the quantization store it was written to."""
    from export.pipeline import quantize_for

    with exclusive(shared_dir, "smollm2-quant"):
        return quantize_for(smollm2, "int4", progress=lambda s: None)


@pytest.fixture(scope="session")
def tiny():
    from edgellm.model import resolve_model

    return resolve_model(recipe="tiny")


@pytest.fixture(scope="session")
def tiny_quant(tiny):
    from export.pipeline import quantize_for

    return quantize_for(tiny, "int4", progress=lambda s: None)


@pytest.fixture(scope="session")
def heldout_text() -> str:
    """Public-domain English text for perplexity (US constitution, Debian miscfiles)."""
    from edgellm.assets import fetch

    return fetch("us-constitution.txt").read_text()


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def _shared_export(shared: Path, name: str, export) -> Path:
    """``export(out_root)`` once per run for ``name``; a worker that finds it done reuses it."""
    done = shared / f"{name}.json"
    with exclusive(shared, name):
        if done.exists():
            return Path(json.loads(done.read_text())["artifact"])
        art = export(shared / name)
        done.write_text(json.dumps({"artifact": str(art)}))
        return art


@pytest.fixture(scope="session")
def export_artifact(artifacts_dir, shared_dir, request):
    """``export_artifact(target, model="smollm2"|"tiny"|LoadedModel, quant="int4"|"none", flavour=None)``
    -> artifact dir, exported once per key: per run for a named model, per worker for a model a
    test built (its identity is an object in this process)."""
    from export.pipeline import run_export

    cache: dict = {}

    def shared(name):  # resolved lazily: a tiny-only selection never quantizes SmolLM2
        return request.getfixturevalue(name), request.getfixturevalue(f"{name}_quant")

    def _export(target: str, model="smollm2", quant: str = "int4", flavour: str | None = None, quantization=None):
        if flavour is None:  # one key for the default flavour however it is asked for
            from export import targets

            flavour = targets.get(target).default_flavour.name
        key = (target, model if isinstance(model, str) else id(model), quant, flavour)
        if key not in cache:
            if isinstance(model, str):
                loaded, q = shared(model)
            else:
                from export.pipeline import quantize_for

                loaded = model
                q = quantization or (quantize_for(loaded, "int4", progress=lambda s: None) if quant == "int4" else None)
            q = q if quant == "int4" else None

            def export(out_root):
                return run_export([target], loaded=loaded, quantization=q, quant=quant, flavour=flavour,
                                  out=out_root, progress=lambda s: None)[target]

            if isinstance(model, str):
                cache[key] = _shared_export(shared_dir, "-".join(key), export)
            else:  # models built by a test share the tiny recipe's name: give each its own folder
                cache[key] = export(artifacts_dir / f"model-{id(model)}")
        return cache[key]

    return _export
