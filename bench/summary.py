"""The short table `bench/gpu_check.sh` prints last, from the files its steps wrote.

python bench/summary.py --out bench/out [--fast-wall SECONDS]
"""

import argparse
import json
import sys
from pathlib import Path

import bench_seeds  # its comparison's formatting (bench/ is on the path as a script's folder)

ROWS = ("ConvPool-CNN-C", "ALL-CNN-C", "NIN", "ensemble of three")


def read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def errors(results):
    by_row = {row["row"]: row["test_error"] for row in results}
    return " / ".join(f"{by_row[r]:.4f}" if r in by_row else "-" for r in ROWS)


def seeds_figures(entry):
    """One row of bench_seeds.py's comparison: each path's mean, the difference, p."""
    cells = [f"{path} {bench_seeds.spread(entry, path)}" for path in ("plain", "joint")]
    if entry["difference"] is not None:
        cells.append(f"joint - plain {bench_seeds.signed(entry['difference'])}")
    if entry["p"] is not None:
        cells.append(f"p {entry['p']:.3f}")
    return ", ".join(cells)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--fast-wall", type=float, help="end-to-end seconds of the preset run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    lines = [("step", "seconds", "figures (test error: ConvPool / ALL / NIN / ensemble)")]
    for bench_file in [out / "bench.json", *sorted(out.glob("*/bench.json"))]:
        run = read(bench_file) or {}
        for path, r in run.get("results", {}).items():
            figures = f"{r['images_per_second']:,} member-images/s"
            full = read(bench_file.parent / f"{path.replace(' ', '_')}_results.json")
            if full:  # complete runs only
                figures += "; " + errors(full["results"])
            if "first_epoch_seconds" in r:
                figures += f"; epoch 1 {r['first_epoch_seconds']:.1f} s"
                if "later_epoch_seconds" in r:
                    figures += f", then {r['later_epoch_seconds']:.2f} s"
            lines.append((f"{path} ({r['epochs']} epochs)", f"{r['train_seconds']:.1f} train",
                          figures))  # fmt: skip
        if run.get("speedup"):
            # The first run of each path, as bench_train.py's speed-up.
            runs = run["results"].items()
            plain = next(r["epochs"] for p, r in runs if p.startswith("plain"))
            joint = next(r["epochs"] for p, r in runs if p.startswith("joint"))
            note = f" (plain ran {plain} epochs: its compile weighs more)" if plain < joint else ""
            figures = f"{run['speedup']:.2f}x member-images per second{note}"
            lines.append(("joint / plain", "", figures))
        if run.get("parallel_speedup"):  # the same epochs on both paths
            figures = f"{run['parallel_speedup']:.2f}x member-images per second"
            lines.append(("--parallel / plain", "", figures))
    fast = read(out / "fast_results.json")
    if fast:
        wall = f"{args.fast_wall:.1f} wall" if args.fast_wall else f"{fast['total_seconds']} run"
        attempts = ", ".join(f"{k} {v}" for k, v in fast.get("attempts", {}).items())
        lines.append((f"--preset fast ({fast['settings']['epochs']} epochs)", wall,
                      f"{errors(fast['results'])}; attempts {attempts}"))  # fmt: skip
    for recipe in ("fast", "article"):
        distilled = read(out / f"{recipe}_distill.json")
        if not distilled:
            continue
        rows = distilled["results"]  # the teacher, the student's architecture alone, it
        figures = "; ".join(f"{row['row']} {row['test_error']:.4f}" for row in rows)
        if "latency_ms" in rows[0]:
            ratio = rows[-1]["latency_ms"] / rows[0]["latency_ms"]
            figures += f"; latency {ratio:.2f}x the teacher's"
        seconds = distilled.get("distill_seconds")
        lines.append((f"distill ({recipe})", f"{seconds} train" if seconds else "", figures))
    infer = read(out / "infer.json")
    for precision, result in (infer or {}).get("results", {}).items():
        row = result["rows"]["ensemble"]
        figures = f"ensemble {row['predict_images_per_s']:,.0f} img/s predict"
        if "device_images_per_s" in row:
            figures += f", {row['device_images_per_s']:,.0f} on device"
        figures += f"; ensemble / members' sum {result['ensemble_vs_members_sum']:.3f}"
        if "device_ensemble_vs_members_sum" in result:
            figures += f" ({result['device_ensemble_vs_members_sum']:.3f} on device)"
        lines.append((f"inference {precision}", "", figures))
    augment = read(out / "augment.json")
    if augment and "ratio" in augment:
        plain, augmented = augment["results"]["plain"], augment["results"]["augment"]
        figures = (
            f"epoch {augmented['later_epoch_s']:.3f} s against {plain['later_epoch_s']:.3f} s "
            f"without: x{augment['ratio']:.3f}"
        )
        lines.append(("augmentation", "", figures))
    elif augment:  # stopped after the plain case
        plain = augment["results"]["plain"]
        figures = f"epoch {plain['later_epoch_s']:.3f} s without; the augmented case did not end"
        lines.append(("augmentation", "", figures))
    equal = read(out / "equal.json")
    for steps, r in (equal or {}).get("results", {}).items():
        d = r["distance"]
        figures = (
            f"{equal['model']}: weights' distance from fit: joint {d['joint']:.2e}, "
            f"fit again {d['again']:.2e}, fit from nudged weights {d['nudged']:.2e}"
        )
        lines.append((f"joint loop = fit? {steps} steps", "", figures))
    step = read(out / "step.json")
    for name, r in (step or {}).get("results", {}).items():
        if "failed" in r:
            lines.append((f"joint step: {name}", "", r["failed"]))
            continue
        figures = f"epoch {r['later_epoch_s']:.3f} s, {r['ms_per_step']:.3f} ms a step"
        if "gflop_per_step" in step:
            figures += f", {step['gflop_per_step'] / r['ms_per_step']:.1f} TFLOP/s"
        lines.append((f"joint step: {name}", f"{r['first_epoch_s']:.1f} first", figures))
    seeds = read(out / "seeds.json")
    if seeds:
        finished = [r for r in seeds["runs"] if "failed" not in r]
        lines.append(
            (
                f"seeds: {len(finished)} of {len(seeds['runs'])} runs finished",
                f"{seeds.get('wall_seconds', 0):.1f} wall",
                f"{seeds['parallel']} at a time"
                + "".join(f"; with the runs in {w}" for w in seeds.get("with", [])),
            )
        )
        for row in ROWS:
            e = seeds.get("comparison", {}).get(row)
            if e:
                lines.append((f"  {row}", "", seeds_figures(e)))
        if "verdict" in seeds:
            lines.append(("  rule (RESULTS.md)", "", seeds["verdict"]))
    widths = [max(len(line[i]) for line in lines) for i in range(2)]
    for line in lines:
        print(f"{line[0]:<{widths[0]}}  {line[1]:>{widths[1]}}  {line[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
