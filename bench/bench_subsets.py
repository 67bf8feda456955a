"""How long scoring the subsets of many members takes: every subset against the default.

    python bench/bench_subsets.py                      # 3, 6 and 8 members, every rule
    python bench/bench_subsets.py --members 3 7 --images 2000

`rows.table_rows` scores every subset of up to `combination.EVERY_SUBSET_UP_TO`
members under every rule; beyond, by default, each member, all but each one and all
of them. This times both for each member count on synthetic probabilities as large
as CIFAR-10's (10,000 test and 10,000 validation images; members that agree with the
label more often than chance, so the fitted rules have something to fit), and prints
each time beside the article's three members' (the baseline, same run) and the
machine. Scoring is NumPy on the CPU whatever the backend, so a CPU figure is the
figure.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ensembling import combination, report
from ensembling.rows import table_rows


def synthetic(members, images, rng):
    """Probabilities of `members` models on `images` images, and the true labels."""
    labels = rng.integers(0, 10, images)
    probs = {}
    for k in range(members):
        logits = rng.normal(size=(images, 10))
        logits[np.arange(images), labels] += 1.5  # right about half the time
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs[f"m{k}"] = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs, labels


def timed(members, images, every, rules, seed=0):
    rng = np.random.default_rng(seed)
    test, test_labels = synthetic(members, images, rng)
    val, val_labels = synthetic(members, images, rng)
    start = time.perf_counter()
    rows = table_rows(list(test), rules, test, val, val_labels, test_labels, every)
    return time.perf_counter() - start, len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[3, 6, 8])
    parser.add_argument("--images", type=int, default=10_000, help="test and validation images")
    args = parser.parse_args(argv)
    rules = list(combination.RULES)
    timed(3, 100, None, rules)  # warm-up: NumPy's first calls
    baseline, _ = timed(3, args.images, None, rules)
    print(f"rules: {', '.join(rules)}; {args.images:,} test and validation images; "
          f"baseline (3 members, every subset): {baseline:.1f} s")  # fmt: skip
    print(f"{'members':>7}  {'subsets':>23}  {'rows':>5}  {'seconds':>8}  {'vs baseline':>11}")
    for members in args.members:
        policies = [None] if members <= combination.EVERY_SUBSET_UP_TO else [True, None]
        for every in policies:
            seconds, rows = timed(members, args.images, every, rules)
            which = "every one" if every or members <= combination.EVERY_SUBSET_UP_TO else (
                "each, all but each, all"
            )  # fmt: skip
            print(f"{members:>7}  {which:>23}  {rows:>5}  {seconds:>8.1f}  "
                  f"{seconds / baseline:>10.1f}x")  # fmt: skip
    print(f"machine: {report.machine()}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
