#!/usr/bin/env bash
# histoseg set-up: one command, idempotent, quick when everything is already installed.
#   bash scripts/setup.sh
# Makes .venv (Python >= 3.10), installs histoseg with its dev tools, then builds Horovod
# 0.28.1 against the installed TensorFlow (scripts/build_horovod.sh). A failed Horovod build
# is reported in one line; everything that does not need Horovod still works.
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

bash scripts/build_horovod.sh "$PY"
echo "setup: done. Run the tests with: $VENV/bin/python -m pytest"
