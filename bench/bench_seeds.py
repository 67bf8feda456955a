"""Seed-to-seed spread: the article's path against `--joint`, several seeds each.

    python bench/bench_seeds.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --plain-seeds 1 2 3 --joint-seeds 2 --parallel 4 --with bench/seed_runs.json
    python bench/bench_seeds.py --data-dir ... --small       # a tiny case, to try it
    python bench/bench_seeds.py --plain-seeds --joint-seeds --with bench/seed_runs.json

Issue 5 makes `--joint` the default once its errors are shown to stay within the noise
of the plain path's. One run of the recipe is one draw: runs that differ only by
rounding are independent after a few hundred of its 25,000 steps (bench/RESULTS.md),
so the paths can only be compared through several seeds of each. Every run here is
`python ensemble.py` in a process of its own, with the article's settings and its
seed, so a run is exactly what a user gets. Up to `--parallel` of them share the
device at once (and inherit the memory settings below): by XLA's operation count a
plain run keeps an H100 busy for only about a fifth of its time (one small batch at a
time, dispatched from the host; bench/RESULTS.md), so several should overlap, and
more seeds fit into one device call than one after another.

Prints every run's test errors (members and the three-model average), then, for each
row, each path's mean and standard deviation, the joint mean less the plain mean and
an exact two-sided permutation test's p-value for that difference (no assumption
about the errors' distribution; with 3 runs against 2 it cannot go below 0.2), and
last what the rule fixed in bench/RESULTS.md says of them (`verdict`).
`--with FILE` adds earlier runs (bench/seed_runs.json holds the GPU runs in
bench/RESULTS.md; a seeds.json this wrote can be passed too). seeds.json in `--out`
is rewritten after every run, so a run stopped from outside keeps what finished.
`--budget S` stops the runs still going after S seconds and starts none that the
slowest finished run of its path says would not end in time.
"""

import argparse
import datetime
import itertools
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ensembling import parallel  # noqa: E402 (after the path it comes from)
from ensembling.report import aligned  # noqa: E402

# Several processes share one GPU, as under --parallel: each takes the memory it
# needs, not most of it (this one too, before anything opens the device).
parallel.share_the_gpu()

SMALL = ["--limit", "600", "--epochs", "1"]
EXACT_LIMIT = 200_000  # label assignments enumerated; more are sampled
SAMPLES = 100_000
RULE_RUNS, RULE_P = 5, 0.05  # bench/RESULTS.md: when --joint may become the default


def permutation_p(plain, joint, rng=None):
    """Two-sided p-value of mean(joint) - mean(plain) under exchangeable labels.

    Every way of splitting the pooled errors into groups of the same sizes is
    equally likely if the path makes no difference; p is the share of splits whose
    difference of means is at least as large as the one observed.
    """
    pooled = np.asarray([*plain, *joint], dtype=float)
    n, k = len(pooled), len(joint)
    total = pooled.sum()
    observed = abs(np.mean(joint) - np.mean(plain))
    tolerance = 1e-12 * max(1.0, observed)  # the observed split itself always counts

    def differences(sums):
        return np.abs(sums / k - (total - sums) / (n - k))

    if math.comb(n, k) <= EXACT_LIMIT:
        splits = np.array(list(itertools.combinations(range(n), k)))
        return float(np.mean(differences(pooled[splits].sum(axis=1)) >= observed - tolerance))
    rng = rng or np.random.default_rng(0)
    sums = np.array([rng.permutation(pooled)[:k].sum() for _ in range(SAMPLES)])
    hits = np.sum(differences(sums) >= observed - tolerance)
    return float((hits + 1) / (SAMPLES + 1))  # the observed split is one of the draws


def compare(runs):
    """Per row: each path's errors, mean, deviation, the difference and its p-value."""
    rows = list(dict.fromkeys(row for run in runs for row in run["errors"]))
    table = {}
    for row in rows:
        by_path = {
            path: [r["errors"][row] for r in runs
                   if r["path"] == path and r["errors"].get(row) is not None]
            for path in ("plain", "joint")
        }  # fmt: skip
        entry = {"plain": by_path["plain"], "joint": by_path["joint"]}
        for path, errors in by_path.items():
            entry[f"{path}_mean"] = statistics.mean(errors) if errors else None
            entry[f"{path}_sd"] = statistics.stdev(errors) if len(errors) > 1 else None
        both = by_path["plain"] and by_path["joint"]
        entry["difference"] = entry["joint_mean"] - entry["plain_mean"] if both else None
        enough = len(by_path["plain"]) > 1 and len(by_path["joint"]) > 1
        entry["p"] = permutation_p(by_path["plain"], by_path["joint"]) if enough else None
        table[row] = entry
    return table


def signed(difference):
    """+0.0123, and +0.0000 rather than -0.0000 for a rounding-sized negative."""
    return f"{difference:+.4f}".replace("-0.0000", "+0.0000")


def spread(entry, path):
    """One path's errors in a row of `compare`: "0.2650 ± 0.0040 (2)", or "-"."""
    mean, sd, n = entry[f"{path}_mean"], entry[f"{path}_sd"], len(entry[path])
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" ({n})"


