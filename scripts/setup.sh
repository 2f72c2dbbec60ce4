#!/usr/bin/env bash
# histoseg set-up: one command, idempotent, quick when everything is already installed.
#   bash scripts/setup.sh
# Makes .venv (Python >= 3.10), installs histoseg with its dev tools and PyTorch's CPU build,
# then builds Horovod 0.28.1 against the installed TensorFlow (scripts/build_horovod.sh). A
# failed Horovod build is reported in one line; everything that does not need Horovod works.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $("$PYTHON_BIN" --version)"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Re-install only when the declared dependencies changed since the last successful set-up.
stamp="$VENV/.histoseg-setup"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing histoseg and its dependencies into $VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
else
    echo "setup: dependencies already installed ($VENV)"
fi

# PyTorch's CPU build (~200 MB) for the torch backend of the memory harness
# (bench.memory --backend torch), so its rules are developed and tested without a GPU.
# A machine that brings its own PyTorch (a CUDA build) keeps it; HISTOSEG_TORCH=0 skips it.
if [ "${HISTOSEG_TORCH:-1}" != "0" ] && ! "$PY" -c "import torch" 2> /dev/null; then
    echo "setup: installing PyTorch's CPU build (HISTOSEG_TORCH=0 skips it)"
    "$PY" -m pip install --quiet "torch==${HISTOSEG_TORCH_VERSION:-2.13.0+cpu}" \
        || echo "setup: PyTorch not installed; the torch-backend tests will be skipped"
fi

bash scripts/build_horovod.sh "$PY"
echo "setup: done. Run the tests with: $VENV/bin/python -m pytest"
