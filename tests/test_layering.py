"""The folder layout is the architecture: dependencies point one way, and no import hides in a
function to dodge a cycle.

``edgellm`` (the shared core) imports neither ``export`` nor ``runtime``; ``export`` and
``runtime`` import the core and never each other. An import inside a function is allowed
only for an optional or heavy third-party library (ExecuTorch, ONNX Runtime, coremltools, ...)
or an explicitly listed lazy project import below, never to get around a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgellm", "export", "runtime")
ALLOWED = {"edgellm": set(), "export": {"edgellm"}, "runtime": {"edgellm"}}
# Modules whose project imports inside functions are there for laziness, not cycles: the command
# lines check their input and point the libraries' output at the log file before they import
# what they run (torchao prints at import time).
LAZY_OK = {"export/__main__.py", "export/make_checkpoint.py", "runtime/__main__.py"}


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield pkg, path


def _imports(tree):
    """(module name, inside a function?) for every import statement."""
    out = []

    def visit(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_fn) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, in_fn))
            visit(child, fn)

    visit(tree, False)
    return out


def test_every_package_is_scanned():
    assert {pkg for pkg, _ in _modules()} == set(PACKAGES)


@pytest.mark.parametrize("pkg,path", list(_modules()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_dependencies_point_one_way(pkg, path):
    tree = ast.parse(path.read_text(), str(path))
    for name, in_fn in _imports(tree):
        top = name.split(".")[0]
        if top in PACKAGES and top != pkg:
            assert top in ALLOWED[pkg], f"{path.relative_to(ROOT)} imports {name}: {pkg} may not depend on {top}"
        if in_fn and top in PACKAGES and str(path.relative_to(ROOT)) not in LAZY_OK:
            pytest.fail(f"{path.relative_to(ROOT)} imports {name} inside a function: move it to the top of the "
                        f"module (a project import in a function hides a dependency or dodges a cycle)")


def test_the_test_catches_a_wrong_edge(tmp_path):
    bad = ast.parse("def f():\n    from runtime.backend import load\nfrom export import targets\n")
    found = _imports(bad)
    assert ("runtime.backend", True) in found and ("export", False) in found
