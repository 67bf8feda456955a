"""CIFAR-10 loading for the ensemble: Keras download, canonical batches, image folders.

`load_data` returns the article's arrays, from any source:

    x_train (N, 32, 32, 3) float32 in [0, 1]     y_train (N, 10) float32 one-hot
    x_test  (M, 32, 32, 3) float32 in [0, 1]     y_test  (M, 1) int64 class ids

`load_data(data_dir)` picks the source from what `data_dir` is:

* None: `keras.datasets.cifar10.load_data()` (downloads once into ~/.keras);
* a `cifar-10-batches-py` folder (the official batches, extracted);
* the official `cifar-10-python.tar.gz`, checked against its published sha256;
* a class-folder tree `train/<class>/*.jpg|png`, `test/<class>/*.jpg|png`, as a
  folder or as a `.tar`/`.tar.gz` of one (how `../shared/data` ships CIFAR-10) or a
  `.zip` (how Kaggle and most image-folder downloads ship);
* an `.npz` of the four arrays keras.datasets returns (x_train, y_train, x_test,
  y_test), as np.savez writes them.

`load_labelled`, for `combine`, reads the test images and the validation images (its
fitted rules learn on them) from the same sources, or from a class-folder tree of any
other labelled images: any number of classes (the folders, sorted by name), any one
image size, RGB or grey, or an .npz of such arrays (Keras' mnist.npz); the arrays are
of that shape and class count.

Nothing is ever extracted to disk and nothing in the data can run code: tar and zip
members are read in memory (links, absolute paths and `..` refused) and the pickled
batches go through an unpickler that only rebuilds NumPy arrays.
"""

import dataclasses
import hashlib
import io
import math
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from ensembling.errors import DataError

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Published by the CIFAR-10 authors for cifar-10-python.tar.gz.
OFFICIAL_ARCHIVE_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
OFFICIAL_BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# What Keras' image_dataset_from_directory reads (its first five), and WebP, which the
# web serves and Pillow reads; an animated GIF or WebP is its first frame, as in Keras.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_KINDS = "PNG, JPEG, BMP, GIF or WebP"
# A tree's own held-out images, beside train/ and test/, for combine's fitted rules.
HELD_OUT_FOLDERS = ("val", "valid", "validation")
SPLITS = ("train", "test", *HELD_OUT_FOLDERS)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # keras.datasets' arrays, saved
VALIDATION_SPLIT = 0.2  # the article's, and combine's default


class _SizesDiffer(DataError):
    """A tree's images are not all of one size (or of one larger than `_Spec.at_most`),
    so they cannot be read at their own: `load_labelled` then resizes them."""


# --------------------------------------------------------------------------- public


def load_data(data_dir=None, limit=None, seed=0):
    """Loads CIFAR-10 as the article uses it.

    Args:
        data_dir: None to download with Keras, else a path (see module docstring).
        limit: keep only this many training and this many test images, chosen
            deterministically from `seed`; None keeps everything.
        seed: seeds the shuffle of class-ordered sources and the `limit` subset.

    Returns:
        `((x_train, y_train), (x_test, y_test))` as described in the module docstring.

    Raises:
        DataError: with a one-line message naming the problem and the fix.
    """
    arrays, _, _ = _load(data_dir, limit, seed, CIFAR10)
    return arrays


