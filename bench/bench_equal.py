"""Does the joint loop compute what Keras' `fit` computes, on this device?

    python bench/bench_equal.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python bench/bench_equal.py --data-dir ... --model conv_pool_cnn --steps 1 10 100

`--joint` has come out worse than the plain path on ALL-CNN-C in every GPU pairing
so far (bench/RESULTS.md). If both paths compute the same thing, that gap is chance:
a member's error then depends only on its initial weights and its batch order, and
both are drawn the same way on both paths. This checks "the same thing" on the
device itself, in about a minute and a half on a GPU. One member is trained for a given number
of steps (one epoch of 32 x steps images, real data, the article's settings), from
the same initial weights and on the same batches, four ways:

- `fit`: Keras' own `fit`, as the plain path;
- `again`: the same once more: the device's own run-to-run differences;
- `nudged`: `fit` from initial weights moved by one float32 rounding (each times
  1 + 6e-8 r, r standard normal): how fast rounding alone grows into different
  weights, which under Adam is fast (a weight with a near-zero gradient moves by
  the full step either way, depending on the gradient's sign);
- `joint`: the member inside `--joint`'s own program, `joint.train_jointly` with all
  three members (the other two from fixed initial weights): on a GPU with JAX the
  scanned loop (`--scan` forces it on a CPU), elsewhere `fit` on the joint model.

For each number of steps it prints the training loss of each run and how far the
weights of `again`, `nudged` and `joint` end from `fit`'s, relative to how far `fit`
moved them. A joint loop that computes what `fit` computes stays within rounding of
it: at the shortest horizons its distance is of the order of `nudged`'s or below
(zero on a CPU, where both run the same kernels). A different computation (another
step size, loss or gradient) shows from the first step on, far above `nudged`.
Writes equal.json next to bench.json.
"""

import argparse
import atexit
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import keras
import numpy as np

import data
import ensemble
from ensembling import backend, joint
from models import MODELS

ROUNDING = 2.0**-24  # float32's unit roundoff, about 6e-8
# NIN is left out: its dropout masks come from seed states that set_weights does not
# reset, so its runs would differ by their masks, not by their arithmetic.
CHOICES = ("all_cnn", "conv_pool_cnn")


def build(name, start, shape):
    model = MODELS[name](keras.Input(shape=shape))
    model.set_weights(start)
    return model


class Fit:
    """One compiled model for every `fit` run: reset to given weights and a fresh Adam."""

    def __init__(self, name, start, settings, shape):
        self.model = build(name, start, shape)
        self.settings = settings
        self.model.compile(
            loss=keras.losses.categorical_crossentropy,
            optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate),
            metrics=["acc"],
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.fresh = [variable.numpy() for variable in self.model.optimizer.variables]

    def __call__(self, weights, x_train, y_train):
        self.model.set_weights(weights)
        for variable, value in zip(self.model.optimizer.variables, self.fresh, strict=True):
            variable.assign(value)
        history = self.model.fit(
            x_train,
            y_train,
            batch_size=self.settings.batch_size,
            epochs=1,
            validation_split=self.settings.validation_split,
            shuffle=False,
            verbose=0,
        )
        return self.model.get_weights(), history.history["loss"][-1]


def train_joint(name, start, x_train, y_train, settings):
    """`name` from `start` inside the program `--joint` runs: every member in one step."""
    keras.utils.set_random_seed(settings.seed)  # the other members start alike every time
    model_input = keras.Input(shape=x_train.shape[1:])
    members = [MODELS[other](model_input) for other in MODELS]
    member = next(m for m in members if m.name == name)
    member.set_weights(start)
    keep = joint.epoch_order, joint.FIT_SHUFFLE
    # File order, as fit's shuffle=False: the scanned loop on JAX, fit elsewhere.
    joint.epoch_order, joint.FIT_SHUFFLE = (lambda rng, n: np.arange(n)), False
    try:
        trained = joint.train_jointly(members, 1, x_train, y_train, settings, lambda m: [])
    finally:
        joint.epoch_order, joint.FIT_SHUFFLE = keep
    return member.get_weights(), trained.histories[name]["loss"][-1]


