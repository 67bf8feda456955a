"""Tiny synthetic CIFAR-10 look-alikes in every format the loader reads.

Image i of class c has pixel (0, 0) = (25 * c, i, 7) and noise elsewhere, so a
test can read back each image's class and index after loading.
"""

import atexit
import contextlib
import os
import pickle
import shutil
import signal
import tarfile
import tempfile
import threading
import time
from pathlib import Path

# The suite runs on several workers (pyproject.toml): on a GPU, each takes the memory it
# needs instead of JAX's 75% or TensorFlow's all, which would leave the next none.
# Set before the backend loads; the programs the tests start inherit it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
# PyTorch's CPU kernels run an OpenMP thread a core, which spin-wait: with workers and
# their programs outnumbering the cores they wait on each other. One thread a worker;
# the tests' programs inherit it.
if os.environ.get("KERAS_BACKEND") == "torch" and "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# XLA's CPU runtime takes each step's activations from malloc, and glibc hands a freed
# buffer of a few MB back to the kernel: every step faults in fresh zeroed pages, half
# the system time of a small JAX run (TensorFlow and PyTorch keep their own). Kept in
# the heap instead, up to 1 GiB. glibc reads these when a process starts: they reach
# the workers and the programs the tests start, not this process.
if os.environ.get("KERAS_BACKEND") == "jax":
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))
# On tiny data much of JAX's time goes to compiling. XLA's level 1 compiles about as
# fast as level 0 and runs as fast as the default level 2; level 0 runs a scanned epoch
# (--joint) three times slower.
# Single-threaded Eigen, as one OpenMP thread for PyTorch above: several processes'
# thread pools on two cores spend CPU waiting on each other.
if os.environ.get("KERAS_BACKEND") == "jax" and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = (
        "--xla_backend_optimization_level=1 --xla_cpu_multi_thread_eigen=false"
    )
# JAX compiles the same small programs in many tests and their subprocesses (NIN's
# training step on the synthetic tree, above all): one compilation cache for the whole
# session, made by the first process and inherited by the workers and the programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pytest-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import numpy as np
import pytest

import data
from ensembling import report
from models import nin_cnn

# A shell script starts its background jobs ignoring SIGINT, and Python then leaves
# Ctrl-C ignored; the stop tests need it as at a terminal, whoever runs the suite
# (`bash .ci/run &` from a script failed five of them). The program itself keeps an
# inherited SIG_IGN on purpose (tests/test_resume.py checks that), not the suite.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def signal_this_process_when(ready, sig):
    """While the block runs, a thread sends `sig` to this process once `ready()` is
    true, as a terminal or a scheduler would from outside: a stop the program handles,
    tested without a process (and a backend import) of its own. The thread is done
    before the block's end returns, so no signal lands after it."""
    running = threading.Event()
    running.set()

    def watch():
        while running.is_set():
            if ready():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        running.clear()
        watcher.join()


# pytest-xdist hands tests to its workers in collection order, so a long test collected
# last runs on alone while the other workers sit idle. The modules whose longest test
# is longest go first (by `--durations` on TensorFlow and JAX); the rest follow, quick
# ones last.
LONGEST_FIRST = """test_integration test_resume test_parallel test_fast test_distribute
    test_ensemble test_joint test_combine test_api test_failures test_export
    test_custom_objects test_models test_bench""".split()


def pytest_xdist_auto_num_workers(config):
    """The workers `-n auto` (pyproject.toml) starts on the 2-core CI machine. Most of
    a JAX or PyTorch test's time is a core compiling or training, so a third worker
    only makes two contend; TensorFlow's tests leave a core idle often enough that a
    third worker fills it."""
    return 3 if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" else 2


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.module.__name__
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's own order is kept


