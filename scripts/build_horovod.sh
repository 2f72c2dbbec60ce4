#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against the TensorFlow already installed.
#
# Usage: scripts/build_horovod.sh [PYTHON]      (or PYTHON=/path/to/python scripts/build_horovod.sh)
#
# Why a script: `pip install horovod` fails against TF 2.21 because
# horovod/tensorflow/xla_mpi_ops.cc includes XLA headers that have moved. Dropping that one
# source file from the CMake build loses only Horovod's XLA custom-call ops; everything the
# training engine uses (grouped_allreduce, broadcast_variables, Gloo) still works.
#
# Idempotent: exits 0 at once when `import horovod.tensorflow` already works. Never fails the
# caller: on any error it prints one line saying so and exits 0, because everything in
# histoseg except the horovod engine works without Horovod.
set -u

PY="${1:-${PYTHON:-python}}"
VERSION="0.28.1"

fail() {
    echo "horovod: build failed ($1); everything that does not need Horovod still works" >&2
    exit 0
}

if ! "$PY" -c "import sys" >/dev/null 2>&1; then
    fail "python '$PY' not found"
fi

if "$PY" -c "import horovod.tensorflow" >/dev/null 2>&1; then
    echo "horovod: already installed ($("$PY" -c 'import horovod; print(horovod.__version__)' 2>/dev/null))"
    exit 0
fi

if ! "$PY" -c "import tensorflow" >/dev/null 2>&1; then
    fail "TensorFlow is not importable by $PY; install it first"
fi
for tool in cmake g++; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found on PATH"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/build.log"

echo "horovod: downloading the $VERSION source distribution"
"$PY" -m pip download --quiet --no-binary :all: --no-deps "horovod==$VERSION" -d "$WORK" \
    >>"$LOG" 2>&1 || { tail -n 5 "$LOG" >&2; fail "pip download horovod==$VERSION failed (no network or index?)"; }

SDIST="$(ls "$WORK"/horovod-"$VERSION".tar.gz 2>/dev/null | head -n 1)"
[ -n "$SDIST" ] || fail "no horovod-$VERSION.tar.gz was downloaded"
tar -xzf "$SDIST" -C "$WORK" || fail "could not unpack $SDIST"
SRC="$WORK/horovod-$VERSION"

CMAKE_FILE="$SRC/horovod/tensorflow/CMakeLists.txt"
[ -f "$CMAKE_FILE" ] || fail "$CMAKE_FILE missing from the sdist"
# Drop the XLA custom-call source; it no longer compiles against TF >= 2.16 headers.
sed -i '/xla_mpi_ops\.cc/d' "$CMAKE_FILE"
if grep -q 'xla_mpi_ops' "$CMAKE_FILE"; then
    fail "could not remove xla_mpi_ops.cc from $CMAKE_FILE"
fi

echo "horovod: compiling against $("$PY" -c 'import tensorflow as tf; print("tensorflow", tf.__version__)' 2>/dev/null) (a few minutes)"
if ! HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc 2>/dev/null || echo 2)" \
    "$PY" -m pip install --no-build-isolation --no-cache-dir "$SRC" >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    fail "pip install of the patched sdist failed; the last 20 lines of its log are above"
fi

if ! "$PY" -c "import horovod.tensorflow" >/dev/null 2>&1; then
    fail "installed, but 'import horovod.tensorflow' still fails"
fi
echo "horovod: built and installed $VERSION with TensorFlow and Gloo"
