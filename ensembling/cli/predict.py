"""`python ensemble.py predict --model PATH.keras IMAGE...`: top classes per image.

The model is an ensemble that `--export` (or `combine --export`) wrote, which names
its classes, or any saved Keras classifier of images that `combine` takes. Each image
file (PNG, JPEG, BMP, GIF or WebP, of any size; a folder stands for its image files)
is read upright and resized to the model's input (`read_pixels`), predicted in
batches, and printed with its top classes; `--csv` also writes every probability.
`--temperature T` calibrates them as `--combine temperature` scored them.
"""

import contextlib
import csv
import math
import sys
from pathlib import Path

import numpy as np

import data
from ensembling import checkpoints, combination, export, prediction, readers
from ensembling.cli.exits import exit_code
from ensembling.cli.flags import TOP_CLASSES
from ensembling.cli.options import parse


def image_files(path):
    """[path] for a file; for a folder, its image files (`readers.IMAGE_SUFFIXES`), by name."""
    if str(path) == "" or not Path(path).is_dir():
        return [path]  # read_pixels says what is wrong with it, if anything
    found = sorted(p for p in Path(path).iterdir() if _is_image_file(p))
    if not found:
        # A class-folder tree's test/ holds its images one level down: say so.
        with_images = sorted(p for p in Path(path).iterdir() if p.is_dir() and _holds_images(p))
        hint = (
            f"; they are only in its folders, such as {with_images[0].name}/, which are not "
            f"searched: give them, e.g. {Path(path) / '*'}"
            if with_images
            else ""
        )
        raise export.ExportError(
            f"folder {path} holds no image files ({readers.IMAGE_KINDS}){hint}"
        )
    return found


def _holds_images(folder):
    try:
        return any(map(_is_image_file, folder.iterdir()))
    except OSError:  # unreadable: it says nothing about where the images are
        return False


def _is_image_file(path):
    # Hidden files (macOS' ._photo.jpg) are not images.
    return (
        path.suffix.lower() in readers.IMAGE_SUFFIXES
        and path.is_file()
        and not path.name.startswith(".")
    )


def read_pixels(path, shape=data.IMAGE_SHAPE):
    """An image file of any size as uint8 pixels of `shape` (height, width, 1 or 3
    channels; an axis of None, as a fully convolutional model's, is CIFAR-10's),
    upright as a viewer shows it (its EXIF orientation applied)."""
    try:
        Image = readers.pillow()
    except data.DataError as error:
        raise export.ExportError(str(error)) from error
    from PIL import ImageOps, UnidentifiedImageError

    if str(path) == "":  # an unset shell variable; "image  does not exist" says nothing
        raise export.ExportError("an image path is empty (an unset shell variable?); give the file")
    height, width, channels = (d or c for d, c in zip(shape, data.IMAGE_SHAPE, strict=True))
    try:
        with Image.open(path) as image:
            # A phone stores a portrait photo as landscape pixels plus an EXIF
            # orientation, which viewers apply; without it the model sees it sideways.
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # a 16-bit grey PNG ("I;16", or "I" in old Pillow)
                # Pillow's convert() clips it to 255 instead of scaling: an image of white.
                levels = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
                image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            return np.asarray(image).reshape(height, width, channels)
    except FileNotFoundError as error:
        raise export.ExportError(f"image {path} does not exist") from error
    except (UnidentifiedImageError, OSError) as error:
        raise export.ExportError(f"image {path} is not a readable image ({error})") from error


def main(argv):
    return exit_code(
        "ensemble.py predict", lambda: _main(argv), "then run it again", every_os_error=True
    )


