"""The wheel carries every package and the recipes (the YAML files of the top-level recipes/)."""

from __future__ import annotations

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
