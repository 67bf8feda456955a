"""Training speed: the article's recipe one member at a time against `--joint`.

    python bench/bench_train.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python bench/bench_train.py --data-dir ... --full      # the whole recipe (GPU)
    python bench/bench_train.py --data-dir ... --plain-epochs 2 --seeds 0 1
    python bench/bench_train.py --data-dir ... --plain-seeds 1 --seeds 1   # a seed pair
    python bench/bench_train.py --data-dir ... --parallel --no-joint --plain-epochs 5

Both paths run in this one process on the same data with the same settings, so
their ratio holds on a shared, noisy machine. Without a GPU (or --full) it runs a
small case (2,000 images, 1 epoch) that finishes in minutes; on a GPU it runs the
article's full recipe. Prints images per second, training and wall time, the test
errors of every row, and the joint path's speed-up. `--plain-epochs` shortens the
plain path to measure its rate only (the speed-up is then a ratio of images per
second, and its errors are left out); `--seeds` and `--plain-seeds` run each path
with the seeds given (the speed-up pairs the first plain seed with the joint run of
the same seed); `--parallel` adds the plain path's first seed with `--parallel`
(each member in a process of its own, all at once), for as many epochs as the plain
path, and its speed-up. Whether the joint path's errors stay within the plain path's
seed-to-seed spread is bench_seeds.py's question: it runs many seeds of both at
once and tests the difference.
"""

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import keras

import ensemble
from ensembling import backend, parallel, report
from ensembling.cli import checks
from ensembling.report import aligned

SMALL = {"limit": 2000, "epochs": 1}


