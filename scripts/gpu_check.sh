#!/usr/bin/env bash
# The GPU check, prepared for a lent device machine (PyTorch with CUDA, no TensorFlow).
#
# Runs the GPU tests (tests/bench/test_torch_backend.py) and a torch-backend grid of the
# xception65 train step (512 and 2048 px, float32 and mixed_bfloat16, remat none, blocks and
# full, plus 4096 px bfloat16 full), each measured beside its replay on fake tensors, in
# under 8 minutes; rows and logs go under $OUT (default runs/gpu-check). Keras is
# not installed on those machines: fetch its wheels into .whl/ here first, carry them, and
# this script installs them to /tmp/site before anything else.
#
#   here:   bash scripts/gpu_check.sh --fetch-wheels
#   there:  bash scripts/gpu_check.sh          (a device run with carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --fetch-wheels ]; then
  keras_version=$(.venv/bin/python -c "import keras; print(keras.__version__)" 2> /dev/null) || exit 1
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "keras==$keras_version" namex optree tqdm nvidia-ml-py
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! python3 -c "import keras, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "gpu_check: needs PyTorch with a CUDA GPU and Keras (here: bash scripts/gpu_check.sh --fetch-wheels, then carry .whl)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
status=0
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/bench/test_torch_backend.py 2>&1 \
  | tee "$OUT/tests.log" || status=1
grid=(python3 -m bench.memory --backend torch --device gpu --steps 3 --quiet
  --out "$OUT/memory_torch_gpu_check.json")
timeout 270 "${grid[@]}" --sizes 512 2048 --precision float32 mixed_bfloat16 \
  --remat none blocks full 2>&1 | tee "$OUT/grid.log" || status=1
timeout 60 "${grid[@]}" --sizes 4096 --precision mixed_bfloat16 --remat full 2>&1 \
  | tee -a "$OUT/grid.log" || status=1
exit $status
