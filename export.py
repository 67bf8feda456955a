"""One-file ensembles: `--export PATH.keras` and `python ensemble.py predict`.

The exported model takes one image batch, runs every member (each a nested
`keras.Model`) and combines their softmax outputs with built-in layers only, so
`keras.saving.load_model` reads it in safe mode, under any backend. Members built
under bfloat16 mixed precision stay so; the combining layers are always float32:

    average    keras.layers.Average
    weighted   keras.layers.Rescaling(w_i) per member, then keras.layers.Add
    stack      keras.layers.Concatenate, then Dense(10, softmax) holding the
               logistic regression fitted on the validation split
"""

import os
import sys
from pathlib import Path

import keras
import numpy as np

import checkpoints
import data
import evaluation

EXPORT_RULES = ("average", "weighted", "stack")
TOP_CLASSES = 3


class ExportError(ValueError):
    """The export or the prediction cannot be done; the message says why and what to do."""


def ensemble_model(members, rule, val_member_probs=None, val_labels=None):
    """One `keras.Model` over `members` under `rule`; fitted rules use validation data."""
    twice = evaluation.repeated([member.name for member in members])
    if twice:  # several seeds of one architecture, say: Keras refuses the file otherwise
        raise ExportError(
            f"two members are both named {twice!r}; give each its own name before "
            f"exporting (model.name = '{twice}_2')"
        )
    model_input = keras.Input(shape=_input_shape(members), name="images")
    outputs = [member(model_input) for member in members]
    fitted = {}
    if rule == "average":
        combined = keras.layers.Average(name="average", dtype="float32")(outputs)
    elif rule == "weighted":
        weights = evaluation.fit_weights(val_member_probs, val_labels)
        fitted["weights"] = [round(float(w), 6) for w in weights]
        scaled = [
            keras.layers.Rescaling(float(w), name=f"weight_{member.name}", dtype="float32")(output)
            for w, member, output in zip(weights, members, outputs, strict=True)
        ]
        combined = keras.layers.Add(name="weighted_average", dtype="float32")(scaled)
    elif rule == "stack":
        stacker = evaluation.fit_stacking(val_member_probs, val_labels)
        dense = keras.layers.Dense(
            stacker["bias"].shape[0], activation="softmax", name="stack", dtype="float32"
        )
        concatenated = keras.layers.Concatenate(name="member_probabilities", dtype="float32")
        combined = dense(concatenated(outputs))
        dense.set_weights([stacker["kernel"].astype("float32"), stacker["bias"].astype("float32")])
    else:
        raise ExportError(
            f"--export-rule {rule!r} cannot be exported; choose from {', '.join(EXPORT_RULES)}"
        )
    return keras.Model(model_input, combined, name=f"ensemble_{rule}"), fitted


def export_members(folder, members):
    """Each member as FOLDER/<name>.keras, a model of its own: `combine` takes those of
    several runs (seeds, say), which it tells apart by their folders."""
    written = {}
    for member in members:
        path = Path(folder) / f"{member.name}.keras"
        _save(member, path)
        written[member.name] = str(path)
    return written