def load_labelled(
    data_dir=None,
    limit=None,
    seed=0,
    channels=3,
    validation_split=None,
    pixels=False,
    size=None,
    own_size=False,
):
    """Labelled images for `combine`: CIFAR-10 as `load_data` reads it, or any class-folder tree.

    A tree's classes are its folders, sorted by name (at least two), and its images
    must share one size; with `channels=1` they are read as grey, which only an image
    without colour is (a colour one is refused rather than converted).

    With `size` (height, width), the models' input, a tree's images of any other size
    are resized to it as Keras' `image_dataset_from_directory(image_size=...)` resizes
    them (bilinear, the aspect ratio not kept), to the nearest pixel value; without,
    they must share one size. With `own_size` as well, a tree whose images share one
    size no larger (in pixels) than `size` is read at that size instead: models of
    several sizes each resize it in their graph (`export.at_size`), as exactly as Keras'
    loader did for each, from a quarter of the memory of CIFAR-10's 32x32 images read
    at 64x64.

    The validation images, which combine's fitted rules learn on, are the tree's own
    held-out folder (`val/`, `valid/` or `validation/` beside `train/`) if it has one,
    else the last `validation_split` (default 0.2) of the training images, those Keras'
    `validation_split` holds out. Only they are decoded, not the rest of `train/`.

    Returns:
        `(((x_val, y_val), (x_test, y_test)), class_names, held_out)`, the arrays as
        `load_data`'s but of the tree's image shape and class count (with `pixels`,
        the images stay uint8 pixels, a quarter of float32's memory, which `scale`
        makes `load_data`'s); `held_out` says where the validation images came from.
    """
    if channels not in (1, 3):
        raise DataError(
            f"the models take {channels}-channel images; combine reads grey or RGB ones (1 or 3)"
        )
    spec = _Spec(None, None, channels)
    if size is not None and own_size:
        try:
            own = _Spec(None, None, channels, at_most=tuple(size))
            return _load(data_dir, limit, seed, own, validation_split, held_out=True, pixels=pixels)
        except _SizesDiffer:
            pass  # photos of many sizes, or large ones: read at `size`, as below
    if size is not None:
        spec = _Spec(None, tuple(size), channels, resize=True)
    return _load(data_dir, limit, seed, spec, validation_split, held_out=True, pixels=pixels)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a source must hold: `num_classes` classes of `size` (h, w) images with
    `channels` channels; None takes what a class-folder tree holds."""

    num_classes: int | None
    size: tuple | None
    channels: int
    sized_by: str | None = None  # the image whose size a tree's others must share
    resize: bool = False  # a tree's images of another size are resized to `size`
    at_most: tuple | None = None  # `load_labelled`'s own_size: the largest size kept

    @property
    def shape(self):
        return (*self.size, self.channels)


CIFAR10 = _Spec(NUM_CLASSES, IMAGE_SHAPE[:2], IMAGE_SHAPE[2])


def _load(data_dir, limit, seed, spec, validation_split=None, held_out=False, pixels=False):
    """(arrays, class names, where the validation images came from): with `held_out`,
    the first arrays are the validation images only (`load_labelled`)."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be a positive number of images, got {limit}")
    if data_dir is None:
        train, test, ordered_by_class = _load_keras_download(spec)
    else:
        train, test, ordered_by_class = _load_from_path(Path(data_dir), spec, held_out)
    train_index, test_index = _selection(
        len(train.labels), len(test.labels), ordered_by_class, limit, seed
    )
    first, first_index, where = train, train_index, None  # the first arrays returned
    if held_out and train.held_out is not None:
        folder, first = train.held_out
        if validation_split is not None:
            raise DataError(
                f"{data_dir} holds its own validation images in {folder}/; drop "
                "--validation-split, which would take them from train/ instead"
            )
        first_index = _selection(len(first.labels), 0, False, limit, seed)[0]
        where = f"{folder}/"
    elif held_out:  # as Keras splits: the last fraction, rounded up
        fraction = VALIDATION_SPLIT if validation_split is None else validation_split
        first_index = train_index[math.floor(len(train_index) * (1 - fraction)) :]
        where = f"the last {fraction * 100:g}% of the training images"
    arrays = _normalise(
        *first.take(first_index), *test.take(test_index), len(train.classes), pixels
    )
    return arrays, train.classes, where


