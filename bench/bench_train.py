"""Training speed: the article's recipe one member at a time against `--joint`.

    python bench/bench_train.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python bench/bench_train.py --data-dir ... --full      # the whole recipe (GPU)

Both paths run in this one process on the same data with the same settings, so
their ratio holds on a shared, noisy machine. Without a GPU (or --full) it runs a
small case (2,000 images, 1 epoch) that finishes in minutes; on a GPU it runs the
article's full recipe. Prints images per second, training and wall time, the test
errors of every row, and the joint path's speed-up.
"""

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras

import ensemble

SMALL = {"limit": 2000, "epochs": 1}


def measure(settings):
    start = time.perf_counter()
    rows, extra = ensemble.run(settings)
    wall = time.perf_counter() - start
    extra["total_seconds"] = round(wall, 1)
    ensemble.save_results(settings, rows, extra)
    print(ensemble.format_table(rows))
    train_seconds = sum(extra["train_seconds"].values())
    trained = (settings.limit or 50_000) * (1 - settings.validation_split)
    images = trained * settings.epochs * len(settings.models)  # member-images seen
    return {
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "images_per_second": round(images / train_seconds),
        "attempts": extra["attempts"],
        "errors": {row["row"]: row["test_error"] for row in rows},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 source, as ensemble.py")
    parser.add_argument("--full", action="store_true", help="full recipe even without a GPU")
    parser.add_argument("--small", action="store_true", help="small case even on a GPU")
    parser.add_argument("--out", default="bench/out", help="folder for bench.json and results")
    parser.add_argument("--work", default=None, help="folder for weights and logs (temporary)")
    args = parser.parse_args(argv)

    devices = keras.distribution.list_devices()
    on_gpu = any(device.split(":")[0] in ("gpu", "cuda") for device in devices)
    full = args.full or (on_gpu and not args.small)
    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    out.mkdir(parents=True, exist_ok=True)
    base = ensemble.Settings(data_dir=args.data_dir, **({} if full else SMALL))
    print(f"case: {'full recipe' if full else SMALL}; devices {devices}; work in {work}")

    results = {}
    for path, joint in (("plain", False), ("joint", True)):
        settings = dataclasses.replace(
            base,
            joint=joint,
            weights_dir=str(work / path / "weights"),
            logs_dir=str(work / path / "logs"),
        )
        ensemble.check_settings(settings)
        print(f"\n=== {path}: {'all members in one step' if joint else 'one fit per member'}")
        results[path] = measure(settings)
        results_file = Path(settings.logs_dir) / ensemble.RESULTS_FILE
        (out / f"{path}_results.json").write_text(results_file.read_text())

    rows = list(results["plain"]["errors"])
    header = ["path", "train s", "wall s", "images/s", *rows]
    lines = [
        [path, f"{r['train_seconds']:.1f}", f"{r['wall_seconds']:.1f}",
         f"{r['images_per_second']}", *(f"{r['errors'][row]:.4f}" for row in rows)]
        for path, r in results.items()
    ]  # fmt: skip
    speedup = results["plain"]["train_seconds"] / results["joint"]["train_seconds"]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    print()
    for cells in [header, *lines]:
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)))
    machine = f"{platform.node()} {platform.machine()}, {devices}"
    versions = f"keras {keras.__version__} on {keras.backend.backend()}"
    print(f"joint speed-up (training time): {speedup:.2f}x   {versions}   {machine}")
    report = {
        "date": datetime.date.today().isoformat(),
        "case": "full" if full else SMALL,
        "versions": versions,
        "machine": machine,
        "results": results,
        "speedup": round(speedup, 2),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
