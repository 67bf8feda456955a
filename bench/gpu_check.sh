#!/usr/bin/env bash
# One device call, at most 8 minutes, that measures every speed claim:
#   1. the article's recipe: --joint in full, the plain path for 2 epochs (its rate);
#   2. --preset fast, end to end (target: ensemble error <= 10% within 300 s);
#   3. inference: members against the one-graph ensemble, float32 and bfloat16;
#   4. if time is left, augmentation's cost (bench_augment.py), then
#   5. --joint again with seed 1 (its seed-to-seed spread);
# then a short table (bench/summary.py). Each step has its own time limit, and the
# whole stays under LIMIT seconds (default 480), so that the table always prints.
# Stage first, from the project root:  bash ../shared/tools/device-prep
# Then run this through the device tool with carry [".device"]; it writes to $OUT
# (at most 8 files: the device tool's limit).
# Try it on a CPU first:  OUT=/tmp/out bash bench/gpu_check.sh --small
set -uo pipefail
if [ -d .device/whl ] && ! python3 -c 'import keras' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
out=${OUT:-bench/out}
data=${DATA:-.device/data/cifar10-jpeg.tar.gz}
work=$(mktemp -d)
small=${1:-}
mkdir -p "$out"
log="$out/log.txt"
start=$(date +%s)
limit=${LIMIT:-480}
elapsed() { echo $(($(date +%s) - start)); }
# At most $1 seconds, and never past the overall limit less $2 kept for later steps.
budget() {
  local left=$((limit - $(elapsed) - $2))
  left=$((left < $1 ? left : $1))
  echo $((left > 1 ? left : 1))
}
nvidia-smi -L 2>/dev/null || echo "no NVIDIA GPU visible"
python3 -c 'import keras, jax; print("keras", keras.__version__, "jax", jax.__version__, jax.devices())'

echo "=== 1. article recipe: --joint, and the plain path's rate ($(elapsed) s)" | tee -a "$log"
timeout "$(budget 200 330)" python3 bench/bench_train.py --data-dir "$data" --out "$out" --work "$work/train" \
  --plain-epochs 2 $small 2>&1 | tee -a "$log"

echo "=== 2. --preset fast ($(elapsed) s)" | tee -a "$log"
# FAST_FLAGS adds flags to the preset's run, e.g. FAST_FLAGS="--weight-decay 0.05".
read -r -a fast_flags <<< "${FAST_FLAGS:-}"
[ "$small" = "--small" ] && fast_flags+=(--limit 2000 --epochs 3 --batch-size 64)
t0=$(date +%s.%N)
timeout "$(budget 320 60)" python3 ensemble.py --preset fast --data-dir "$data" --no-cost \
  --weights-dir "$work/fast/weights" --logs-dir "$work/fast/logs" ${fast_flags[@]+"${fast_flags[@]}"} \
  2>&1 | tee -a "$log"
fast_wall=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
cp "$work/fast/logs/results.json" "$out/fast_results.json" 2>/dev/null

echo "=== 3. inference ($(elapsed) s)" | tee -a "$log"
infer_flags=()
[ "$small" = "--small" ] && infer_flags=(--images 512 --batch-size 128 --repeats 2)
timeout "$(budget 100 10)" python3 bench/bench_infer.py --out "$out" --weights-dir "$work/fast/weights" \
  ${infer_flags[@]+"${infer_flags[@]}"} 2>&1 | tee -a "$log"

if [ "$(budget 130 10)" -ge 120 ]; then
  echo "=== 4. augmentation's cost ($(elapsed) s)" | tee -a "$log"
  timeout "$(budget 130 10)" python3 bench/bench_augment.py --data-dir "$data" --out "$out" \
    $([ "$small" = "--small" ] && echo "--limit 600 --epochs 2") 2>&1 | tee -a "$log"
fi

if [ "$(budget 120 10)" -ge 100 ]; then
  echo "=== 5. --joint with seed 1 ($(elapsed) s)" | tee -a "$log"
  timeout "$(budget 120 10)" python3 bench/bench_train.py --data-dir "$data" --out "$out/seed1" \
    --work "$work/seed1" --no-plain --seeds 1 $small 2>&1 | tee -a "$log"
fi

echo "=== summary ($(elapsed) s in all)" | tee -a "$log"
python3 bench/summary.py --out "$out" --fast-wall "$fast_wall" 2>&1 | tee -a "$log"
