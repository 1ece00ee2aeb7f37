"""Serve the web demo and one artifact directory with the headers wasm threads need.

    python3 mobile_demo/web/serve.py --artifact out/smollm2-135m-onnx-int4-portable [--port 8000]

The page is at http://127.0.0.1:PORT/ and the artifact at /artifact/. Cross-origin isolation
(COOP same-origin + COEP require-corp) lets onnxruntime-web use SharedArrayBuffer threads;
browsers grant it only on a secure context (https or localhost). Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
MOUNT = "/artifact/"


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the web dir; ``/artifact/...`` from the artifact dir; isolation headers."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream",
                      ".data": "application/octet-stream", ".tiktoken": "text/plain"}

    def __init__(self, *args, artifact: Path | None = None, quiet: bool = False, **kw):
        self.artifact = artifact
        self.quiet = quiet
        super().__init__(*args, directory=str(WEB), **kw)

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if self.artifact is not None and clean.startswith(MOUNT):
            rel = clean[len(MOUNT):]
            parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
            return str(self.artifact.joinpath(*parts)) if parts else str(self.artifact)
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="an edgellm ONNX artifact directory (served at /artifact/)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1; 0.0.0.0 exposes it to the LAN, where a phone gets "
                         "no cross-origin isolation over plain http, so wasm runs single-threaded)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    a = ap.parse_args(argv)
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        print(f"error: {WEB}/node_modules is missing; run `npm ci` in {WEB} first", file=sys.stderr)
        return 2
    art = None
    if a.artifact is not None:
        art = a.artifact.resolve()
        if not ((art / "manifest.json").is_file() or (art / "tokenizer.meta.json").is_file()):
            print(f"error: {a.artifact} has no manifest.json; pass an edgellm artifact directory "
                  f"(export one with python -m export --target onnx)", file=sys.stderr)
            return 2
    handler = functools.partial(Handler, artifact=art, quiet=a.quiet)
    srv = http.server.ThreadingHTTPServer((a.host, a.port), handler)
    host = "127.0.0.1" if a.host in ("0.0.0.0", "") else a.host
    print(f"serving http://{host}:{srv.server_address[1]}/ (artifact: {art or 'none'})", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
