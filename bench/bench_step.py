"""Compiler settings against the time of a faithful `--joint` epoch (JAX).

    python bench/bench_step.py                      # every variant, each in a fresh process
    python bench/bench_step.py --variants baseline "unroll 4"

`--joint` trains the article's recipe in 71.5 s on one H100 against the 60 s that
issue 5 asks for: 19 epochs of 2.87 s (2.3 ms a step for all three members at batch 32
in float32) and a 12 s compile. This measures which compiler settings change those two
figures. Each variant runs in a process of its own (XLA reads its flags once, at
start-up) on synthetic data of CIFAR-10's shape: random images and labels, since the
speed of a step does not depend on the values. The settings are the article's (batch
32, Adam at 1e-3, float32, validation split 0.2), all three members in the joint step,
a few epochs. Per variant it prints the first epoch (which compiles), the median later
epoch, milliseconds per step, the arithmetic rate that implies (XLA's count of a
step's floating-point operations, taken once on the CPU, over its time) and the ratio
to the baseline run in the same invocation; step.json is rewritten after every
variant, so a run stopped from outside keeps what it measured. The baseline runs first
and, time allowing, again last: their ratio shows how far the machine drifted, and the
variants are compared with the mean of the two. `--budget S` skips the variants that
would not finish within S seconds (estimated from the slowest process so far).
Measured on an H100 (bench/RESULTS.md, 2026-11-27 and 2026-11-28): none of them cuts
the step, which runs at about 50 TFLOP/s; the baseline is the `tf32` variant, and full
float32 (`fp32`) is 3.0x slower.

- `unroll N`: N steps per iteration of the scanned loop (`joint.SCAN_UNROLL`);
- `command buffers`: XLA records the loop itself, not just its kernels, as CUDA
  graphs (`--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`; GPU only);
- `autotune off`: no timing of convolution algorithms while compiling (GPU only);
- `tf32` / `fp32`: float32 convolutions on tensor cores at TensorFloat-32, or in
  full float32 (`JAX_DEFAULT_MATMUL_PRECISION`): which of the two the baseline
  matches tells what JAX does by default;
- `compile cache warm`: JAX's persistent compilation cache
  (`JAX_COMPILATION_CACHE_DIR`, the README's tip), the first epoch of a second
  process after a first one filled the cache.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMAND_BUFFERS = "xla_gpu_enable_command_buffer"


class Variant(NamedTuple):
    environment: dict
    unroll: int = 1  # joint.SCAN_UNROLL
    gpu_only: bool = False
    warm: bool = False  # measure a second process, after a first filled the compile cache


# In the order they run: the one not yet measured on a GPU first, then those measured
# on 2026-11-28 (TF32 is the default) and 2026-11-27 (none cut the step), autotuning
# off last (it ran past its 90 s there).
VARIANTS = {
    "baseline": Variant({}),
    # The README's tip: JAX keeps compiled programs on disk for the next run.
    "compile cache warm": Variant({"JAX_COMPILATION_CACHE_DIR": "{cache}"}, warm=True),
    "tf32": Variant({"JAX_DEFAULT_MATMUL_PRECISION": "tensorfloat32"}),
    "fp32": Variant({"JAX_DEFAULT_MATMUL_PRECISION": "float32"}),
    "unroll 4": Variant({}, unroll=4),
    # XLA's defaults (as of early 2025) put runs of kernels into CUDA graphs, not loops.
    "command buffers": Variant(
        {"XLA_FLAGS": f"--{COMMAND_BUFFERS}=+WHILE,+CONDITIONAL"}, gpu_only=True
    ),
    "autotune off": Variant({"XLA_FLAGS": "--xla_gpu_autotune_level=0"}, gpu_only=True),
}
CHILD_ENVIRONMENT = dict(os.environ)  # as given, before main() changes its own
SMALL = {"images": 400, "epochs": 2}  # a CPU: checks the machinery, not the speed
FULL = {"images": 50_000, "epochs": 3}


def measure(unroll, images, epochs):
    """This process: epoch seconds of the article's joint step on synthetic data."""
    import keras
    import numpy as np
    from bench_augment import epoch_seconds  # the same joint run, timed the same way

    import ensemble
    from ensembling import backend, joint

    joint.SCAN_UNROLL = unroll
    rng = np.random.default_rng(0)
    x = rng.random((images, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, images), 10).astype("float32")
    with tempfile.TemporaryDirectory() as work:
        settings = ensemble.Settings(epochs=epochs, weights_dir=work)
        keras.utils.set_random_seed(0)
        seconds = epoch_seconds(settings, x, y)
    steps = -(-int(images * (1 - settings.validation_split)) // settings.batch_size)
    return {"epoch_seconds": [round(s, 3) for s in seconds], "steps": steps,
            "devices": backend.devices(),
            "versions": f"keras {keras.__version__} on {keras.backend.backend()}"}  # fmt: skip


def step_gflop(batch_size=32):
    """{member: GFLOP}: XLA's count of the floating-point operations in one training
    step of each member (forward and backward, at the article's batch)."""
    import jax
    import keras
    import numpy as np

    from models import MODELS

    # Counted on the CPU from the lowered program: the count does not depend on the
    # device, and this process leaves the GPU's memory to the variants' processes.
    with jax.default_device(jax.devices("cpu")[0]):
        x = np.zeros((batch_size, 32, 32, 3), np.float32)
        y = np.zeros((batch_size, 10), np.float32)
        counts = {}
        for name, build in MODELS.items():
            model = build(keras.Input(shape=(32, 32, 3)))
            trainable = [v.value for v in model.trainable_variables]
            rest = [v.value for v in model.non_trainable_variables]

            def loss(trainable, model=model, rest=rest):
                out, _ = model.stateless_call(trainable, rest, x, training=True)
                return keras.ops.mean(keras.losses.categorical_crossentropy(y, out))

            cost = jax.jit(jax.grad(loss)).lower(trainable).cost_analysis()
            counts[name] = (cost[0] if isinstance(cost, list) else cost)["flops"] / 1e9
    return counts


def run_variant(name, case, timeout):
    variant = VARIANTS[name]
    with tempfile.TemporaryDirectory() as cache:
        env = {**CHILD_ENVIRONMENT, "KERAS_BACKEND": "jax"}
        for key, value in variant.environment.items():
            value = value.format(cache=cache)
            env[key] = f"{env.get(key, '')} {value}".strip() if key == "XLA_FLAGS" else value
        cold = None
        if variant.warm:
            cold = run_process(variant.unroll, case, env, timeout)
            if "failed" in cold:
                return cold
        result = run_process(variant.unroll, case, env, timeout)
    if cold is not None and "failed" not in result:
        result["cold_first_epoch_s"] = cold["first_epoch_s"]
    return result


def run_process(unroll, case, env, timeout):
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--one", str(unroll), result.name,
                   str(case["images"]), str(case["epochs"])]  # fmt: skip
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"failed": f"over {timeout} s"}
        wall = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"failed": f"exit {done.returncode}: {last[:160]}"}
        measured = json.loads(Path(result.name).read_text())
    epochs = measured["epoch_seconds"]
    later = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    return {**measured, "process_seconds": round(wall, 1), "first_epoch_s": epochs[0],
            "later_epoch_s": round(later, 3),
            "ms_per_step": round(1000 * later / measured["steps"], 3)}  # fmt: skip


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--one"]:  # a variant's own process
        unroll, out, images, epochs = sys.argv[2:6]
        result = measure(int(unroll), int(images), int(epochs))
        Path(out).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--small", action="store_true", help="the CPU case even on a GPU")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per variant")
    parser.add_argument("--budget", type=float, help="seconds for all variants (default: none)")
    parser.add_argument("--out", default="bench/out", help="folder for step.json")
    args = parser.parse_args(argv)

    # This process only asks which devices JAX sees: it must not take the GPU's
    # memory (JAX reserves most of it on first use) from the variants' processes.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from ensembling import backend

    gpu = backend.has_accelerator()
    case = SMALL if args.small or not gpu else FULL
    # "baseline again" reruns the baseline last: the machine's drift over the run.
    runs = [("baseline", "baseline")]
    runs += [(n, n) for n in args.variants if n != "baseline"] + [("baseline again", "baseline")]
    counts = step_gflop()
    gflop = sum(counts.values())
    print(f"case: {case}, the article's settings, all three members in the joint step")
    each = ", ".join(f"{name} {count:.1f}" for name, count in counts.items())
    print(f"one step of all three at batch 32: {gflop:.1f} GFLOP ({each}; XLA's count)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "case": case, "gflop_per_step": gflop,
              "results": {}}  # fmt: skip
    results, start, slowest = report["results"], time.perf_counter(), 0.0
    for name, variant in runs:
        left = None if args.budget is None else args.budget - (time.perf_counter() - start)
        processes = 2 if VARIANTS[variant].warm else 1
        if VARIANTS[variant].gpu_only and not gpu:
            results[name] = {"failed": "skipped: GPU only"}
        elif left is not None and left < processes * 1.1 * slowest + 5:
            results[name] = {"failed": f"skipped: {left:.0f} s left of --budget {args.budget:g}"}
        else:
            timeout = args.timeout if left is None else max(1, min(args.timeout, int(left)))
            results[name] = run_variant(variant, case, timeout)
            slowest = max(slowest, results[name].get("process_seconds", 0.0))
        (out / "step.json").write_text(json.dumps(report, indent=2) + "\n")
        r = results[name]
        shown = r.get("failed") or f"epochs {r['epoch_seconds']}; {r['ms_per_step']} ms a step"
        print(f"{name}: {shown}", flush=True)

    from ensembling.report import aligned

    baselines = [results[n]["later_epoch_s"] for n in ("baseline", "baseline again")
                 if "failed" not in results[n]]  # fmt: skip
    base = statistics.mean(baselines) if baselines else None
    lines = []
    for name, r in results.items():
        if "failed" in r:
            lines.append([name, "-", "-", "-", "-", "-", r["failed"]])
            continue
        ratio = f"{r['later_epoch_s'] / base:.3f}" if base else "-"
        rate = f"{gflop / r['ms_per_step']:.1f}"  # GFLOP per ms is TFLOP/s
        note = (f"first epoch {r['cold_first_epoch_s']:.1f} s with the cache empty"
                if "cold_first_epoch_s" in r else "")  # fmt: skip
        lines.append([name, f"{r['first_epoch_s']:.1f}", f"{r['later_epoch_s']:.3f}",
                      f"{r['ms_per_step']:.3f}", rate, ratio, note])  # fmt: skip
    header = ["variant", "first epoch s", "later epoch s", "ms/step", "TFLOP/s", "vs baseline",
              "note"]  # fmt: skip
    print()
    print(aligned(header, lines))
    if len(baselines) == 2:
        print(f"baseline drift: the last run's epoch / the first's = "
              f"{baselines[1] / baselines[0]:.3f}; ratios are against their mean")  # fmt: skip
    found = next((r for r in results.values() if "versions" in r), {})
    print(f"{found.get('versions', '')}   {found.get('devices', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
