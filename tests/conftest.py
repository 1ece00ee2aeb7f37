"""Session fixtures: the SmolLM2 model, its one quantization and one export per artifact kind.

Exports are the expensive part of the suite, so each (recipe, target, quant, flavour) is
exported once per test session into a shared temp directory and reused by every test.
"""

from __future__ import annotations


import edgellm  # noqa: E402,F401  (environment defaults before torch loads)

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (trained weights) at a 512-slot cache: a LoadedModel."""
    from edgellm.model import resolve_model

    return resolve_model(recipe="smollm2-135m", max_seq_len=512)


@pytest.fixture(scope="session")
def smollm2_quant(smollm2):
    """The shared int4 quantization of SmolLM2, computed once per session."""
    from export.pipeline import quantize_for

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


@pytest.fixture(scope="session")
def export_artifact(artifacts_dir, request):
    """``export_artifact(target, model="smollm2"|"tiny"|LoadedModel, quant="int4"|"none", flavour=None)``
    -> artifact dir, exported once per session per key."""
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
            # Models built by a test share the tiny recipe's name: give each its own folder.
            out_root = artifacts_dir if isinstance(model, str) else artifacts_dir / f"model-{id(model)}"
            out = run_export([target], loaded=loaded, quantization=q, quant=quant, flavour=flavour,
                             out=out_root, progress=lambda s: None)
            cache[key] = out[target]
        return cache[key]

    return _export
