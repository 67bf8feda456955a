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
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ensembling import readers
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
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # keras.datasets' arrays, saved
VALIDATION_SPLIT = 0.2  # the article's, and combine's default


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
    spec = readers.Spec(None, None, channels)
    if size is not None and own_size:
        try:
            own = readers.Spec(None, None, channels, at_most=tuple(size))
            return _load(data_dir, limit, seed, own, validation_split, held_out=True, pixels=pixels)
        except readers.SizesDiffer:
            pass  # photos of many sizes, or large ones: read at `size`, as below
    if size is not None:
        spec = readers.Spec(None, tuple(size), channels, resize=True)
    return _load(data_dir, limit, seed, spec, validation_split, held_out=True, pixels=pixels)


CIFAR10 = readers.Spec(NUM_CLASSES, IMAGE_SHAPE[:2], IMAGE_SHAPE[2], cifar10=True)


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
        return *_load_image_tree(readers.folder_files(path), path, spec, held_out), True
    if path.suffix.lower() == ".npz":  # before zip: an .npz is a zip of .npy files
        return *_load_npz(path, spec), False
    # Tar first: an uncompressed tar that ends in a .keras (zip) file can look like a zip.
    if tarfile.is_tarfile(path):
        if _sha256(path) == OFFICIAL_ARCHIVE_SHA256:
            _cifar10_only(spec, path)
            return *_load_official_archive(path), False
        files = readers.tar_files(path)
        if any(name.split("/")[0] == OFFICIAL_BATCHES_DIR for name in files):
            raise DataError(
                f"{path} looks like cifar-10-python.tar.gz but its sha256 is not the "
                f"published {OFFICIAL_ARCHIVE_SHA256}; download it again (or, if you packed "
                f"it yourself, pass the extracted {OFFICIAL_BATCHES_DIR} folder)"
            )
        return *_load_image_tree(files, path, spec, held_out), True
    if zipfile.is_zipfile(path):
        files = readers.zip_files(path)
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
        readers.with_channels(x, spec.channels, f"{path} holds colour images")
        for x in (x_train, x_test)
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
    return _read_batches(readers.tar_files(path), path, "download cifar-10-python.tar.gz again")


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
    wrapped = readers.wrapping_folders(files)

    def listed(split, required=True):
        return readers.image_entries(files, split, source, required, wrapped)

    test = listed("test", required=False)
    if not test:
        # As the TensorFlow tutorials' cats_and_dogs_filtered.zip is: train/ and
        # validation/. Say which folder to score on rather than only what is missing.
        for folder in readers.HELD_OUT_FOLDERS:
            if listed(folder, required=False):
                raise DataError(
                    f"{source} has {folder}/ but no test/ to score on; rename {folder}/ to "
                    "test/ (combine's fitted rules then learn on the last 20% of train/) "
                    "or add a test/ folder"
                )
        listed("test")  # says that test/<class>/ holds no images
    entries = {"train": listed("train", required=not held_out), "test": test}
    if held_out:
        found = {folder: listed(folder, required=False) for folder in readers.HELD_OUT_FOLDERS}
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
        size = readers.image_size(files[first](), f"{source}:{first}")
        if spec.at_most is not None and size[0] * size[1] > spec.at_most[0] * spec.at_most[1]:
            raise readers.SizesDiffer(f"{source}: {first} is larger than {spec.at_most}")
        spec = dataclasses.replace(spec, size=size, sized_by=f"{source}:{first}")

    def split(split_entries):
        def decode(index):
            name = split_entries[index][1]
            return readers.decode_image(files[name](), f"{source}:{name}", spec)

        labels = [label_of[label] for label, _ in split_entries]
        return _Split(labels, train_classes, decode=decode, shape=spec.shape)

    train = split(entries["train"])
    for folder in set(entries) - {"train", "test"}:
        train.held_out = folder, split(entries[folder])
    return train, split(entries["test"])


# --------------------------------------------------------------------------- helpers


def _read_batch(payload, where):
    try:
        batch = readers.BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
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
