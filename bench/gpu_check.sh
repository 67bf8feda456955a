#!/usr/bin/env bash
# One device call, at most 8 minutes, that measures every speed claim. Steps, in order
# (STEPS="equal step ..." picks and orders them; default: joint preset infer augment):
#   joint    the article's recipe: --joint in full, the plain path for 2 epochs (its rate);
#   preset   --preset fast, end to end (target: ensemble error <= 10% within 300 s);
#   distill  a student distilled from the preset step's members under the same preset
#            (STUDENT, default: the member with the lowest validation error), with
#            the teacher and the student's architecture alone beside it;
#   distill_article  the same from the joint step's members, under the article's recipe;
#   infer    inference: members against the one-graph ensemble, float32 and bfloat16;
#   augment  augmentation's cost (bench_augment.py);
#   equal    the joint loop against Keras' fit on the same batches (bench_equal.py);
#   step     compiler settings against the joint epoch's time (bench_step.py; STEP_VARIANTS
#            picks them, comma-separated);
#   parallel the plain path for 5 epochs, one member after the other, then with --parallel
#            (each member in a process of its own, all at once), and their speed ratio;
#   seeds    the plain path and --joint in full, with the seeds PLAIN_SEEDS (default "1 2 3")
#            and JOINT_SEEDS (default "2"; set but empty, e.g. PLAIN_SEEDS="", runs none of
#            that path), PARALLEL runs at a time (default: all), compared
#            with the earlier GPU runs in bench/seed_runs.json (bench_seeds.py);
# then a short table (bench/summary.py). Each step has its own time limit and is skipped
# when too little of LIMIT seconds (default 480) is left, so that the table always prints.
# Stage first, from the project root:  bash ../shared/tools/device-prep
# Then run this through the device tool with carry [".device"]; it writes to $OUT
# (at most 8 files: the device tool's limit).
# Try it on a CPU first:  OUT=/tmp/out STEPS="joint equal step" bash bench/gpu_check.sh --small
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
# At most $1 seconds, and never past the overall limit less 10 s for the table.
budget() {
  local left=$((limit - $(elapsed) - 10))
  left=$((left < $1 ? left : $1))
  echo $((left > 1 ? left : 1))  # timeout 0 would mean no limit at all
}
is_small() { [ "$small" = "--small" ]; }