def _selection(num_train, num_test, ordered_by_class, limit, seed):
    """Which images to keep, in which order: deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    # Keras' validation_split takes the *last* 20% of the training arrays: on a
    # class-ordered source that would be two classes only, so shuffle first.
    shuffle_train = ordered_by_class or limit is not None
    train_index = rng.permutation(num_train) if shuffle_train else np.arange(num_train)
    test_index = rng.permutation(num_test) if limit is not None else np.arange(num_test)
    if limit is not None:
        train_index, test_index = train_index[:limit], test_index[:limit]
    return train_index, test_index


def save_decoded(path, arrays, key):
    """Writes `load_data`'s arrays to `path` (.npz) as pixels, for `load_decoded`.

    `--parallel`'s member processes read them instead of decoding 60,000 JPEGs each.
    Stored as uint8 pixels and class ids (a quarter of float32's size); `load_decoded`
    rescales them with `load_data`'s own arithmetic, so the arrays are bit for bit the
    ones saved. `key` (a str) names the data and selection they came from.
    """
    (x_train, y_train), (x_test, y_test) = arrays
    np.savez(
        path,
        x_train=_pixels(x_train),
        labels_train=np.argmax(y_train, axis=1),
        x_test=_pixels(x_test),
        labels_test=y_test.reshape(-1),
        key=np.array(key),
    )


def load_decoded(path, key):
    """The arrays `save_decoded` wrote to `path` under `key`, or None if it holds others."""
    with np.load(path) as saved:
        if str(saved["key"]) != key:
            return None
        return _normalise(
            saved["x_train"], saved["labels_train"], saved["x_test"], saved["labels_test"]
        )


def _pixels(x):
    # x = k / 255 in float32 for integer k: x * 255 lies within an ulp of k, so
    # adding a half and truncating recovers k exactly (tests/test_data.py checks all
    # 256 values); np.rint would too, twenty times slower.
    return (x * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def describe_source(data_dir):
    """One line naming where the data comes from, for logs and results."""
    if data_dir is None:
        return "keras.datasets.cifar10 (download)"
    return str(Path(data_dir))


# --------------------------------------------------------------------------- sources


class _Split:
    """Labels up front, images on demand: a subset decodes only the images it keeps."""

    held_out = None  # (folder, _Split): a tree's own validation images, beside train/

    def __init__(self, labels, classes, images=None, decode=None, shape=IMAGE_SHAPE):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self._images = images
        self._decode = decode
        self._shape = shape

    def take(self, index):
        if self._images is not None:
            return self._images[index], self.labels[index]
        images = np.zeros((len(index), *self._shape), np.uint8)
        for row, i in enumerate(index):
            images[row] = self._decode(int(i))
        return images, self.labels[index]


def _cifar10_only(spec, source):
    """CIFAR-10's own formats hold its 32x32 RGB images; grey models cannot read them."""
    if spec.channels != IMAGE_SHAPE[2]:
        raise DataError(
            f"{source} is CIFAR-10, RGB images; the models take {spec.channels}-channel ones"
        )


def _load_keras_download(spec):
    import keras

    _cifar10_only(spec, "keras.datasets.cifar10")
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # urllib, ssl and tar errors all surface here
        raise DataError(
            f"could not download CIFAR-10 ({type(error).__name__}: {error}); "
            "pass --data-dir with a local copy (see docs/cli.md)"
        ) from error
    return (
        _Split(y_train.reshape(-1), CLASS_NAMES, x_train),
        _Split(y_test.reshape(-1), CLASS_NAMES, x_test),
        False,
    )


def _load_from_path(path, spec, held_out=False):
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist; point it at CIFAR-10 (see docs/cli.md)")
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"--data-dir {path} is empty; point it at CIFAR-10 (see docs/cli.md)")
        for folder in (path, path / OFFICIAL_BATCHES_DIR):
            if (folder / TEST_BATCH).is_file():
                _cifar10_only(spec, folder)
                return *_load_batches_dir(folder), False
        return *_load_image_tree(_folder_files(path), path, spec, held_out), True
    if path.suffix.lower() == ".npz":  # before zip: an .npz is a zip of .npy files
        return *_load_npz(path, spec), False
    # Tar first: an uncompressed tar that ends in a .keras (zip) file can look like a zip.
    if tarfile.is_tarfile(path):
        if _sha256(path) == OFFICIAL_ARCHIVE_SHA256:
            _cifar10_only(spec, path)
            return *_load_official_archive(path), False
        files = _tar_files(path)
        if any(name.split("/")[0] == OFFICIAL_BATCHES_DIR for name in files):
            raise DataError(
                f"{path} looks like cifar-10-python.tar.gz but its sha256 is not the "
                f"published {OFFICIAL_ARCHIVE_SHA256}; download it again (or, if you packed "
                f"it yourself, pass the extracted {OFFICIAL_BATCHES_DIR} folder)"
            )
        return *_load_image_tree(files, path, spec, held_out), True
    if zipfile.is_zipfile(path):
        files = _zip_files(path)
        if any(name.split("/")[0] == OFFICIAL_BATCHES_DIR for name in files):
            # The extracted folder, zipped: read as the folder is (no published hash).
            _cifar10_only(spec, path)
            return *_read_batches(files, path, "it must hold all six CIFAR-10 batches"), False
        return *_load_image_tree(files, path, spec, held_out), True
    raise DataError(
        f"{path} is neither a folder nor a readable .tar, .tar.gz or .zip archive "
        "(truncated download?); see docs/cli.md"
    )


