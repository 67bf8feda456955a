"""What `--parallel`'s data handover saves: decoding the archive against reading it back.

    python bench/bench_data.py --data-dir ../shared/data/cifar10-jpeg.tar.gz

Each `--parallel` member process would otherwise decode the archive itself. Here, in
one process on the same archive: `data.load_data` (the decoding every process did),
then `parallel.handing_over` (the main process writes its arrays, once) and
`parallel.handed_data` (what each member process now does instead), checked bit for
bit against the decoded arrays. Prints the three times, their ratio and the machine.
The decoding runs on the CPU whatever the backend, so a CPU figure is the figure.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np

import data
from ensembling import parallel, report
from ensembling.settings import settings_from


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 source, as ensemble.py")
    parser.add_argument("--limit", type=int, help="images (default: all)")
    args = parser.parse_args(argv)
    settings = settings_from({"data_dir": args.data_dir, "limit": args.limit})

    start = time.perf_counter()
    arrays = data.load_data(settings.data_dir, limit=settings.limit, seed=settings.seed)
    decode = time.perf_counter() - start
    start = time.perf_counter()
    with parallel.handing_over(arrays, settings) as handover:
        write = time.perf_counter() - start
        size = os.path.getsize(handover[parallel.DATA_FILE])
        os.environ.update(handover)  # as in a member process
        try:
            start = time.perf_counter()
            handed = parallel.handed_data(settings)
            read = time.perf_counter() - start
        finally:
            del os.environ[parallel.DATA_FILE]
    if handed is None or not all(
        np.array_equal(a, b) for a, b in zip(sum(arrays, ()), sum(handed, ()), strict=True)
    ):
        print("bench_data.py: the handed-over arrays differ from the decoded ones", file=sys.stderr)
        return 1
    images = len(arrays[0][0]) + len(arrays[1][0])
    print(f"decode {decode:.2f} s ({images:,} images), write once {write:.2f} s "
          f"({size / 1e6:.0f} MB), read back {read:.2f} s: {decode / read:.0f}x faster "
          "per member process")  # fmt: skip
    print(f"machine: {report.machine()}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
