#!/usr/bin/env bash
# A separate venv for llama.cpp (PyPI `llama-cpp-python`, built here from its source package),
# the peer of bench/llamacpp_compare.py. Never a project dependency and never built at install
# time: it lives in bench/.llamacpp-venv (gitignored) and is only ever run as a subprocess.
# The build compiles llama.cpp's CPU backend for this machine (-march=native, OpenMP); a few
# minutes on 2 cores. Idempotent: rerunning it re-checks the install.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.llamacpp-venv"
PY="${PYTHON:-python3.11}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    # the source package only (no prebuilt wheel), built for this CPU
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
