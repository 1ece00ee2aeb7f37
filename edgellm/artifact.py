"""The artifact directory contract: ``OUT/<recipe>-<target>-<quant>/`` + ``manifest.json``.

Every target writes the same layout: the compiled model file(s), the shared tokenizer files
and a manifest (recipe, resolved config, quantization, cache capacity, bos/eos ids, chat
template, tool versions, sha256 of every file). A directory is assembled under a temporary
name and renamed into place, so a failed export leaves nothing half-written. The runtime
loads by directory and refuses files whose hashes do not match.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError

MANIFEST = "manifest.json"
FORMAT = "edgellm-artifact"
FORMAT_VERSION = 1
_TOOLS = ("edgellm", "torch", "executorch", "torchao", "coremltools", "onnx", "onnxruntime",
          "onnxscript", "onnx-ir", "tiktoken", "gguf")


class ArtifactError(EdgeLLMError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    out = {}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def artifact_name(recipe: str, target: str, quant: str) -> str:
    return f"{recipe}-{target}-{quant}"


def _strict_json(value: Any) -> Any:
    """Non-finite floats as strings ("-Infinity"), so browsers' JSON.parse reads the manifest."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def dir_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


@dataclass
class ArtifactWriter:
    """Assemble an artifact in a temp directory next to its final place; ``commit`` renames it.

    Use as a context manager: on an exception the temp directory is removed. While it lives the
    writer holds an exclusive lock on ``.NAME.lock`` beside the artifact (removed when it is done),
    so two exports into the same folder cannot interleave; holding it, any ``.NAME.*`` temp
    directory left by a killed run is stale and is removed. On failure, output folders the writer
    created are removed again if empty. The directory gets ordinary permissions (the umask's).
    """

    final: Path

    def __post_init__(self):
        self.final = Path(self.final)
        root = self.final.parent
        self._made = [p for p in (root, *root.parents) if not p.exists()]  # removed again if we fail
        root.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / f".{self.final.name}.lock"
        self._lock = self._acquire(self._lock_path)
        for stale in root.glob(f".{self.final.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=root))
        umask = os.umask(0)
        os.umask(umask)
        self._umask = umask
        os.chmod(self.dir, 0o777 & ~umask)

    def _acquire(self, path: Path):
        """An exclusive lock on ``path``, re-checked after locking: a holder unlinks the file on exit,
        so a lock taken on a file that was unlinked meanwhile is retried on the new one."""
        while True:
            f = open(path, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise ArtifactError(f"another export is writing {self.final} right now; wait for it to finish "
                                    f"or choose another --out") from None
            try:
                if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.unlink(self._lock_path)  # while still holding it: see _acquire
        except OSError:
            pass
        self._lock.close()
        if exc_type is not None:
            for p in self._made:  # folders this export created, innermost first, if still empty
                try:
                    p.rmdir()
                except OSError:
                    break

    def path(self, name: str) -> Path:
        return self.dir / name

    def commit(self, manifest: dict[str, Any]) -> Path:
        for p in self.dir.rglob("*"):  # ordinary permissions for what writers made private (mkstemp: 0600)
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~self._umask)
        files = {p.relative_to(self.dir).as_posix(): sha256_file(p) for p in _all_files(self.dir)}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "tool_versions": tool_versions(), **manifest, "files": files}
        (self.dir / MANIFEST).write_text(json.dumps(_strict_json(full), indent=2, allow_nan=False, default=str))
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.dir, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json`` and (by default) check every file's sha256."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not an artifact directory (it does not exist or is not a folder)")
    if not mpath.exists():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an edgellm artifact; export one with python -m export")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is corrupt ({e}); re-export the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not an edgellm manifest (format {manifest.get('format')!r})")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ArtifactError(f"{mpath} lists no files with their sha256, so nothing can be verified; re-export "
                            f"the artifact")
    if verify:
        for name, digest in manifest["files"].items():
            p = directory / name
            if not p.exists():
                raise ArtifactError(f"artifact {directory} is missing {name}; re-export it")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact {directory}: {name} does not match its sha256 in {MANIFEST} "
                                    f"(corrupt or modified); re-export it")
    return manifest
