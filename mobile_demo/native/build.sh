#!/usr/bin/env bash
# Build edgellm_run against the ExecuTorch runtime in the project's Python environment.
#   mobile_demo/native/build.sh [BUILD_DIR]      (default: <repo>/build/native)
# Environment: PYTHON (default <repo>/.venv/bin/python, else python3) = the interpreter whose
# `executorch` wheel provides headers + libraries. On a fresh Debian/Ubuntu machine, running as
# root, missing tools (g++, cmake, PCRE2 headers) are installed with apt-get.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$REPO/build/native}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

need=()
command -v g++ >/dev/null || need+=(g++)
command -v cmake >/dev/null || need+=(cmake)
command -v make >/dev/null || need+=(make)
[ -f /usr/include/pcre2.h ] || need+=(libpcre2-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "build.sh: installing ${need[*]} with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
  else
    echo "build.sh: error: missing ${need[*]}; install them (e.g. sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

ET_CMAKE="$("$PYTHON" -c 'import executorch, os; print(os.path.join(list(executorch.__path__)[0], "share", "cmake"))')" \
  || { echo "build.sh: error: $PYTHON cannot import executorch; set PYTHON to the venv that has it" >&2; exit 1; }
[ -f "$ET_CMAKE/executorch-config.cmake" ] \
  || { echo "build.sh: error: no executorch-config.cmake under $ET_CMAKE; this executorch wheel ships no C++ runtime" >&2; exit 1; }

cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -Dexecutorch_DIR="$ET_CMAKE" >&2
cmake --build "$BUILD" -j"$(nproc)" >&2
echo "$BUILD/edgellm_run"