def check_export_path(path):
    """Refuses an --export path that cannot be written, before any work is done.

    Run after the folders a run creates exist, as the path may lie in one.
    """
    if not path:
        raise ExportError("--export is empty (an unset shell variable?); give a path")
    path = Path(path)
    if path.suffix != ".keras":
        raise ExportError(f"--export {path} must end in .keras")
    if path.is_dir():
        raise ExportError(f"--export {path} is a folder; give a file name ending in .keras")
    if not path.parent.is_dir():
        raise ExportError(f"--export {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"--export {path}: folder {path.parent} is not writable")


def export(path, members, rule, val_member_probs=None, val_labels=None):
    model, fitted = ensemble_model(members, rule, val_member_probs, val_labels)
    path = Path(path)
    _save(model, path)
    return {"path": str(path), "rule": rule, "bytes": path.stat().st_size, **fitted}


def _save(model, path):
    """`model.save(path)`, whole or not at all (`checkpoints.replacing`)."""
    # Keras saves only to a name ending in .keras; hidden, as it is half a file until renamed.
    with checkpoints.replacing(path, path.with_name(f".{path.name}.partial.keras")) as temporary:
        model.save(temporary)


def load(path, what="--model", written_by="written by --export"):
    """Loads a CIFAR-10 classifier (an exported ensemble, or any) in safe mode.

    One clear error for anything unreadable, or for a model that does not take
    32x32x3 images to 10 classes; `what` names the file in it.
    """
    if path == "":  # an unset shell variable; Path("") would be the current folder
        raise ExportError(f"{what} is empty (an unset shell variable?); give the .keras file")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{what} {path} is a folder; give the .keras file {written_by}")
    if not path.is_file():
        raise ExportError(f"{what} {path} does not exist; give the .keras file {written_by}")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # zip, JSON and deserialisation errors alike
        why = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ExportError(f"{what} {path} is not a loadable Keras model ({why})") from error
    # Any Keras classifier may be given; it must read CIFAR-10 images and score 10 classes.
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if inputs and outputs:
        fits = (
            len(inputs) == 1
            and len(outputs) == 1
            and _fits(inputs[0].shape[1:], data.IMAGE_SHAPE)
            and _fits(outputs[0].shape[1:], (data.NUM_CLASSES,))
        )
        if not fits:
            raise ExportError(
                f"{what} {path} maps {_shapes(inputs)} to {_shapes(outputs)}; this needs one "
                f"{'x'.join(map(str, data.IMAGE_SHAPE))} image input and one "
                f"{data.NUM_CLASSES}-class output"
            )
    return model


def _fits(shape, expected):
    """Whether a model's shape (None: any size, as a fully convolutional input) takes `expected`."""
    return len(shape) == len(expected) and all(
        d in (None, e) for d, e in zip(shape, expected, strict=True)
    )


def _input_shape(members):
    """The ensemble's input: each axis as the first member that fixes it gives it.

    A fully convolutional member takes (None, None, 3); beside a member that needs
    32x32x3, the ensemble must take 32x32x3, whichever of them comes first.
    """
    shapes = [tuple(member.input_shape[1:]) for member in members]
    return tuple(
        next((d for d in axis if d is not None), None) for axis in zip(*shapes, strict=True)
    )


def _shapes(tensors):
    return ", ".join("x".join(str(d) for d in t.shape[1:]) for t in tensors)


def image_files(path):
    """[path] for a file; for a folder, the PNG and JPEG files in it, by name."""
    if str(path) == "" or not Path(path).is_dir():
        return [path]  # read_image says what is wrong with it, if anything
    found = sorted(
        p
        for p in Path(path).iterdir()
        if p.suffix.lower() in data.IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )  # hidden files (macOS' ._photo.jpg) are not images
    if not found:
        raise ExportError(f"folder {path} holds no PNG or JPEG files")
    return found


def read_image(path):
    """A PNG or JPEG of any size as a (32, 32, 3) float32 array in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if str(path) == "":  # an unset shell variable; "image  does not exist" says nothing
        raise ExportError("an image path is empty (an unset shell variable?); give the file")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize(data.IMAGE_SHAPE[:2], Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError as error:
        raise ExportError(f"image {path} does not exist") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ExportError(f"image {path} is not a readable PNG or JPEG ({error})") from error


def predict_main(argv):
    """`python ensemble.py predict --model PATH.keras IMAGE...`: top classes per image."""
    from config import Parser  # config imports this module

    parser = Parser(
        prog="ensemble.py predict",
        description="Classify images with an ensemble exported by --export.",
    )
    parser.add_argument("--model", required=True, help="a .keras file written by --export")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="PNG or JPEG files of any size, or folders of them")  # fmt: skip
    parser.add_argument("--top", type=int, default=TOP_CLASSES, help="classes shown per image")
    args = parser.parse_args(argv)
    try:
        if not 1 <= args.top <= data.NUM_CLASSES:
            raise ExportError(f"--top must lie between 1 and {data.NUM_CLASSES}, got {args.top}")
        paths = [found for given in args.images for found in image_files(given)]
        images = np.stack([read_image(path) for path in paths])
        model = load(args.model)
    except ExportError as error:
        print(f"ensemble.py predict: error: {error}", file=sys.stderr)
        return 2
    probabilities = model.predict(images, verbose=0)
    for path, probs in zip(paths, probabilities, strict=True):
        top = np.argsort(probs)[::-1][: args.top]
        ranked = ", ".join(f"{data.CLASS_NAMES[k]} {probs[k]:.3f}" for k in top)
        print(f"{path}: {ranked}")
    return 0
