"""One-file ensembles (`--export PATH.keras`), and the loading and reading of any
saved classifier that `combine` and `predict` (predict.py) share.

The exported model takes one image batch, runs every member (each a nested
`keras.Model`) and combines their softmax outputs with built-in layers only, so
`keras.saving.load_model` reads it in safe mode, under any backend. Members built
under bfloat16 mixed precision stay so; the combining layers are always float32:

    average    keras.layers.Average
    weighted   keras.layers.Rescaling(w_i) per member, then keras.layers.Add
    select     the same over the members ensemble selection picked: the others are
               left out of the file, which is smaller and faster for it
    stack      keras.layers.Concatenate, then Dense(classes, softmax) holding the
               logistic regression fitted on the validation split

The file also names its classes, in the `class_names` entry of the `metadata.json`
that Keras writes into every `.keras` file (and does not read back), so that
`predict` prints them whatever the data set was.
"""

import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
import zipfile
from pathlib import Path

import keras
import numpy as np

import data
from ensembling import checkpoints, combination, prediction
from ensembling.errors import ExportError

EXPORT_RULES = ("average", "weighted", "select", "stack")


def ensemble_model(members, rule, val_member_probs=None, val_labels=None):
    """One `keras.Model` over `members` under `rule`; fitted rules use validation data."""
    twice = combination.repeated([member.name for member in members])
    if twice:  # several seeds of one architecture, say: Keras refuses the file otherwise
        raise ExportError(
            f"two members are both named {twice!r}; give each its own name before "
            f"exporting (model.name = '{twice}_2')"
        )
    if rule in combination.FITTED_RULES and (val_member_probs is None or val_labels is None):
        raise ExportError(
            f"the {rule} rule is fitted on validation images: give their probabilities "
            "from each member (val_member_probs) and their labels (val_labels)"
        )
    shape = _input_shape(members)
    model_input = keras.Input(shape=shape, name="images")
    # Members of a smaller fixed size take the images through a Resizing layer.
    outputs = [at_size(member, shape[:2])(model_input) for member in members]
    fitted = {}
    if rule == "average":
        combined = prediction.average(outputs, name="average")
    elif rule in combination.WEIGHTING_RULES:
        weights = combination.fit_rule_weights(rule, val_member_probs, val_labels)
        fitted["weights"] = [round(float(w), 6) for w in weights]
        scaled = [
            keras.layers.Rescaling(float(w), name=f"weight_{member.name}", dtype="float32")(output)
            for w, member, output in zip(weights, members, outputs, strict=True)
            if w > 0  # what selection never picked weighs nothing: left out of the file
        ]
        if rule == "select":
            fitted["kept"] = [m.name for w, m in zip(weights, members, strict=True) if w > 0]
        # Add takes two or more; a selection of one member is that member (weight 1).
        combined = (
            keras.layers.Add(name="weighted_average", dtype="float32")(scaled)
            if len(scaled) > 1
            else scaled[0]
        )
    elif rule == "stack":
        stacker = combination.fit_stacking(val_member_probs, val_labels)
        dense = keras.layers.Dense(
            stacker["bias"].shape[0], activation="softmax", name="stack", dtype="float32"
        )
        concatenated = keras.layers.Concatenate(name="member_probabilities", dtype="float32")
        combined = dense(concatenated(outputs))
        dense.set_weights([stacker["kernel"].astype("float32"), stacker["bias"].astype("float32")])
    elif rule == "temperature":
        # softmax(log(p) / T) needs a logarithm, which no built-in layer takes, and a
        # custom layer would need this code to load the file.
        raise ExportError(
            "the temperature rule cannot be exported: no built-in Keras layer takes the "
            "logarithm it needs; export average, which predicts the same classes, and "
            "give predict --temperature the T that results.json holds"
        )
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
        save(member, path)
        written[member.name] = str(path)
    return written