def format_comparison(table):
    lines = []
    for row, e in table.items():
        difference = "-" if e["difference"] is None else signed(e["difference"])
        p = "-" if e["p"] is None else f"{e['p']:.3f}"
        lines.append([row, spread(e, "plain"), spread(e, "joint"), difference, p])
    header = ["row", "plain: mean ± sd (runs)", "joint: mean ± sd (runs)", "joint - plain", "p"]
    return aligned(header, lines)


def verdict(table):
    """The rule of bench/RESULTS.md (2026-11-27, second session), applied to `table`.

    Once each path has RULE_RUNS complete runs on every member and on the ensemble
    of three, `--joint` may become the default if none of those rows differs at
    p < RULE_P; if one does, it stays opt-in.
    """
    rows = [row for row in table if not row.startswith("pair")]  # members, ensembles
    if not rows:
        return "no runs to judge"
    fewest = min((len(table[row][path]), row, path) for row in rows for path in ("plain", "joint"))
    if fewest[0] < RULE_RUNS:
        n, row, path = fewest
        return f"undecided: {row} has {n} {path} run(s); the rule needs {RULE_RUNS} of each path"
    differing = [f"{row} {signed(table[row]['difference'])} (p {table[row]['p']:.3f})"
                 for row in rows if table[row]["p"] < RULE_P]  # fmt: skip
    if differing:
        return "the paths differ: " + ", ".join(differing) + "; --joint stays opt-in"
    return f"within noise: no row differs at p < {RULE_P}; --joint may become the default"


def format_runs(runs):
    rows = list(dict.fromkeys(row for run in runs for row in run["errors"]))
    lines = []
    for r in runs:
        errors = [f"{r['errors'][row]:.4f}" if r["errors"].get(row) is not None else "-"
                  for row in rows]  # fmt: skip
        wall = f"{r['wall_seconds']:.1f}" if r.get("wall_seconds") is not None else "-"
        lines.append([r["path"], r.get("source", "this run"), str(r["seed"]), wall, *errors])
    return aligned(["path", "source", "seed", "wall s", *rows], lines, right_from=2)


def read_runs(path):
    """Earlier runs: bench/seed_runs.json's list, or a seeds.json this script wrote."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read runs from {path}: {error}") from None
    runs = value.get("runs") if isinstance(value, dict) else value
    for run in runs if isinstance(runs, list) else [runs]:
        if not isinstance(run, dict) or run.get("path") not in ("plain", "joint") \
                or not isinstance(run.get("errors"), dict):  # fmt: skip
            raise ValueError(f"{path}: each run needs a path (plain or joint) and its errors "
                             f"by row, got {run!r:.80}")  # fmt: skip
        run.setdefault("source", str(path))
    return runs


def average_errors(results):
    """The test error of every row under the article's rule, from a results.json."""
    return {r["row"]: r["test_error"] for r in results["results"] if r["rule"] == "average"}