def measure(settings):
    start = time.perf_counter()
    rows, extra = ensemble.run(settings)
    wall = time.perf_counter() - start
    extra["total_seconds"] = round(wall, 1)
    report.save_results(settings, rows, extra)
    print(report.format_table(rows))
    # --parallel's members train at once: each one's seconds count from the same start.
    train_seconds = (max if settings.parallel else sum)(extra["train_seconds"].values())
    trained = (settings.limit or 50_000) * (1 - settings.validation_split)
    images = trained * settings.epochs * len(settings.models)  # member-images seen
    result = {
        "epochs": settings.epochs,
        "seed": settings.seed,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "images_per_second": round(images / train_seconds),
        "attempts": extra["attempts"],
        "errors": {row["row"]: row["test_error"] for row in rows},
    }
    for split in extra.get("epoch_seconds", {}).values():  # joint: where the time went
        epochs = split["epochs"]
        result["first_epoch_seconds"] = epochs[0]  # compiles the step
        if len(epochs) > 1:  # one epoch (the CPU's small case) has no later ones
            result["later_epoch_seconds"] = round(statistics.median(epochs[1:]), 2)
        result["callback_seconds"] = round(sum(split["callbacks"]), 1)
        # The first epoch's include compiling the dead checks' predict functions.
        result["first_callback_seconds"] = round(split["callbacks"][0], 2)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 source, as ensemble.py")
    parser.add_argument("--full", action="store_true", help="full recipe even without a GPU")
    parser.add_argument("--small", action="store_true", help="small case even on a GPU")
    parser.add_argument("--out", default="bench/out", help="folder for bench.json and results")
    parser.add_argument("--work", default=None, help="folder for weights and logs (temporary)")
    parser.add_argument(
        "--plain-epochs", type=int, help="epochs of the plain path (default: as the joint path)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the joint path")
    parser.add_argument(
        "--plain-seeds", type=int, nargs="+", default=[0], help="seeds of the plain path"
    )
    parser.add_argument("--no-plain", action="store_true", help="no plain path")
    parser.add_argument("--no-joint", action="store_true", help="no joint path")
    parser.add_argument(
        "--parallel", action="store_true", help="also the plain path with --parallel"
    )
    args = parser.parse_args(argv)
    if args.parallel:  # before this process opens the GPU: the members' processes share it
        parallel.share_the_gpu()

    devices = backend.devices()
    full = args.full or (backend.has_accelerator() and not args.small)
    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    out.mkdir(parents=True, exist_ok=True)
    # No cost table: bench_infer.py measures prediction speed on its own.
    base = ensemble.Settings(data_dir=args.data_dir, cost=False, **({} if full else SMALL))
    print(f"case: {'full recipe' if full else SMALL}; devices {devices}; work in {work}")

    plain_epochs = args.plain_epochs or base.epochs
    # (kind, seed, epochs), then named: a path is its kind, and its seed unless 0.
    runs = [] if args.no_plain else [("plain", s, plain_epochs) for s in args.plain_seeds]
    runs += [("parallel", args.plain_seeds[0], plain_epochs)] if args.parallel else []
    runs += [] if args.no_joint else [("joint", s, base.epochs) for s in args.seeds]
    runs = [(f"{kind} seed {seed}" if seed else kind, kind, seed, epochs)
            for kind, seed, epochs in runs]  # fmt: skip
    how = {
        "plain": "one fit per member",
        "parallel": "one fit per member, each in a process of its own, all at once",
        "joint": "all members in one step",
    }
    results = {}
    for path, kind, seed, epochs in runs:
        folder = path.replace(" ", "_")
        settings = dataclasses.replace(
            base,
            joint=kind == "joint",
            parallel=kind == "parallel",
            seed=seed,
            epochs=epochs,
            weights_dir=str(work / folder / "weights"),
            logs_dir=str(work / folder / "logs"),
        )
        checks.check_settings(settings)
        print(f"\n=== {path}: {how[kind]}, {epochs} epochs, seed {seed}")
        results[path] = measure(settings)
        if epochs == base.epochs:  # a shortened run's errors mean nothing
            results_file = Path(settings.logs_dir) / f"{report.RESULTS_STEM}.json"
            (out / f"{folder}_results.json").write_text(results_file.read_text())

    rows = list(next(iter(results.values()))["errors"])
    header = ["path", "epochs", "train s", "wall s", "images/s", *rows]
    lines = []
    for path, r in results.items():
        complete = r["epochs"] == base.epochs  # a shortened run measures speed only
        errors = [f"{r['errors'][row]:.4f}" if complete else "-" for row in rows]
        seconds = [f"{r['train_seconds']:.1f}", f"{r['wall_seconds']:.1f}"]
        lines.append([path, str(r["epochs"]), *seconds, f"{r['images_per_second']}", *errors])
    # The speed-up compares the two paths' first runs of one seed (the first plain seed).
    first_plain = next((p for p in results if p.startswith("plain")), None)
    seed = first_plain and results[first_plain]["seed"]
    twin = next((p for p, r in results.items() if p.startswith("joint") and r["seed"] == seed),
                None)  # fmt: skip
    speedup = parallel_speedup = None
    if first_plain and twin:
        plain = results[first_plain]
        speedup = results[twin]["images_per_second"] / plain["images_per_second"]
    together = next((p for p in results if p.startswith("parallel")), None)
    if first_plain and together:
        plain = results[first_plain]
        parallel_speedup = results[together]["images_per_second"] / plain["images_per_second"]
    print()
    print(aligned(header, lines))
    for path, r in results.items():
        if "first_epoch_seconds" in r:
            later = r.get("later_epoch_seconds")
            print(
                f"{path} epochs: first {r['first_epoch_seconds']:.1f} s (compiling)"
                + (f", then {later:.2f} s each" if later is not None else "")
                + f"; callbacks {r['callback_seconds']} s "
                f"({r['first_callback_seconds']} s after the first epoch)"
            )
    machine = f"{platform.node()} {platform.machine()}, {devices}"
    versions = f"keras {keras.__version__} on {keras.backend.backend()}"
    if speedup is not None:
        short = plain["epochs"] < base.epochs  # its compile weighs more
        note = f" (plain: {plain['epochs']} epochs, compile included)" if short else ""
        print(f"joint speed-up (member-images per training second): {speedup:.2f}x{note}")
    if parallel_speedup is not None:
        print(f"--parallel speed-up (member-images per training second, the same epochs as "
              f"plain): {parallel_speedup:.2f}x")  # fmt: skip
    print(f"{versions}   {machine}")
    summary = {
        "date": datetime.date.today().isoformat(),
        "case": "full" if full else SMALL,
        "versions": versions,
        "machine": machine,
        "results": results,
        "speedup": speedup and round(speedup, 2),
        "parallel_speedup": parallel_speedup and round(parallel_speedup, 2),
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
