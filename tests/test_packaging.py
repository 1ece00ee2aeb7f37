"""The wheel carries every package and the recipes (the YAML files of the top-level recipes/)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgellm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert recipes and {f"edgellm/recipes/{r}" for r in recipes} <= names
    for module in ("edgellm/decoder.py", "edgellm/architectures/llama.py", "export/transforms.py",
                   "export/targets/onnx/fusion.py", "runtime/backends/eager.py", "runtime/parity/bounds.py"):
        assert module in names, module
    targets = {p.parent.name for p in (ROOT / "export" / "targets").glob("*/__init__.py")}
    assert {f"export/targets/{t}/__init__.py" for t in targets} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    """The wheel installed on its own (no checkout on the path) has its recipes and both CLIs.
    Its dependencies come from this environment; ``--target`` keeps the install out of it."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("edgellm-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=work)

    where = run("-c", "import edgellm, export, runtime, edgellm.recipes as r; "
                      "print(edgellm.__file__, export.__file__, runtime.__file__); print(*r.available_recipes())")
    assert where.returncode == 0, where.stderr[-2000:]
    files, recipes = where.stdout.splitlines()
    assert all(f.startswith(str(site)) for f in files.split()), files  # the wheel's copy, not the checkout
    assert set(recipes.split()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    tok = run("-m", "runtime", "tokenize", "xgen-7b-8k-inst", "Hello world")
    assert tok.returncode == 0 and tok.stdout.split("\n")[0].split() == ["15496", "995"], tok.stdout + tok.stderr
    refused = run("-m", "export", "--target", "onnx", "--recipe", "xgen-7b-8k-base", "--n-layers", "0")
    assert refused.returncode == 1 and "--n-layers" in refused.stderr, refused.stderr
