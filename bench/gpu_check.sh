#!/usr/bin/env bash
# One device call: the article's full recipe and --joint, side by side, on the GPU.
# Stage first, from the project root:  bash ../shared/tools/device-prep
# Then run this through the device tool with carry [".device"]; it writes to $OUT.
# Try it on a CPU first:  OUT=/tmp/out bash bench/gpu_check.sh --small
set -euo pipefail
if [ -d .device/whl ] && ! python3 -c 'import keras' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
out=${OUT:-bench/out}
mkdir -p "$out"
nvidia-smi -L 2>/dev/null || echo "no NVIDIA GPU visible"
python3 -c 'import keras, jax; print("keras", keras.__version__, "jax", jax.__version__, jax.devices())'
python3 bench/bench_train.py --data-dir .device/data/cifar10-jpeg.tar.gz --out "$out" "$@" \
  2>&1 | tee "$out/log.txt"