def distance(weights, reference):
    pairs = zip(weights, reference, strict=True)
    return float(np.sqrt(sum(np.sum((np.asarray(w) - r) ** 2) for w, r in pairs)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 source, as ensemble.py")
    parser.add_argument("--model", default="all_cnn", choices=CHOICES)
    horizons_help = "training steps to compare after (GPU: 1 10 100 1250; CPU: 1 10 50)"
    parser.add_argument("--steps", type=int, nargs="+", help=horizons_help)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data subset")
    scan_help = "JAX: the scanned loop of a GPU even on a CPU (slow there)"
    parser.add_argument("--scan", action="store_true", help=scan_help)
    parser.add_argument("--out", default="bench/out", help="folder for equal.json")
    args = parser.parse_args(argv)

    if args.scan:
        joint.SCAN_EPOCHS = True
    horizons = args.steps or ([1, 10, 100, 1250] if backend.has_accelerator() else [1, 10, 50])
    base = ensemble.Settings()
    # 32 x steps training images, then the validation split's share: no partial batch.
    per_step = round(base.batch_size / (1 - base.validation_split))  # 40 images
    limit = per_step * max(horizons)
    (x_all, y_all), _ = data.load_data(args.data_dir, limit=min(limit, 50_000), seed=args.seed)
    keras.utils.set_random_seed(args.seed)
    shape = x_all.shape[1:]
    start = MODELS[args.model](keras.Input(shape=shape)).get_weights()
    rng = np.random.default_rng(args.seed)
    nudged = [w * (1 + ROUNDING * rng.standard_normal(w.shape)).astype(w.dtype) for w in start]
    work = tempfile.mkdtemp(prefix="bench_equal_")  # the joint path's per-epoch backup
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # nothing in it is a result
    settings = ensemble.Settings(epochs=1, seed=args.seed, weights_dir=work)
    fit = Fit(args.model, start, settings, shape)

    devices = backend.devices()
    versions = f"keras {keras.__version__} on {keras.backend.backend()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "versions": versions,
              "devices": devices, "model": args.model, "results": {}}  # fmt: skip
    results = report["results"]
    for steps in horizons:
        x, y = x_all[: per_step * steps], y_all[: per_step * steps]
        runs = {
            "fit": fit(start, x, y),
            "again": fit(start, x, y),
            "nudged": fit(nudged, x, y),
            "joint": train_joint(args.model, start, x, y, settings),
        }
        reference = runs["fit"][0]
        moved = distance(reference, start)
        distances = {label: distance(w, reference) / moved for label, (w, _) in runs.items()}
        del distances["fit"]
        losses = {label: float(loss) for label, (_, loss) in runs.items()}
        results[steps] = {"loss": losses, "distance": distances}
        # After every horizon: a run stopped from outside keeps the ones it finished.
        (out / "equal.json").write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"{steps} steps: loss fit {losses['fit']:.6f}, joint {losses['joint']:.6f}; distance "
            f"from fit: again {distances['again']:.2e}, nudged {distances['nudged']:.2e}, "
            f"joint {distances['joint']:.2e}",
            flush=True,
        )

    from ensembling.report import aligned

    header = ["steps", "loss: fit", "joint", "distance from fit: again", "nudged", "joint"]
    lines = [
        [str(steps), f"{r['loss']['fit']:.6f}", f"{r['loss']['joint']:.6f}",
         f"{r['distance']['again']:.2e}", f"{r['distance']['nudged']:.2e}",
         f"{r['distance']['joint']:.2e}"]
        for steps, r in results.items()
    ]  # fmt: skip
    print(f"\n{args.model}, batch {base.batch_size}, Adam {base.learning_rate}; distances are "
          "relative to how far fit moved the weights")  # fmt: skip
    print(aligned(header, lines))
    print(f"{versions}   {devices}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
