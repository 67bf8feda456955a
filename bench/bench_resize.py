"""What resizing a tree's photos costs: Keras' resize op, photo by photo, against ours.

    python bench/bench_resize.py                       # 200 photos of varied sizes
    KERAS_BACKEND=jax python bench/bench_resize.py --photos 50

`combine` resizes each tree image to the models' input as
`image_dataset_from_directory` does (bilinear, no antialiasing). Photos come in many
sizes, and `keras.ops.image.resize` on JAX compiles once per input shape, so
`readers.resized` does the same arithmetic in NumPy. This times both on the same
synthetic photos (uint8, random sizes in --sizes, resized to --to), after one
warm-up call each, checks they agree within 0.5 (ours is rounded to whole pixel
values), and prints the time per photo of each, their ratio, the backend and the
machine.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from ensembling import readers, report


def keras_resize(pixels, size):
    resized = keras.ops.image.resize(
        pixels[None].astype(np.float32), size, interpolation="bilinear", antialias=False
    )
    return keras.ops.convert_to_numpy(resized)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200, help="photos (default: 200)")
    parser.add_argument("--sizes", type=int, nargs=2, default=(300, 500), metavar=("MIN", "MAX"),
                        help="each photo's height and width (default: 300 500)")  # fmt: skip
    parser.add_argument("--to", type=int, default=160, help="square size resized to (160)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    photos = [
        rng.integers(0, 256, (*rng.integers(args.sizes[0], args.sizes[1] + 1, 2), 3), np.uint8)
        for _ in range(args.photos)
    ]
    size = (args.to, args.to)
    seconds = {}
    for name, resize in (
        ("keras.ops.image.resize", keras_resize),
        ("readers.resized", readers.resized),
    ):
        resize(rng.integers(0, 256, (7, 9, 3), np.uint8), size)  # first-call set-up, not timed
        start = time.perf_counter()
        results = [resize(photo, size) for photo in photos]
        seconds[name] = (time.perf_counter() - start) / len(photos)
        if name == "keras.ops.image.resize":
            expected = results
    worst = max(np.abs(a - b).max() for a, b in zip(results, expected, strict=True))
    if worst > 0.5 + 1e-2:  # ours is rounded; the backends' floats differ by about 0.002
        print(f"bench_resize.py: the two differ by {worst:.4f}", file=sys.stderr)
        return 1
    shapes = len({photo.shape for photo in photos})
    print(f"{len(photos)} photos ({shapes} sizes) to {args.to}x{args.to} on "
          f"{keras.backend.backend()}: Keras' op {seconds['keras.ops.image.resize'] * 1e3:.1f} "
          f"ms per photo, readers.resized {seconds['readers.resized'] * 1e3:.1f} ms "
          f"({seconds['keras.ops.image.resize'] / seconds['readers.resized']:.1f}x), "
          f"largest difference {worst:.4f}")  # fmt: skip
    print(f"machine: {report.machine()}, "
          f"keras {keras.__version__}, numpy {np.__version__}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