@pytest.fixture(autouse=True, scope="session")
def small_cost_measurements():
    """The cost table's timings on fewer and smaller batches: the same measurement, in a
    tenth of the time (at batch 256 on a 2-core CPU it took two thirds of a run). One
    batch size for both timings, so that each model is compiled for one shape only.
    Session-wide, so that module fixtures' runs measure this way too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "LATENCY_CALLS", 3)
        patch.setattr(report, "THROUGHPUT_BATCH", 1)
        patch.setattr(report, "THROUGHPUT_CALLS", 1)
        yield


REAL_ARCHIVE = Path(
    os.environ.get(
        "CIFAR10_ARCHIVE",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
    )
)


def nin_without_dropout(model_input):
    """NIN, the cheapest member, drawing no dropout masks: two trainings of it can
    agree step for step."""
    return nin_cnn(model_input, dropout=0.0)


def synthetic_split(per_class):
    """uint8 images (10 * per_class, 32, 32, 3) and labels, grouped by class.

    Noise elsewhere, so that a live network's output differs from image to image.
    """
    rng = np.random.default_rng(per_class)
    images = rng.integers(0, 256, (data.NUM_CLASSES * per_class, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(data.NUM_CLASSES), per_class)
    for index, label in enumerate(labels):
        images[index, 0, 0] = (25 * label, index % 256, 7)
    return images, labels


def write_tree(root, train_per_class=8, test_per_class=2, suffix=".png"):
    """train/<class>/NNNN.png and test/<class>/NNNN.png under root."""
    from PIL import Image

    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = synthetic_split(per_class)
        # Created in reverse order so that label order can only come from sorting.
        for index in reversed(range(len(labels))):
            folder = Path(root) / split / data.CLASS_NAMES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:04d}{suffix}")
    return Path(root)


SHAPES = ("triangle", "square", "circle")  # sorted: circle 0, square 1, triangle 2


def write_grey_tree(root, per_class=4, size=(12, 10), splits=("train", "test"), classes=SHAPES):
    """Not CIFAR-10: `classes` (three) of grey `size` (height, width) images, MNIST-like.

    Image i of class c has pixel (0, 0) = 100 * c, pixel (0, 1) = i and pixel (0, 2)
    = 10 * the split's place in `splits`; noise elsewhere.
    """
    from PIL import Image

    rng = np.random.default_rng(3)
    for place, split in enumerate(splits):
        for name in classes:  # unsorted on purpose: labels come from the sorted names
            label = sorted(classes).index(name)
            folder = Path(root) / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, size, dtype=np.uint8)
                pixels[0, :3] = 100 * label, index, 10 * place
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return Path(root)


def write_tar(source_root, tar_path, arcname=""):
    with tarfile.open(tar_path, "w:gz") as archive:
        for path in sorted(Path(source_root).rglob("*")):
            archive.add(path, arcname=str(Path(arcname) / path.relative_to(source_root)))
    return Path(tar_path)


def batch_bytes(images, labels):
    """A batch in the official layout: rows of 3072 bytes, channel-major."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps(
        {b"batch_label": b"synthetic", b"labels": list(map(int, labels)), b"data": rows}, protocol=2
    )


def write_batches(folder, per_class=2):
    """The six official batch files; returns the images and labels they hold."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_split(per_class * 5)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(train_labels))  # the official batches are not class-ordered
    train_images, train_labels = train_images[order], train_labels[order]
    for i, chunk in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        (folder / f"data_batch_{i}").write_bytes(
            batch_bytes(train_images[chunk], train_labels[chunk])
        )
    test_images, test_labels = synthetic_split(per_class)
    (folder / "test_batch").write_bytes(batch_bytes(test_images, test_labels))
    return (train_images, train_labels), (test_images, test_labels)


@pytest.fixture
def image_tree(tmp_path):
    return write_tree(tmp_path / "tree")


@pytest.fixture
def real_archive():
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {REAL_ARCHIVE} (set CIFAR10_ARCHIVE)")
    return REAL_ARCHIVE


def pixel_ids(x):
    """(class code, index) read back from pixel (0, 0) of normalised images."""
    raw = np.rint(x[:, 0, 0, :2] * 255).astype(int)
    return raw[:, 0] // 25, raw[:, 1]
