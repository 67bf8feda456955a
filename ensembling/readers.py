"""Reading image files: class-folder trees in folders, tar and zip archives (nothing
extracted, unsafe members refused), images decoded exactly with Pillow, resized as
Keras' loader resizes, and CIFAR-10's pickled batches rebuilt without running code.
`data.py` builds its sources on these; `predict` reads single images with them."""

import dataclasses
import io
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ensembling.errors import DataError

# What Keras' image_dataset_from_directory reads (its first five), and WebP, which the
# web serves and Pillow reads; an animated GIF or WebP is its first frame, as in Keras.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


IMAGE_KINDS = "PNG, JPEG, BMP, GIF or WebP"


# A tree's own held-out images, beside train/ and test/, for combine's fitted rules.
HELD_OUT_FOLDERS = ("val", "valid", "validation")


SPLITS = ("train", "test", *HELD_OUT_FOLDERS)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a source must hold: `num_classes` classes of `size` (h, w) images with
    `channels` channels; None takes what a class-folder tree holds."""

    num_classes: int | None
    size: tuple | None
    channels: int
    sized_by: str | None = None  # the image whose size a tree's others must share
    resize: bool = False  # a tree's images of another size are resized to `size`
    at_most: tuple | None = None  # `load_labelled`'s own_size: the largest size kept
    cifar10: bool = False  # CIFAR-10 itself: 32x32 RGB only, nothing converted

    @property
    def shape(self):
        return (*self.size, self.channels)


class SizesDiffer(DataError):
    """A tree's images are not all of one size (or of one larger than `Spec.at_most`),
    so they cannot be read at their own: `load_labelled` then resizes them."""


def _parts(name):
    """A relative "/"-separated name's parts, as PurePosixPath(name).parts gives them
    (empty and "." parts dropped), at a quarter of its cost: CIFAR-10 has 60,000 names."""
    return tuple(part for part in name.split("/") if part not in ("", "."))


def wrapping_folders(files):
    """How many folders wrap the whole tree, as in a zip of a folder of a folder
    (Kaggle's downloads often nest so); hidden files and macOS' __MACOSX/ aside, and
    never a split's own folder (a tree of train/ alone is not train/ wrapping it)."""
    folders = [
        parts[:-1]
        for parts in map(_parts, files)
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


def image_entries(files, split, source, required=True, wrapped=0):
    """[(class, name)] for the images under <split>/<class>/, below the `wrapped`
    folders that hold the whole tree and one more optional top folder."""
    entries = []
    for name in files:
        parts = _parts(name)[wrapped:]
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


def folder_files(root):
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


def tar_files(path):
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
    if name.startswith("/") or ".." in _parts(name):
        raise DataError(f"{path}: unsafe member path {name!r}; archive refused")


def zip_files(path):
    """Maps member names to byte readers, refusing members that could escape a folder,
    as `tar_files` does."""
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


def image_size(data, where):
    """(height, width) of one image, to which a tree's others are held."""
    Image = pillow()
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{where} is not a readable image ({error})") from error


def decode_image(data, where, spec):
    """One image's uint8 pixels of `spec`'s shape, resized to it if `spec.resize`."""
    return resized(decode_pixels(data, where, spec), spec.size)


def decode_pixels(data, where, spec):
    Image = pillow()
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            height_width = image.size[1], image.size[0]
            if spec.cifar10 and (height_width != spec.size or image.mode not in _EXACTLY_RGB):
                raise DataError(
                    f"{where} is {image.size[0]}x{image.size[1]} {image.mode}; CIFAR-10 "
                    "images must be 32x32 RGB"
                )
            if height_width != spec.size and not spec.resize:
                raise SizesDiffer(
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
        kind = "CIFAR-10 images" if spec.cifar10 else "images"
        raise DataError(f"{where} has transparent pixels; {kind} must be opaque")
    return with_channels(pixels[..., :3], spec.channels, f"{where} is a colour image")


def with_channels(pixels, channels, colour):
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


def resized(pixels, size):
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


class BatchUnpickler(pickle.Unpickler):
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