def _load_npz(path, spec):
    """Arrays as keras.datasets returns them, saved with np.savez (Keras' own mnist.npz
    is one): x_train, y_train, x_test, y_test; uint8 pixels of (N, height, width) or
    (N, height, width, 1 or 3), integer labels 0, 1, ..."""
    try:
        with np.load(path, allow_pickle=False) as saved:  # nothing in it can run code
            missing = [key for key in NPZ_KEYS if key not in saved.files]
            if missing:
                raise DataError(
                    f"{path} has no {', '.join(missing)}; an .npz needs x_train, y_train, "
                    "x_test and y_test, as keras.datasets returns them"
                )
            arrays = {key: saved[key] for key in NPZ_KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{path} is not a readable .npz ({error})") from error
    splits = []
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.ndim == 3:  # grey, as mnist.npz: (N, 28, 28)
            x = x[..., None]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(
                f"{path}: {x_key} is {x.dtype} of shape {arrays[x_key].shape}; save uint8 "
                "pixels (0..255) of shape (images, height, width) or (images, height, "
                "width, 1 or 3), as keras.datasets returns them"
            )
        y = y.reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise DataError(
                f"{path}: {y_key} must hold one class index (0, 1, ...) per image of "
                f"{x_key}: {len(x)} images, {y_key} {y.dtype} of shape {arrays[y_key].shape}"
            )
        if not len(x):
            raise DataError(f"{path}: {x_key} holds no images")
        splits.append((x, y.astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = splits
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_train's images are {x_train.shape[1:]}, x_test's {x_test.shape[1:]}; "
            "they must share one shape"
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    shape = x_train.shape[1:]
    if spec is CIFAR10 and (shape != IMAGE_SHAPE or num_classes != NUM_CLASSES):
        raise DataError(
            f"{path} holds {num_classes} classes of {'x'.join(map(str, shape))} images; "
            "ensemble.py trains on CIFAR-10's 10 classes of 32x32x3: for other images "
            "build the models with num_classes (models.py) and ensemble them with "
            "python ensemble.py combine"
        )
    if num_classes < 2:
        raise DataError(f"{path}: its labels name one class; a classifier's take two or more")
    x_train, x_test = (
        _with_channels(x, spec.channels, f"{path} holds colour images") for x in (x_train, x_test)
    )
    # An .npz names no classes: CIFAR-10's for training, the labels themselves for
    # combine (an .npz of 10 classes of 32x32x3 could as well be SVHN's digits).
    classes = CLASS_NAMES if spec is CIFAR10 else tuple(map(str, range(num_classes)))
    return _Split(y_train, classes, x_train), _Split(y_test, classes, x_test)


def _load_batches_dir(folder):
    def read(name):
        file = folder / name
        if not file.is_file():
            raise DataError(f"{file} is missing; the folder must hold all six CIFAR-10 batches")
        return _read_batch(file.read_bytes(), file)

    return _join_batches([read(n) for n in TRAIN_BATCHES]), read(TEST_BATCH)


def _load_official_archive(path):
    return _read_batches(_tar_files(path), path, "download cifar-10-python.tar.gz again")


def _read_batches(files, source, remedy):
    """The six batches from an archive's cifar-10-batches-py/; `files` maps names to
    byte readers."""

    def read(name):
        key = f"{OFFICIAL_BATCHES_DIR}/{name}"
        if key not in files:
            raise DataError(f"{source} has no {key}; {remedy}")
        return _read_batch(files[key](), f"{source}:{key}")

    return _join_batches([read(n) for n in TRAIN_BATCHES]), read(TEST_BATCH)


def _load_image_tree(files, source, spec, held_out=False):
    """train/<class>/* and test/<class>/*; `files` maps names to byte readers.

    With `held_out`, also a val/ (valid/, validation/) folder, if there is one, as
    the train split's `held_out`; train/ may then be absent, as nothing of it is read."""
    wrapped = _wrapping_folders(files)

    def listed(split, required=True):
        return _image_entries(files, split, source, required, wrapped)

    test = listed("test", required=False)
    if not test:
        # As the TensorFlow tutorials' cats_and_dogs_filtered.zip is: train/ and
        # validation/. Say which folder to score on rather than only what is missing.
        for folder in HELD_OUT_FOLDERS:
            if listed(folder, required=False):
                raise DataError(
                    f"{source} has {folder}/ but no test/ to score on; rename {folder}/ to "
                    "test/ (combine's fitted rules then learn on the last 20% of train/) "
                    "or add a test/ folder"
                )
        listed("test")  # says that test/<class>/ holds no images
    entries = {"train": listed("train", required=not held_out), "test": test}
    if held_out:
        found = {folder: listed(folder, required=False) for folder in HELD_OUT_FOLDERS}
        found = {folder: images for folder, images in found.items() if images}
        if len(found) > 1:
            raise DataError(
                f"{source} has {' and '.join(f + '/' for f in found)}; keep one folder of "
                "validation images"
            )
        if not entries["train"]:
            if not found:
                listed("train")  # says that train/<class>/ holds no images
            # Models trained elsewhere: combine learns on val/ and scores test/ only.
            entries["train"] = next(iter(found.values()))
        for folder, images in found.items():
            entries[folder] = images
            other = sorted({label for label, _ in images})
            if other != sorted({label for label, _ in entries["test"]}):
                raise DataError(
                    f"{source}: {folder}/ must hold the same class folders as train/ "
                    f"and test/; it holds {', '.join(other)}"
                )
    train_classes = sorted({label for label, _ in entries["train"]})
    test_classes = sorted({label for label, _ in entries["test"]})
    if train_classes != test_classes:
        only = sorted(set(train_classes) ^ set(test_classes))
        raise DataError(
            f"{source}: train/ and test/ must hold the same class folders; "
            f"only in one of them: {', '.join(only)}"
        )
    if spec.num_classes is not None and len(train_classes) != spec.num_classes:
        # Only load_data fixes the class count (CIFAR-10's). A tree of other images is
        # no broken CIFAR-10: say where such images are taken.
        raise DataError(
            f"{source}: expected {spec.num_classes} class folders, found "
            f"{len(train_classes)} ({', '.join(train_classes)}); ensemble.py trains on "
            "CIFAR-10: for other images build the models with num_classes (models.py) "
            "and ensemble them with python ensemble.py combine"
        )
    if len(train_classes) < 2:
        raise DataError(
            f"{source}: found one class folder ({train_classes[0]}); a classifier's "
            "images come in two classes or more, one folder each"
        )
    label_of = {name: index for index, name in enumerate(train_classes)}
    for split_entries in entries.values():
        split_entries.sort()  # class, then file name: independent of the archive's order
    size = spec.size
    if size is None:  # any size, as long as every image has the first one's
        first = entries["train"][0][1]
        size = _image_size(files[first](), f"{source}:{first}")
        if spec.at_most is not None and size[0] * size[1] > spec.at_most[0] * spec.at_most[1]:
            raise _SizesDiffer(f"{source}: {first} is larger than {spec.at_most}")
        spec = dataclasses.replace(spec, size=size, sized_by=f"{source}:{first}")

    def split(split_entries):
        def decode(index):
            name = split_entries[index][1]
            return _decode_image(files[name](), f"{source}:{name}", spec)

        labels = [label_of[label] for label, _ in split_entries]
        return _Split(labels, train_classes, decode=decode, shape=spec.shape)

    train = split(entries["train"])
    for folder in set(entries) - {"train", "test"}:
        train.held_out = folder, split(entries[folder])
    return train, split(entries["test"])


# --------------------------------------------------------------------------- helpers


def _wrapping_folders(files):
    """How many folders wrap the whole tree, as in a zip of a folder of a folder
    (Kaggle's downloads often nest so); hidden files and macOS' __MACOSX/ aside, and
    never a split's own folder (a tree of train/ alone is not train/ wrapping it)."""
    folders = [
        parts[:-1]
        for parts in (PurePosixPath(name).parts for name in files)
        if not any(part.startswith((".", "__MACOSX")) for part in parts)
    ]
    common = 0
    for level in zip(*folders, strict=False):  # down to the shallowest file's folder
        if len(set(level)) > 1 or level[0] in SPLITS:
            break
        common += 1
    return common


# What operating systems leave in a folder of images: Windows Explorer's thumbnail
# caches and folder settings, which zips made on Windows carry along (hidden files,
# macOS' .DS_Store and ._ forks among them, are skipped by their dot).
_OS_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})


def _os_file(name):
    return name.startswith(".") or name.lower() in _OS_FILES


def _image_entries(files, split, source, required=True, wrapped=0):
    """[(class, name)] for the images under <split>/<class>/, below the `wrapped`
    folders that hold the whole tree and one more optional top folder."""
    entries = []
    for name in files:
        parts = PurePosixPath(name).parts[wrapped:]
        if len(parts) == 4 and parts[1] in SPLITS:
            parts = parts[1:]  # archive wrapped in one top-level folder
        if len(parts) != 3 or parts[0] != split or _os_file(parts[2]):
            continue
        if not parts[2].lower().endswith(IMAGE_SUFFIXES):
            raise DataError(
                f"{source}: {name} is not an image ({IMAGE_KINDS}); remove it from the class folder"
            )
        entries.append((parts[1], name))
    if not entries and required:
        raise DataError(
            f"{source} has no images under {split}/<class>/; expected train/<class>/*.jpg "
            "and test/<class>/*.jpg, cifar-10-batches-py or cifar-10-python.tar.gz"
        )
    return entries


def _folder_files(root):
    files = {}
    # Linked folders are followed: splits are often made with links (ln -s
    # ../../all/cat train/cat) rather than copies. A link back to a folder on the way
    # down to it is not: that would walk round until the system refused the path.
    chains = {str(root): {os.path.realpath(root)}}  # each folder's real ancestors
    for dirpath, dirnames, filenames in os.walk(str(root), followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in chain:
                kept.append(name)
                chains[os.path.join(dirpath, name)] = chain | {real}
        dirnames[:] = kept
        for filename in filenames:
            file = Path(dirpath) / filename
            files[file.relative_to(root).as_posix()] = file.read_bytes
    return files


def _tar_files(path):
    """Maps member names to byte readers, refusing members that could escape a folder."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
            files = {}
            for member in members:
                name = member.name
                _refuse_escape(path, name)
                if member.issym() or member.islnk():
                    raise DataError(f"{path}: member {name!r} is a link; archive refused")
                if member.isfile():
                    data = archive.extractfile(member).read()
                    files[name.removeprefix("./")] = _bytes_reader(data)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(
            f"{path} is truncated or corrupt ({error}); download or copy it again"
        ) from error
    return files


def _refuse_escape(path, name):
    """A DataError for an archive member that extracted would land outside its folder
    (nothing is extracted here, but such an archive is not what it claims to be)."""
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise DataError(f"{path}: unsafe member path {name!r}; archive refused")


def _zip_files(path):
    """Maps member names to byte readers, refusing members that could escape a folder,
    as `_tar_files` does."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = {}
            for member in archive.infolist():
                # The format says "/"; some old Windows tools wrote "\\".
                name = member.filename.replace("\\", "/")
                _refuse_escape(path, name)
                if stat.S_ISLNK(member.external_attr >> 16):  # zip -y stores links so
                    raise DataError(f"{path}: member {name!r} is a link; archive refused")
                if member.is_dir():
                    continue
                if member.flag_bits & 0x1:
                    raise DataError(
                        f"{path} is encrypted ({name}); zip it again without a password, "
                        "or pass the extracted folder"
                    )
                files[name] = _bytes_reader(archive.read(member))
    except NotImplementedError as error:  # Deflate64, which some Windows tools write
        raise DataError(
            f"{path} is compressed in a way Python's zipfile cannot read ({error}); zip "
            "it again with the usual deflate (zip -r), or pass the extracted folder"
        ) from error
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DataError(
            f"{path} is truncated or corrupt ({error}); download or copy it again"
        ) from error
    return files


def _bytes_reader(data):
    return lambda: data


# Image modes whose pixels RGB holds exactly. PNG optimisers (oxipng, optipng) store
# an image with no colour as grey ("L") and one of few colours as a palette ("P"),
# losslessly; refusing them would refuse CIFAR-10 itself. Alpha is kept only if opaque.
# CMYK and 16-bit grey would change in conversion, so they stay refused.
_EXACTLY_RGB = frozenset({"RGB", "L", "P", "1", "RGBA", "LA", "PA"})


def pillow():
    """PIL's `Image` module, or a DataError saying how to install it: only image files
    need it, and Keras and its backends install without it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError(
            "reading image files needs Pillow, which is not installed: "
            "pip install pillow (requirements.txt has it)"
        ) from error
    return Image


def _image_size(data, where):
    """(height, width) of one image, to which a tree's others are held."""
    Image = pillow()
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{where} is not a readable image ({error})") from error


def _decode_image(data, where, spec=CIFAR10):
    """One image's uint8 pixels of `spec`'s shape, resized to it if `spec.resize`."""
    return _resized(_decode_pixels(data, where, spec), spec.size)


def _decode_pixels(data, where, spec):
    Image = pillow()
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            height_width = image.size[1], image.size[0]
            if spec is CIFAR10 and (height_width != spec.size or image.mode not in _EXACTLY_RGB):
                raise DataError(
                    f"{where} is {image.size[0]}x{image.size[1]} {image.mode}; CIFAR-10 "
                    "images must be 32x32 RGB"
                )
            if height_width != spec.size and not spec.resize:
                raise _SizesDiffer(
                    f"{where} is {image.size[0]}x{image.size[1]}, {spec.sized_by} is "
                    f"{spec.size[1]}x{spec.size[0]}: the images must share one size"
                )
            if image.mode not in _EXACTLY_RGB:
                raise DataError(
                    f"{where} is a {image.mode} image; give RGB or grey ones (its pixels "
                    "would change in conversion)"
                )
            if image.mode == "RGB" and spec.channels == 3:
                return np.asarray(image, dtype=np.uint8)
            if image.mode == "L" and spec.channels == 1:
                return np.asarray(image, dtype=np.uint8)[..., None]
            pixels = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{where} is not a readable image ({error})") from error
    if pixels[..., 3].min() < 255:  # dropping see-through pixels' alpha would change them
        kind = "CIFAR-10 images" if spec is CIFAR10 else "images"
        raise DataError(f"{where} has transparent pixels; {kind} must be opaque")
    return _with_channels(pixels[..., :3], spec.channels, f"{where} is a colour image")


def _with_channels(pixels, channels, colour):
    """`pixels` (..., 1 or 3 channels) with `channels`: grey given to RGB models in all
    three, RGB whose three agree (the one exact way to read it as grey) to grey ones;
    other RGB for grey models is refused, `colour` saying what it is."""
    if pixels.shape[-1] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    if (pixels[..., :1] != pixels[..., 1:]).any():
        raise DataError(
            f"{colour}; the models take grey images (1 channel), and converting would lose "
            "the colour"
        )
    return pixels[..., :1]


def _resized(pixels, size):
    """`pixels` at `size` (height, width) as image_dataset_from_directory resizes:
    bilinear, without antialiasing, rounded to the nearest pixel value.

    It is keras.ops.image.resize's arithmetic (half-pixel centres, edges clamped), done
    here in NumPy because on JAX that op compiles once per input shape: 0.12 s for each
    photo of a new size, minutes for a tree of photos of varied sizes
    (bench/bench_resize.py). Tests hold it to the op on every backend and to Keras'
    loader."""
    if pixels.shape[:2] == tuple(size):
        return pixels
    values = pixels.astype(np.float32)
    for axis, wanted in enumerate(size):  # rows, then columns: the resize is separable
        low, high, fraction = _linear_taps(values.shape[axis], wanted)
        fraction = fraction.reshape((-1, 1) if axis == 0 else (1, -1))[..., None]
        below, above = np.take(values, low, axis), np.take(values, high, axis)
        values = below + (above - below) * fraction
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _linear_taps(size_in, size_out):
    """For each output position along one axis: the two input positions it lies
    between and its fraction of the way, with pixel centres at i + 0.5 on both."""
    # In float32, as the backends compute it: float64 places a 437-pixel row's taps
    # apart from theirs by up to 0.006 of a pixel value.
    scale = np.float32(size_in) / np.float32(size_out)
    source = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.clip(source, 0, size_in - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (source - low).astype(np.float32)


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds only what the CIFAR-10 batch files hold: dicts, lists, bytes, arrays.

    A pickle can name any importable callable; refusing every global except the
    three NumPy needs to rebuild an array keeps a crafted batch from running code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # NumPy 2 moved it; avoids the shim
        return super().find_class(module, name)


def _read_batch(payload, where):
    try:
        batch = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        images = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except pickle.UnpicklingError as error:
        raise DataError(f"{where} refused: {error}; it is not a CIFAR-10 batch") from error
    except (EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{where} is not a valid CIFAR-10 batch ({error})") from error
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    return _Split(labels, CLASS_NAMES, images)


def _join_batches(batches):
    return _Split(
        np.concatenate([batch.labels for batch in batches]),
        CLASS_NAMES,
        np.concatenate([batch.take(slice(None))[0] for batch in batches]),
    )


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scale(pixels):
    """uint8 pixels as the article's images: x / 255 in float32."""
    # float32, not the article's float64: Keras casts inputs to float32 anyway.
    return pixels.astype(np.float32) / np.float32(255)


def _normalise(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES, pixels=False):
    """The article's scaling: x / 255 (unless `pixels`), one-hot training labels, (N, 1)
    test labels."""
    from keras.utils import to_categorical

    if y_train.size and (y_train.min() < 0 or y_train.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}")
    if not pixels:
        x_train, x_test = scale(x_train), scale(x_test)
    y_train = to_categorical(y_train, num_classes=num_classes).astype(np.float32)
    return (x_train, y_train), (x_test, y_test.reshape(-1, 1).astype(np.int64))