def _main(argv):
    """`python ensemble.py predict --model PATH.keras IMAGE...`: top classes per image."""
    args = parse(["predict", *argv])
    try:
        paths = [found for given in args.images for found in image_files(given)]
        if args.csv is not None:  # refused before anything is predicted
            reads = [args.model, *paths]
            export.check_output("--csv", args.csv, ".csv", required=False, reads=reads)
        custom = export.custom_objects(args.custom_objects)
        model = export.load(args.model, custom_objects=custom, safe_mode=args.safe_mode)
        label = f"--model {args.model}"
        shape, num_classes = export.image_classifier(model, label)
        num_classes = num_classes or data.NUM_CLASSES  # a subclassed model: CIFAR-10's
        exported_names = export.class_names(args.model, num_classes)  # exported files' only
        names = _names(args, num_classes, exported_names)
        args.top = _checked(args, names)
        raw = args.pixels == "0-255"
        if args.pixels == "auto" and exported_names is None:
            raw = export.rescales_itself(model)  # an exported file takes [0, 1], always
            if raw:
                print(
                    f"note: --model {args.model} rescales its input itself: it is given "
                    "pixels in 0..255 (--pixels 0-1 overrides)",
                    file=sys.stderr,
                )
        rows = _predicted(model, paths, shape, args, raw, label)
        # The CSV is written whole or not at all, at the end; each image's line as soon
        # as its chunk is predicted, so a large folder shows its progress.
        with _csv_table(args.csv, names) as table:
            for chunk_paths, chunk_scores in rows:
                for path, probs in zip(chunk_paths, chunk_scores, strict=True):
                    top = np.argsort(probs)[::-1][: args.top]
                    ranked = ", ".join(f"{names[k]} {probs[k]:.3f}" for k in top)
                    print(f"{path}: {ranked}")
                    table(path, probs)
    except OSError as error:  # writing --csv: the disk full; the file before stays whole
        error.filename = error.filename or args.csv
        raise
    if args.csv is not None:  # stderr: stdout keeps one line per image
        print(f"probabilities of {len(paths)} images written to {args.csv}", file=sys.stderr)
    return 0


def _checked(args, names):
    """Refuses --batch-size, --temperature and --top values that cannot work; returns
    the number of classes to show per image."""
    if args.batch_size < 1:
        raise export.ExportError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise export.ExportError(f"--temperature must be a positive number, got {args.temperature}")
    top = min(TOP_CLASSES, len(names)) if args.top is None else args.top
    if not 1 <= top <= len(names):
        raise export.ExportError(f"--top must lie between 1 and {len(names)}, got {top}")
    return top


CHUNK = 1024  # images read and predicted at once: 150 MB of 224x224 RGB pixels


def _predicted(model, paths, shape, args, raw, label):
    """(paths, probabilities) a chunk of images at a time, so that a folder of any size
    fits in memory: each chunk is read as uint8 pixels (a quarter of float32's memory,
    as in combine) and predicted in batches. What the model outputs is found on the
    first chunk, and every later chunk goes through the model that outputs it as
    probabilities (`prediction.predict_probabilities`)."""
    size = max(CHUNK, args.batch_size)
    for start in range(0, len(paths), size):
        chunk = paths[start : start + size]
        pixels = np.stack([read_pixels(path, shape) for path in chunk])
        if start == 0:
            model, _, probs = prediction.predict_probabilities(
                model, pixels, args.batch_size, args.tta, raw, label
            )
        else:
            outputs = prediction.predict(model, pixels, args.batch_size, args.tta, raw)
            probs = prediction.probabilities(label, outputs)
        if args.temperature != 1:  # 1 leaves the model's own numbers, to the last bit
            probs = combination.with_temperature(probs, args.temperature)
        yield chunk, probs


@contextlib.contextmanager
def _csv_table(path, names):
    """Yields add(image, probabilities), which writes one row of the --csv table (its
    path, its top class and each class's probability), whole or not at all
    (`checkpoints.replacing`); with no path, add does nothing."""
    if path is None:
        yield lambda image, probs: None
        return
    with checkpoints.replacing(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            table = csv.writer(file)
            table.writerow(["image", "predicted", *names])

            def add(image, probs):
                predicted = names[int(np.argmax(probs))]
                table.writerow([str(image), predicted, *(f"{p:.6f}" for p in probs)])

            yield add


def _names(args, num_classes, exported_names):
    """The class names `predict` prints: --classes, the file's own, or defaults."""
    if args.classes is not None:
        if len(args.classes) != num_classes:
            raise export.ExportError(
                f"--classes names {len(args.classes)} classes; --model {args.model} "
                f"scores {num_classes}"
            )
        return args.classes
    if exported_names:
        return exported_names
    if num_classes == data.NUM_CLASSES:  # files exported before they carried names
        return list(data.CLASS_NAMES)
    return [f"class {k}" for k in range(num_classes)]
