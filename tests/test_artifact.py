"""The artifact directory contract: atomic writes, one writer at a time, stale temp directories
from a killed run removed, ordinary permissions, and manifests that cannot skip verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from edgellm.artifact import ArtifactError, ArtifactWriter, read_manifest


def _write(final, text="x"):
    with ArtifactWriter(final) as w:
        w.path("model.bin").write_text(text)
        return w.commit({"name": final.name, "target": "test"})


def test_commit_is_atomic_and_verified(tmp_path):
    art = _write(tmp_path / "a")
    m = read_manifest(art)
    assert set(m["files"]) == {"model.bin"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dir, no lock file left
    (art / "model.bin").write_text("y")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        read_manifest(art)


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with ArtifactWriter(tmp_path / "a") as w:
            w.path("model.bin").write_text("partial")
            1 / 0
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_failed_write_removes_the_output_folders_it_created(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with ArtifactWriter(tmp_path / "new" / "deeper" / "a"):
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_manifest_without_its_file_list_is_refused(tmp_path):
    art = _write(tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    del m["files"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="lists no files"):
        read_manifest(art)
    with pytest.raises(ArtifactError, match="lists no files"):
        read_manifest(art, verify=False)


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        art = _write(tmp_path / "a")
    finally:
        os.umask(old)
    assert oct(art.stat().st_mode & 0o777) == oct(0o755)
    assert oct((art / "model.bin").stat().st_mode & 0o777) == oct(0o644)


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_nothing_stale(tmp_path):
    final = tmp_path / "a"
    code = textwrap.dedent(f"""
        import os, sys, time
        from edgellm.artifact import ArtifactWriter
        w = ArtifactWriter({str(final)!r})
        w.path("model.bin").write_text("partial")
        print("writing", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        with pytest.raises(ArtifactError, match="another export is writing"):
            ArtifactWriter(final)
    finally:
        p.kill()  # SIGKILL mid-write: no cleanup runs in that process
        p.wait()
    stale = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert stale and stale[0].name.startswith(".a.")
    art = _write(final)  # the next export to the same place removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and read_manifest(art)


def test_files_written_private_are_committed_with_ordinary_permissions(tmp_path, tiny):
    """A writer that goes through mkstemp (the tokenizer's atomic save, 0600) still lands 0644."""
    old = os.umask(0o022)
    try:
        with ArtifactWriter(tmp_path / "a") as w:
            tiny.tokenizer().save(w.dir)
            w.path("model.bin").write_bytes(b"x")
            art = w.commit({"artifact": "model.bin"})
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in art.iterdir()}
    assert modes and set(modes.values()) == {oct(0o644)}, modes


def _exported_files(art) -> dict[str, bytes]:
    """Every file of an artifact, the manifest without what a re-export must change (creation
    time, per-stage wall time and peak RSS)."""
    files = {p.relative_to(art).as_posix(): p.read_bytes() for p in sorted(art.rglob("*")) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    del manifest["created"], manifest["export"]
    files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    return files


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_reexport_is_byte_identical_whatever_the_hash_seed(target, tmp_path):
    """Two processes with different PYTHONHASHSEED export the tiny recipe to the same bytes: set
    and dict order, random identifiers or timestamps must not reach an artifact."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    procs = []
    for seed in ("1", "3"):  # seeds that made coremltools 9.0 write two different programs
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        procs.append(subprocess.Popen([sys.executable, "-m", "export", "--target", target, "--recipe", "tiny",
                                       "--out", str(tmp_path / seed)], cwd=root, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    a, b = (_exported_files(next((tmp_path / seed).glob(f"tiny-{target}-*"))) for seed in ("1", "3"))
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"{target}: {', '.join(differing)} differ between the two exports"