class Run:
    """One `ensemble.py` process: its seed, its folders, its outcome."""

    def __init__(self, path, seed, work, data_dir, extra):
        self.path, self.seed = path, seed
        self.folder = Path(work) / f"{path}_seed_{seed}"
        self.command = [
            sys.executable, str(ROOT / "ensemble.py"), "--seed", str(seed),
            "--data-dir", str(data_dir), "--no-cost",
            "--weights-dir", str(self.folder / "weights"), "--logs-dir", str(self.folder / "logs"),
            *(["--joint"] if path == "joint" else []), *extra,
        ]  # fmt: skip
        self.process = self.started = self.wall = None

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / "log.txt", "w")  # closed in finish, stop or schedule
        self.started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self.log,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        print(f"started {self.path} seed {self.seed}", flush=True)

    def finish(self):
        """The run's outcome once its process ended: a dict for seeds.json."""
        self.wall = time.perf_counter() - self.started
        self.log.close()
        outcome = {"path": self.path, "seed": self.seed, "wall_seconds": round(self.wall, 1)}
        results_file = self.folder / "logs" / "results.json"
        if self.process.returncode != 0 or not results_file.is_file():
            tail = (self.folder / "log.txt").read_text(errors="replace").splitlines()[-5:]
            print(f"{self.path} seed {self.seed} failed (exit {self.process.returncode}):",
                  *tail, sep="\n  ", flush=True)  # fmt: skip
            return {**outcome, "failed": self.process.returncode, "errors": {}}
        results = json.loads(results_file.read_text())
        # A dead member's restart lines (training.restart_if_dead): the run's log stays
        # in the temporary work folder, so seeds.json keeps which member died, and when.
        log = (self.folder / "log.txt").read_text(errors="replace").splitlines()
        outcome.update(
            errors=average_errors(results),
            train_seconds=round(sum(results["train_seconds"].values()), 1),
            attempts=results["attempts"],
            restarts=[line.strip() for line in log if " died in epoch " in line],
            environment=results["environment"],
        )
        print(
            f"{self.path} seed {self.seed}: {self.wall:.1f} s, errors "
            + ", ".join(f"{k} {v:.4f}" for k, v in outcome["errors"].items()),
            *outcome["restarts"],
            sep="\n  ",
            flush=True,
        )
        return outcome

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def schedule(pending, parallel, budget, on_finish):
    """Runs the pending runs, at most `parallel` at a time, within `budget` seconds."""
    pending, start, running, slowest = list(pending), time.perf_counter(), [], {}
    try:
        while pending or running:
            left = budget - (time.perf_counter() - start) if budget else math.inf
            while pending and len(running) < parallel:
                run = pending[0]
                if slowest.get(run.path, 0) > left:
                    print(
                        f"not started: {run.path} seed {run.seed} "
                        f"({slowest[run.path]:.0f} s for the slowest such run, {left:.0f} s left)"
                    )
                    pending.pop(0)
                    continue
                running.append(pending.pop(0))
                running[-1].start()
            if left <= 0:
                for run in running:
                    print(f"stopped at the budget: {run.path} seed {run.seed}", flush=True)
                    run.stop()
                    run.log.close()
                    on_finish({"path": run.path, "seed": run.seed, "errors": {},
                               "failed": "stopped at the budget"})  # fmt: skip
                running.clear()
                for run in pending:
                    print(f"not started: {run.path} seed {run.seed} (budget spent)")
                pending.clear()
                break
            time.sleep(0.5)
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                outcome = run.finish()
                if "failed" not in outcome:
                    slowest[run.path] = max(slowest.get(run.path, 0), run.wall)
                on_finish(outcome)
    finally:  # stopped from outside (timeout, Ctrl-C): no orphan keeps the device busy
        for run in running:
            run.stop()
            run.log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 source, as ensemble.py (for new runs)")
    parser.add_argument("--plain-seeds", type=int, nargs="*", default=[1, 2], help="(default 1 2)")
    parser.add_argument("--joint-seeds", type=int, nargs="*", default=[1, 2], help="(default 1 2)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--budget", type=float, help="seconds for all runs (default: no limit)")
    parser.add_argument(
        "--with",
        dest="earlier",
        action="append",
        default=[],
        metavar="FILE",
        help="earlier runs to compare with (e.g. bench/seed_runs.json)",
    )
    parser.add_argument("--small", action="store_true", help="600 images, 1 epoch: a try-out")
    parser.add_argument("--out", default="bench/out", help="folder for seeds.json")
    parser.add_argument("--work", help="folder for the runs' weights and logs (temporary)")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    for path, seeds in (("plain", args.plain_seeds), ("joint", args.joint_seeds)):
        if len(set(seeds)) < len(seeds):
            parser.error(f"--{path}-seeds repeats a seed; each run needs its own: {seeds}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    try:
        earlier = [run for path in args.earlier for run in read_runs(path)]
    except ValueError as error:
        parser.error(str(error))
    # The earlier runs are the full recipe; a small case's errors compare with nothing.
    earlier = [] if args.small else earlier
    # SIGTERM (the `timeout` of gpu_check.sh) unwinds like Ctrl-C, so the runs stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    extra = SMALL if args.small else []
    # Alternate the paths, so that a budget cut short still leaves both compared.
    order = [("plain", s) for s in args.plain_seeds], [("joint", s) for s in args.joint_seeds]
    queue = [run for both in itertools.zip_longest(*order) for run in both if run]
    if queue and not args.data_dir:
        parser.error("--data-dir is needed to train (or pass no seeds to compare --with runs)")
    if queue:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench_seeds_"))
        print(f"{len(queue)} runs, {args.parallel} at a time; work in {work}", flush=True)
    pending = [Run(path, seed, work, args.data_dir, extra) for path, seed in queue]
    machine = f"{platform.node()} {platform.machine()}"
    summary = {"date": datetime.date.today().isoformat(), "machine": machine,
               "case": "small" if args.small else "full", "parallel": args.parallel,
               "with": [] if args.small else args.earlier, "runs": []}  # fmt: skip
    start = time.perf_counter()

    def on_finish(outcome):
        summary["runs"].append(outcome)
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        finished = [r for r in summary["runs"] if "failed" not in r]
        summary["comparison"] = compare(earlier + finished)
        summary["verdict"] = verdict(summary["comparison"])
        (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")

    schedule(pending, args.parallel, args.budget, on_finish)
    wall = time.perf_counter() - start
    finished = sorted((r for r in summary["runs"] if "failed" not in r),
                      key=lambda r: (r["path"] != "plain", r["seed"]))  # fmt: skip
    print()
    if earlier + finished:
        print(format_runs(earlier + finished))
        print()
        table = compare(earlier + finished)
        print(format_comparison(table))
        print(f"rule: {verdict(table)}")
    if not queue:
        return 0
    e = next((r["environment"] for r in finished), None)
    versions = e and f"; keras {e['keras']} on {e['backend']}, python {e['python']}, {e['devices']}"
    print(f"{len(finished)} of {len(queue)} runs finished in {wall:.1f} s, "
          f"{args.parallel} at a time{versions or ''}; {machine}")  # fmt: skip
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