def check_export_path(path):
    """Refuses an --export path that cannot be written, before any work is done.

    Run after the folders a run creates exist, as the path may lie in one.
    """
    check_output("--export", path, ".keras")


def check_output(flag, path, suffix, required=True, reads=()):
    """An ExportError for a file `flag` is to write that cannot be: an empty path, one
    not ending in `suffix` (if `required`), a folder, one in a missing or read-only
    folder, or one of the files this command `reads`, which it would replace."""
    if not path:
        raise ExportError(f"{flag} is empty (an unset shell variable?); give a path")
    path = Path(path)
    if required and path.suffix != suffix:
        raise ExportError(f"{flag} {path} must end in {suffix}")
    if path.is_dir():
        name = f" ending in {suffix}" if required else f", such as {path}{suffix}"
        raise ExportError(f"{flag} {path} is a folder; give a file name{name}")
    if not path.parent.is_dir():
        raise ExportError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{flag} {path}: folder {path.parent} is not writable")
    if path.resolve() in {Path(given).resolve() for given in reads if str(given)}:
        raise ExportError(
            f"{flag} {path} is a file this command reads, which it would replace; give it "
            "a file of its own"
        )


def export(path, members, rule, val_member_probs=None, val_labels=None, classes=data.CLASS_NAMES):
    """Writes `ensemble_model(...)` to `path`, naming its outputs' `classes` in the file."""
    model, fitted = ensemble_model(members, rule, val_member_probs, val_labels)
    path = Path(path)
    save(model, path, classes)
    return {"path": str(path), "rule": rule, "bytes": path.stat().st_size, **fitted}


def described(info):
    """How `export` said the file combines its members: the rule, and for a selection
    the members it holds ("select: a, c")."""
    kept = info.get("kept")
    return f"{info['rule']}: {', '.join(kept)}" if kept is not None else info["rule"]


def save(model, path, classes=None):
    """`model.save(path)`, whole or not at all (`checkpoints.replacing`), with the names
    of its output's classes, if given, in the file's metadata."""
    # Keras saves only to a name ending in .keras; hidden, as it is half a file until renamed.
    with checkpoints.replacing(path, path.with_name(f".{path.name}.partial.keras")) as temporary:
        model.save(temporary)
        if classes is not None:
            _add_metadata(temporary, {CLASS_NAMES_KEY: list(classes)})


CLASS_NAMES_KEY = "class_names"
_METADATA = "metadata.json"  # Keras writes it (version, date) and never reads it back


def _add_metadata(path, entries):
    """Adds `entries` to the metadata.json inside the .keras file at `path`.

    A zip entry cannot be edited in place, so the file is written again, each entry
    as Keras stored it. The file count stays Keras' three: a fourth would make Keras
    extract the whole file to disk on loading, looking for assets.
    """
    with zipfile.ZipFile(path) as source:
        stored = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, content in stored:
            if info.filename == _METADATA:
                content = json.dumps({**json.loads(content), **entries}, indent=4)
            target.writestr(info, content)


