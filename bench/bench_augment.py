"""What on-device augmentation costs: the preset's training epoch with and without it.

    python bench/bench_augment.py --data-dir ../shared/data/cifar10-jpeg.tar.gz

Trains the `--preset fast` step (every member, bf16 on an accelerator, batch 512)
for a few epochs twice in this one process on the same data, once with
`recipe.Augment` between the input and each member and once without, and prints
the median time of the epochs after the first (which compiles) and their ratio.
No files are written besides augment.json (after each case). Small on a CPU
(2,000 images), the whole training set on a GPU.
"""

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import keras

import data
from ensembling import backend, joint
from ensembling.settings import settings_from
from models import MODELS


def epoch_seconds(settings, x_train, y_train):
    with backend.DtypePolicy(settings.precision):
        model_input = keras.Input(shape=x_train.shape[1:])
        members = [MODELS[name](model_input) for name in settings.models]
        trained = joint.train_jointly(
            members, settings.epochs, x_train, y_train, settings, lambda member: []
        )
    return trained.epoch_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 source, as ensemble.py")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per case (first compiles)")
    parser.add_argument("--limit", type=int, help="images (GPU: all; CPU: 2,000)")
    parser.add_argument("--out", default="bench/out", help="folder for augment.json")
    args = parser.parse_args(argv)

    on_accelerator = backend.has_accelerator()
    limit = args.limit or (None if on_accelerator else 2_000)
    settings = settings_from(
        {"preset": "fast", "epochs": args.epochs, "limit": limit, "data_dir": args.data_dir}
    )
    keras.utils.set_random_seed(settings.seed)
    (x_train, y_train), _ = data.load_data(args.data_dir, limit=limit, seed=settings.seed)
    images = len(x_train) * (1 - settings.validation_split)
    devices = backend.devices()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "devices": devices,
              "versions": f"keras {keras.__version__} on {keras.backend.backend()}",
              "precision": settings.precision, "images": int(images), "results": {}}  # fmt: skip
    results = report["results"]
    for augment in (False, True):
        case = dataclasses.replace(settings, augment=augment)
        times = epoch_seconds(case, x_train, y_train)
        results["augment" if augment else "plain"] = {
            "first_epoch_s": round(times[0], 2),
            "later_epoch_s": round(statistics.median(times[1:]), 3),
        }
        # After each case: a run stopped from outside keeps the plain figure.
        (out / "augment.json").write_text(json.dumps(report, indent=2) + "\n")
    ratio = results["augment"]["later_epoch_s"] / results["plain"]["later_epoch_s"]
    report["ratio"] = round(ratio, 3)
    (out / "augment.json").write_text(json.dumps(report, indent=2) + "\n")
    for case, r in results.items():
        rate = images * len(settings.models) / r["later_epoch_s"]
        print(f"{case:>8}: epoch {r['later_epoch_s']:.3f} s after a first of "
              f"{r['first_epoch_s']:.1f} s; {rate:,.0f} member-images/s")  # fmt: skip
    case = f"{settings.precision}, batch {settings.batch_size}, {int(images)} images, {devices}"
    print(f"augmentation costs {100 * (ratio - 1):+.1f}% of a training epoch ({case})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