step_joint() {
  timeout "$1" python3 bench/bench_train.py --data-dir "$data" --out "$out" --work "$work/train" \
    --plain-epochs 2 $small
}
step_preset() {
  # FAST_FLAGS adds flags to the preset's run, e.g. FAST_FLAGS="--weight-decay 0.05".
  local flags
  read -r -a flags <<< "${FAST_FLAGS:-}"
  # --small: 600 images, so that a try-out on a 2-core CPU (under 30 s an epoch for all
  # three members) finishes inside the step's 320 s even when a member dies and restarts;
  # 2,000 images took 75 s an epoch there and never did. 3 epochs: the preset's warm-up
  # takes 2, and --warmup-epochs must be fewer than --epochs.
  is_small && flags+=(--limit 600 --epochs 3 --batch-size 64)
  local t0
  t0=$(date +%s.%N)
  timeout "$1" python3 ensemble.py --preset fast --data-dir "$data" --no-cost \
    --weights-dir "$work/fast/weights" --logs-dir "$work/fast/logs" ${flags[@]+"${flags[@]}"}
  # A file, not a variable: the step runs in a pipeline's subshell.
  python3 -c "import time; print(round(time.time() - $t0, 1))" > "$work/fast_wall"
  cp "$work/fast/logs/results.json" "$out/fast_results.json" 2>/dev/null
}
step_distill() {
  # The preset step's members teach: run it first (STEPS="preset distill").
  local flags=()
  is_small && flags=(--limit 600 --epochs 3 --batch-size 64)
  [ -n "${STUDENT:-}" ] && flags+=(--student "$STUDENT")
  timeout "$1" python3 ensemble.py distill --preset fast --data-dir "$data" \
    --weights-dir "$work/fast/weights" --logs-dir "$work/fast/logs" ${flags[@]+"${flags[@]}"}
  cp "$work/fast/logs/distill.json" "$out/fast_distill.json" 2>/dev/null
}
step_distill_article() {
  # The joint step's members (the article's recipe, 20 epochs) teach: run it first.
  local flags=()
  is_small && flags=(--limit 600 --epochs 1)
  [ -n "${STUDENT:-}" ] && flags+=(--student "$STUDENT")
  timeout "$1" python3 ensemble.py distill --data-dir "$data" \
    --weights-dir "$work/train/joint/weights" --logs-dir "$work/train/joint/logs" \
    ${flags[@]+"${flags[@]}"}
  cp "$work/train/joint/logs/distill.json" "$out/article_distill.json" 2>/dev/null
}
step_infer() {
  local flags=()
  is_small && flags=(--images 512 --batch-size 128 --repeats 2)
  # The preset's checkpoints when that step ran, random weights otherwise.
  timeout "$1" python3 bench/bench_infer.py --out "$out" --weights-dir "$work/fast/weights" \
    ${flags[@]+"${flags[@]}"}
}
step_augment() {
  timeout "$1" python3 bench/bench_augment.py --data-dir "$data" --out "$out" \
    $(is_small && echo "--limit 600 --epochs 2")
}
step_parallel() {
  timeout "$1" python3 bench/bench_train.py --data-dir "$data" --out "$out/parallel" \
    --work "$work/parallel" --parallel --no-joint --plain-epochs "$(is_small && echo 1 || echo 5)" \
    $small
}
step_seeds() {
  local plain joint
  # "-", not ":-": an empty PLAIN_SEEDS="" means no plain runs, not the default seeds.
  read -r -a plain <<< "${PLAIN_SEEDS-1 2 3}"
  read -r -a joint <<< "${JOINT_SEEDS-2}"
  # Its own budget, under the step's limit: it stops its runs, then prints what finished.
  timeout "$1" python3 bench/bench_seeds.py --data-dir "$data" --out "$out" --work "$work/seeds" \
    --plain-seeds "${plain[@]}" --joint-seeds "${joint[@]}" \
    --parallel "${PARALLEL:-$((${#plain[@]} + ${#joint[@]}))}" --budget $(($1 > 30 ? $1 - 15 : $1)) \
    --with bench/seed_runs.json $small
}
step_equal() {
  timeout "$1" python3 bench/bench_equal.py --data-dir "$data" --out "$out" \
    $(is_small && echo "--steps 1 10")
}
step_step() {
  # STEP_VARIANTS picks bench_step.py's variants, comma-separated (their names hold
  # spaces), e.g. STEP_VARIANTS="tf32,fp32,compile cache warm"; the baseline runs anyway.
  local variants=()
  [ -n "${STEP_VARIANTS:-}" ] && IFS=, read -r -a variants <<< "$STEP_VARIANTS"
  # Its own budget, under the step's limit: it skips what would not finish, then prints.
  timeout "$1" python3 bench/bench_step.py --out "$out" --budget $(($1 - 15)) $small \
    ${variants[@]+--variants "${variants[@]}"}
}
# Most seconds each step may take, and the least worth starting it with.
declare -A most=([joint]=200 [preset]=320 [distill]=240 [distill_article]=240 [infer]=100 [augment]=130 [equal]=150
                 [step]=240 [seeds]=560 [parallel]=240)
declare -A least=([joint]=120 [preset]=150 [distill]=120 [distill_article]=120 [infer]=40 [augment]=120 [equal]=100
                  [step]=150 [seeds]=300 [parallel]=150)

nvidia-smi -L 2>/dev/null || echo "no NVIDIA GPU visible"
python3 -c 'import keras, jax; print("keras", keras.__version__, "jax", jax.__version__, jax.devices())'
for name in ${STEPS:-joint preset infer augment}; do
  if [ -z "${most[$name]:-}" ]; then
    echo "unknown step $name; choose from ${!most[*]}" >&2
    exit 2
  fi
  seconds=$(budget "${most[$name]}")
  if [ "$seconds" -lt "${least[$name]}" ] && ! is_small; then
    echo "=== $name skipped: $seconds s left of LIMIT=$limit" | tee -a "$log"
    continue
  fi
  echo "=== $name (at $(elapsed) s, at most $seconds s)" | tee -a "$log"
  "step_$name" "$seconds" 2>&1 | tee -a "$log"
done

echo "=== summary ($(elapsed) s in all)" | tee -a "$log"
fast_wall=$(cat "$work/fast_wall" 2>/dev/null)
python3 bench/summary.py --out "$out" ${fast_wall:+--fast-wall "$fast_wall"} 2>&1 | tee -a "$log"