def class_names(path, num_classes):
    """The class names an exported file carries, or None (an older or other file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = json.loads(archive.read(_METADATA)).get(CLASS_NAMES_KEY)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return None  # a legacy .h5 file, or metadata Keras wrote without names
    ok = isinstance(names, list) and len(names) == num_classes
    return [str(name) for name in names] if ok else None


def load(
    path, what="--model", written_by="written by --export", custom_objects=None, safe_mode=True
):
    """Loads a Keras model (an exported ensemble, or any), by default in safe mode.

    `custom_objects` (from `custom_objects`) and `safe_mode` go to Keras as they are.
    One clear error for anything unreadable; `what` names the file in it.
    `image_classifier` and `check_fits` then say whether it fits the images.
    """
    if path == "":  # an unset shell variable; Path("") would be the current folder
        raise ExportError(f"{what} is empty (an unset shell variable?); give the .keras file")
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        # What tf.keras 2's model.save("folder") wrote. Keras 3 reads it only as an
        # opaque inference layer on TensorFlow (TFSMLayer): no layers to find the output
        # kind or the pixel range in, and no other backend, so it is not taken here.
        raise ExportError(
            f"{what} {path} is a TensorFlow SavedModel folder, which Keras 3 cannot load "
            "as a model; save it again from the Keras that wrote it, as one file: "
            'model.save("model.keras"), or "model.h5" where that Keras has no .keras format'
        )
    if path.is_dir():
        raise ExportError(f"{what} {path} is a folder; give the .keras file {written_by}")
    if not path.is_file():
        raise ExportError(f"{what} {path} does not exist; give the .keras file {written_by}")
    if path.name.endswith(".weights.h5"):
        # The checkpoints in weights/ are the likeliest such file: they hold no layers.
        raise ExportError(
            f"{what} {path} holds weights only, no model; python ensemble.py --eval-only "
            "--export-members DIR (with the run's --weights-dir) writes each trained member "
            "as DIR/<name>.keras, and model.save('name.keras') any model of yours"
        )
    try:
        return keras.saving.load_model(path, custom_objects=custom_objects, safe_mode=safe_mode)
    except Exception as error:  # zip, JSON and deserialisation errors alike
        raise ExportError(_why_not_loaded(f"{what} {path}", str(error), custom_objects)) from error


def _why_not_loaded(model, text, custom_objects):
    """One line for Keras' error `text` on loading `model`: what to do where a flag
    does it (an unknown custom class, a Lambda layer), else the root cause's first
    sentence. Keras wraps that cause in a paragraph about from_config() that would
    send the user down the wrong path."""
    # The second pattern is the legacy .h5 loader's words.
    unknown = re.search(r"Could not locate (class|function) '([^']+)'", text)
    unknown = unknown or re.search(r"Unknown (\w+): '([^']+)'", text)
    if unknown:
        kind, name = unknown.groups()
        # A class saved under register_keras_serializable(package=...) is looked up by
        # that name; one of the same class name defined without it does not match.
        registered = re.search(r"'registered_name': '([^'>]+>[^']+)'", text[unknown.end() :])
        if registered and ">" not in name:
            package = registered.group(1).split(">")[0]
            name = f"{name} (registered as {registered.group(1)}, with "
            name += f"@keras.saving.register_keras_serializable(package={package!r}))"
        where = (
            "none of the --custom-objects given defines (give the file that does)"
            if custom_objects
            else "is not defined here (give the Python file, or module, that defines it "
            "with --custom-objects FILE.py)"
        )
        return f"{model} uses the custom {kind} {name}, which {where}"
    newer = re.search(r"Could not deserialize '(keras\.[\w.]+)' because it is not a Keras", text)
    if newer:  # a Keras class this Keras lacks: the file came from a newer one
        return (
            f"{model} uses {newer.group(1)}, which Keras {keras.__version__} does not have "
            "(a newer Keras saved it?): pip install -U keras"
        )
    library = re.search(r"class '(\w+)' because its parent module ([\w.]+) cannot be", text)
    if library:  # keras_hub's, keras_cv's: Keras imports their modules itself
        name, module = library.groups()
        return (
            f"{model} uses {name} from {module}, which cannot be imported here: install "
            f"the package it comes from (pip install {module.split('.')[0].replace('_', '-')})"
        )
    if "safe_mode=False" in text:  # a Lambda layer, or a lambda as an activation
        return (
            f"{model} holds Python code (a Lambda layer or a lambda), which Keras loads only "
            "from a file you trust: if you trust this one, add --no-safe-mode"
        )
    cause = text.rsplit("Exception encountered:", 1)[-1]
    why = (cause.strip().splitlines() or [""])[0].split(". ")[0][:160]
    return f"{model} is not a loadable Keras model ({why})"


def custom_objects(sources):
    """{name: object} of the classes and functions defined in each of `sources` (a
    Python file, or an importable module's name), imported here: what a model's custom
    layers, losses or activations need to load. Classes registered with
    `keras.saving.register_keras_serializable` are known once imported, wherever they
    are defined. None for no sources; an ExportError for one that does not import."""
    if not sources:
        return None
    found = {}
    for source in sources:
        module = _import(source)
        for name, value in vars(module).items():
            if (isinstance(value, type) or callable(value)) and getattr(
                value, "__module__", None
            ) == module.__name__:
                found[name] = value
    return found


def _import(source):
    """The module of a Python file or an importable name, imported as Python imports
    a script's: its own folder first on the path, so its sibling modules import too."""
    is_file = source.endswith(".py") or os.sep in source or "/" in source
    if not is_file and Path(f"{source}.py").is_file():
        # "my_layers" for ./my_layers.py: python ensemble.py puts its own folder first
        # on the path, not the current one, where the user's file is.
        source, is_file = f"{source}.py", True
    if not is_file:
        try:
            return importlib.import_module(source)
        except ModuleNotFoundError as error:
            if error.name != source and not source.startswith(f"{error.name}."):
                raise ExportError(_import_failed(source, error)) from error
            raise ExportError(
                f"--custom-objects {source}: no such module; give a Python file "
                "(path/to/layers.py) or a module importable from here"
            ) from error
        except Exception as error:
            raise ExportError(_import_failed(source, error)) from error
    path = Path(source)
    if not path.is_file():
        raise ExportError(f"--custom-objects {source} does not exist; give a Python file")
    name = path.stem if path.stem not in sys.modules else f"custom_objects_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up there
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException as error:
        sys.modules.pop(name, None)
        if not isinstance(error, Exception):
            raise  # Ctrl-C, or a sys.exit in the file's top level: theirs to make
        raise ExportError(_import_failed(source, error)) from error
    finally:
        if folder in sys.path:  # unless the file's own code took it out
            sys.path.remove(folder)
    return module


def _import_failed(source, error):
    """One line for an exception raised importing `source`, with where in it."""
    where = ""
    if not isinstance(error, SyntaxError):  # whose message names the line already
        frames = traceback.extract_tb(error.__traceback__)
        mine = [f for f in frames if Path(f.filename).name == Path(source).name] or frames
        if mine:
            where = f", line {mine[-1].lineno}"
    return (
        f"--custom-objects {source} failed to import{where}: {type(error).__name__}: "
        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    ).rstrip(": ")


def image_classifier(model, label):
    """`model`'s (height, width, channels) input and class count (None: any size, or
    unknown), or an ExportError unless it maps one image batch to one score per class
    (or one unit, which scores two: `output_kind`). `label` names the model in the error."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not (inputs and outputs):  # a subclassed model: its shapes show only when it runs
        return (None, None, None), None
    fits = (
        len(inputs) == 1
        and len(outputs) == 1
        and len(inputs[0].shape) == 4
        and inputs[0].shape[-1] in (None, 1, 3)
        and len(outputs[0].shape) == 2
    )
    if not fits:
        raise ExportError(
            f"{label} maps {_shapes(inputs)} to {_shapes(outputs)}; this needs one input of "
            "grey or RGB images (height x width x 1 or 3) and one output of class scores"
        )
    units = outputs[0].shape[-1]
    return tuple(inputs[0].shape[1:]), 2 if units == 1 else units


def check_fits(model, label, image_shape=data.IMAGE_SHAPE, num_classes=data.NUM_CLASSES):
    """An ExportError unless `model` takes `image_shape` images to `num_classes` scores."""
    shape, classes = image_classifier(model, label)
    if not (_fits(shape, image_shape) and _fits((classes,), (num_classes,))):
        raise ExportError(
            f"{label} maps {_shapes(model.inputs)} to {_shapes(model.outputs)}; this needs one "
            f"{'x'.join(map(str, image_shape))} image input and one {num_classes}-class "
            "output, as the images and classes of the data are"
        )


def _fits(shape, expected):
    """Whether a model's shape (None: any size, as a fully convolutional input) takes `expected`."""
    return len(shape) == len(expected) and all(
        d in (None, e) for d, e in zip(shape, expected, strict=True)
    )


def _input_shape(members):
    """The ensemble's input: the largest image size a member fixes (`at_size` gives the
    others theirs), and the channels the first that fixes them gives.

    A fully convolutional member takes (None, None, 3); beside a member that needs
    32x32x3, the ensemble must take 32x32x3, whichever of them comes first.
    """
    channels = [member.input_shape[-1] for member in members]
    return (*(largest_size(members) or (None, None)), next((c for c in channels if c), None))


def largest_size(models):
    """The largest (height, width), in pixels, that one of `models` fixes, or None."""
    sizes = [size for size in map(fixed_size, models) if size]
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def fixed_size(model):
    """The (height, width) `model` takes, or None if it takes any (or does not say)."""
    inputs = getattr(model, "inputs", None)
    size = tuple(inputs[0].shape[1:3]) if inputs else (None, None)
    return None if None in size else size


def at_size(model, size):
    """`model` behind a Resizing layer from `size` (height, width) to its own input size,
    bilinear without antialiasing as image_dataset_from_directory resizes, so that
    models of several input sizes take one ensemble's images. Keeps its name. A model
    of that size or of any size (or where `size` has an axis of None) is returned as is."""
    if fixed_size(model) in (None, tuple(size)) or None in tuple(size):
        return model
    height, width, channels = model.input_shape[1:]
    inputs = keras.Input((*size, channels), name=f"{model.name}_images")
    resized = keras.layers.Resizing(
        height,
        width,
        interpolation="bilinear",
        name=f"{model.name}_to_{height}x{width}",
        dtype="float32",
    )(inputs)
    return keras.Model(inputs, model(resized), name=model.name)


def _shapes(tensors):
    return ", ".join("x".join(str(d) for d in t.shape[1:]) for t in tensors)


def rescales_itself(model):
    """Whether `model` wants pixels in 0..255 because it rescales its input itself: the
    first layer that changes values (past augmentation, off when predicting, and
    resizing or cropping) is a Rescaling by 1/100 or less (Keras' examples'
    Rescaling(1/255); MobileNetV3's and EfficientNet's own) or a Normalization by a
    mean above 2 (ConvNeXt's, or one adapted to 0..255 pixels)."""
    layer = _first_computing_layer(model)
    if isinstance(layer, keras.layers.Rescaling):
        return bool(np.max(np.abs(keras.ops.convert_to_numpy(layer.scale))) <= 0.01)
    if isinstance(layer, keras.layers.Normalization) and getattr(layer, "mean", None) is not None:
        return bool(np.max(np.abs(keras.ops.convert_to_numpy(layer.mean))) > 2)
    return False


_PASSING = (
    keras.layers.InputLayer,
    keras.layers.Resizing,
    keras.layers.CenterCrop,
    keras.layers.Cropping2D,
    keras.layers.ZeroPadding2D,
)


def _first_computing_layer(model):
    """The first of `model`'s layers (nested models' included) that is not in _PASSING
    nor a Random* augmentation layer, or None. Layers come in the order they are called,
    which is the input's path through a model that is one chain at its start."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found = _first_computing_layer(layer)  # None: augmentation only, go on
            if found is not None:
                return found
        elif not (isinstance(layer, _PASSING) or type(layer).__name__.startswith("Random")):
            return layer
    return None


def loading_flags(args):
    """The --custom-objects and --no-safe-mode given, as typed again to load an export."""
    flags = [f"--custom-objects {source}" for source in args.custom_objects or ()]
    return " ".join(flags + ([] if args.safe_mode else ["--no-safe-mode"]))
