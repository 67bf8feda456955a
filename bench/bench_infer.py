"""Inference speed: each member against the ensemble, one compiled graph, large batches.

    python bench/bench_infer.py                       # small on a CPU, full on a GPU
    python bench/bench_infer.py --weights-dir weights # trained members instead of fresh ones

For each precision (float32, and bfloat16 mixed precision where an accelerator is
present) it times `predict` at one large batch for every member and for the
averaged ensemble built by `ensemble.ensemble` (the graph `--export` writes), in
this one process on the same images, and prints images per second, the ensemble's
time against the sum of its members' times (the target: at most 1.05), and a
check that the ensemble's output is the mean of the members' outputs. On JAX it
also times the compiled forward pass alone on images already on the device, which
is the graph's own speed without host transfers. Weights do not change the
speed, so fresh members are used unless --weights-dir is given.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import keras
import numpy as np

import ensemble
from ensembling import backend
from ensembling.checkpoints import best_checkpoint
from ensembling.report import aligned
from models import MODELS


def timed(function, repeats):
    """Median seconds of `repeats` calls, after one warm-up call (compiling)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_forward(model, images, batch_size):
    """JAX only: a function running the compiled forward pass over device-resident images."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    batches = jnp.asarray(images[: len(images) // batch_size * batch_size]).reshape(
        -1, batch_size, *images.shape[1:]
    )
    forward = jax.jit(lambda x: model.stateless_call(trainable, non_trainable, x)[0])

    def run():
        outputs = [forward(batch) for batch in batches]
        jax.block_until_ready(outputs)

    return run, batches.shape[0] * batch_size


def measure(precision, images, batch_size, repeats, weights_dir):
    with backend.DtypePolicy(precision):
        model_input = keras.Input(shape=images.shape[1:])
        members = {}
        for name in MODELS:
            members[name] = MODELS[name](model_input)
            checkpoint = best_checkpoint(weights_dir, name) if weights_dir else None
            if checkpoint:
                members[name].load_weights(str(checkpoint))
            elif weights_dir:
                print(f"no checkpoint of {name} in {weights_dir}: fresh weights")
        combined = ensemble.ensemble(list(members.values()), model_input)
    rows = {}
    outputs = {}
    for name, model in [*members.items(), ("ensemble", combined)]:

        def predict(model=model, name=name):
            outputs[name] = model.predict(images, batch_size=batch_size, verbose=0)

        seconds = timed(predict, repeats)
        row = {"predict_s": seconds, "predict_images_per_s": len(images) / seconds}
        if keras.backend.backend() == "jax":
            run, count = device_forward(model, images, batch_size)
            device_seconds = timed(run, repeats)
            row.update(device_s=device_seconds, device_images_per_s=count / device_seconds)
        rows[name] = row
    mean = np.mean([outputs[name] for name in members], axis=0)
    deviation = float(np.max(np.abs(outputs["ensemble"] - mean)))
    members_sum = sum(rows[name]["predict_s"] for name in members)
    result = {
        "rows": rows,
        "ensemble_vs_members_sum": rows["ensemble"]["predict_s"] / members_sum,
        "max_abs_difference_from_mean": deviation,
    }
    if "device_s" in rows["ensemble"]:
        device_sum = sum(rows[name]["device_s"] for name in members)
        result["device_ensemble_vs_members_sum"] = rows["ensemble"]["device_s"] / device_sum
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", help="load the best checkpoints from here")
    parser.add_argument("--images", type=int, help="images per pass (GPU 20,480; CPU 2,048)")
    parser.add_argument("--batch-size", type=int, help="GPU 2,048; CPU 256")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--out", default="bench/out", help="folder for infer.json")
    args = parser.parse_args(argv)

    on_accelerator = backend.has_accelerator()
    images = args.images or (20_480 if on_accelerator else 2_048)
    batch_size = args.batch_size or (2_048 if on_accelerator else 256)
    precisions = ["float32", "mixed_bfloat16"] if on_accelerator else ["float32"]
    # Random pixels, not zeros: some kernels run faster on zeros than on real data.
    x = np.random.default_rng(0).random((images, 32, 32, 3), dtype=np.float32)
    devices = backend.devices()
    print(f"{images} images, batch {batch_size}, {args.repeats} timed passes; devices {devices}")

    results = {p: measure(p, x, batch_size, args.repeats, args.weights_dir) for p in precisions}

    device = keras.backend.backend() == "jax"
    header = ["precision", "model", "predict img/s", *(["on-device img/s"] if device else [])]
    lines = []
    for precision, result in results.items():
        for name, row in result["rows"].items():
            cells = [precision, name, f"{row['predict_images_per_s']:,.0f}"]
            if device:
                cells.append(f"{row['device_images_per_s']:,.0f}")
            lines.append(cells)
    print(aligned(header, lines, right_from=2))
    for precision, result in results.items():
        ratio = result["ensemble_vs_members_sum"]
        line = f"{precision}: ensemble time / sum of members' = {ratio:.3f} (predict)"
        if "device_ensemble_vs_members_sum" in result:
            line += f", {result['device_ensemble_vs_members_sum']:.3f} (on device)"
        line += f"; ensemble - mean of members: {result['max_abs_difference_from_mean']:.1e}"
        print(line)
    versions = f"keras {keras.__version__} on {keras.backend.backend()}"
    print(f"{versions}   {platform.node()} {platform.machine()}")
    report = {
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "devices": devices,
        "images": images,
        "batch_size": batch_size,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
