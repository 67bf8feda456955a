"""`python ensemble.py combine A.keras B.keras ...`: any saved image classifiers, ensembled.

The article's members are not the only ones worth combining. Each file is loaded in
safe mode (unless --no-safe-mode; custom layers come from --custom-objects) and must
take images scaled to [0, 1] (the article's x / 255; one at chance on them but not on
0..255 pixels is given those, `on_raw_pixels`) to class probabilities (or logits, or
one unit for two classes: `prediction.output_kind`), whatever its architecture:
CIFAR-10's 32x32x3 images and 10 classes, or those of any class-folder tree
`--data-dir` names (`data.load_labelled`: any number of classes, RGB or grey,
resized to the models' input size as image_dataset_from_directory resizes, or of
one size for models that take any). Models of several input sizes take the images
at their own size if they share one no larger than the largest input, else at the
largest, each through a Resizing layer to its own (`export.at_size`). Every model
predicts the test set once, and every subset of models (beyond six: each, all but
each, and all) is scored under every `--combine` rule with the full report's
metrics, exactly as `ensemble.py` scores its own members; `--export` writes the
chosen combination as one `.keras` file.

The fitted rules (`weighted`, `select`, `stack`, `temperature`) learn on the tree's
own `val/` folder if it has one, else on the last `--validation-split` of the training set,
never on the test set; they are fair only if the models did not train on those
images (the article's members hold that split out).
"""

import os
import re
from pathlib import Path

import keras
import numpy as np

import data
from ensembling import (
    backend,
    checkpoints,
    combination,
    export,
    prediction,
    report,
)
from ensembling.cli.exits import exit_code
from ensembling.cli.options import parse
from ensembling.rows import per_class_errors, subset_name, table_rows

RESULTS_STEM = "combine"  # combine.json and combine.md in --logs-dir


def parse_args(argv):
    """combine's flags (ensembling/cli/options.py declares them all)."""
    return parse(["combine", *argv])


def model_names(paths):
    """Each model's name: its file's stem, with as many of its folders as tell it apart.

    Seeds of one model are often saved as runs/seed1/model.keras, runs/seed2/model.keras:
    they are named seed1_model and seed2_model. Keras refuses "/" in a name, hence "_".
    """
    parts = [(*path.parent.parts[1:], path.stem) for path in paths]  # parts[0]: the root
    depth = [1] * len(paths)
    for _ in range(max(map(len, parts))):
        names = [_valid_name("_".join(p[-d:])) for p, d in zip(parts, depth, strict=True)]
        twice = combination.repeated(names)
        if twice is None:
            return names
        for i, name in enumerate(names):  # distinct files: a folder more tells them apart
            if name == twice:
                depth[i] += 1
    # Only names that differ in "_" or in what _valid_name replaces get here
    # (a_b/m.keras beside a/b/m.keras, "a b.keras" beside a_b.keras): number them.
    return [_valid_name(f"{path.stem}_{i}") for i, path in enumerate(paths, start=1)]


def _valid_name(name):
    """`name` as TensorFlow takes a name scope: letters, digits and "_.-" ("/" would nest).

    Files are named freely ("my model.keras", "_draft.keras"); TensorFlow refuses such
    a model's name when it predicts.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_-")
    return name or "model"


MODEL_SUFFIXES = (".keras", ".h5")


def model_files(path):
    """[path] for a file; for a folder, the .keras and .h5 model files in it and in its
    folders, by path: a run's --export-members folder, or a folder of such folders,
    one per seed. Checkpoints (.weights.h5, weights only) and hidden files and folders
    are left out; a SavedModel folder stays, for `export.load` to say what it is."""
    folder = Path(path)
    if str(path) == "" or not folder.is_dir() or (folder / "saved_model.pb").is_file():
        return [path]
    found = sorted(
        str(file)
        for file in folder.rglob("*")
        if file.suffix in MODEL_SUFFIXES
        and not file.name.endswith(".weights.h5")
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
        and file.is_file()
    )
    if not found:
        raise export.ExportError(
            f"folder {path} holds no model files (.keras or .h5); give the models, or "
            "the folder that --export-members wrote"
        )
    return found


def check(args):
    """The names the models go by (`model_names`), or an ExportError saying what to fix.
    A folder among the models stands for its model files (`model_files`)."""
    args.models = [found for given in args.models for found in model_files(given)]
    if len(args.models) < 2:
        raise export.ExportError("combine needs at least two models to ensemble")
    resolved = [Path(path).resolve() for path in args.models]
    twice = combination.repeated(resolved)
    if twice:
        raise export.ExportError(f"model {twice} is given twice; give each model once")
    # Named after the paths as given (a link's name, not its target's), tidied of "..".
    names = model_names([Path(os.path.normpath(Path(path).absolute())) for path in args.models])
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        raise export.ExportError(
            f"--validation-split must lie strictly between 0 and 1, got {args.validation_split}"
        )
    if not 0 <= args.seed < 2**32:
        raise export.ExportError(f"--seed must lie between 0 and {2**32 - 1}, got {args.seed}")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise export.ExportError(f"{flag} must be at least 1, got {value}")
    for flag, given in (("--data-dir", args.data_dir), ("--logs-dir", args.logs_dir)):
        if given == "":  # Path("") is the current folder
            raise export.ExportError(f"{flag} is empty (an unset shell variable?); give a path")
    if Path(args.logs_dir).exists() and not Path(args.logs_dir).is_dir():
        raise export.ExportError(f"--logs-dir {args.logs_dir} is a file, not a folder")
    if args.export is not None:
        # As ensemble.py does: the logs folder first, since the export may go in it.
        Path(args.logs_dir).mkdir(parents=True, exist_ok=True)
        export.check_export_path(args.export)
        if Path(args.export).resolve() in resolved:  # it would replace that model
            raise export.ExportError(
                f"--export {args.export} is one of the models to combine, which it would "
                "replace; give the ensemble a file of its own"
            )
    if args.export is None and args.export_rule != "average":
        raise export.ExportError(f"--export-rule {args.export_rule} needs --export PATH.keras")
    if args.save_probs is not None:
        Path(args.logs_dir).mkdir(parents=True, exist_ok=True)  # it may lie there too
        export.check_output("--save-probs", args.save_probs, ".npz")
        # An .npz --data-dir (mnist.npz) is the one file of that suffix this reads.
        if args.data_dir and Path(args.save_probs).resolve() == Path(args.data_dir).resolve():
            raise export.ExportError(
                f"--save-probs {args.save_probs} is the --data-dir this command reads, which "
                "it would replace; give the probabilities a file of their own"
            )
    return names


def run(args):
    """Loads, predicts once, scores every subset under every rule; returns (rows, extra)."""
    names = check(args)
    models = {}
    custom = export.custom_objects(args.custom_objects)
    for name, path in zip(names, args.models, strict=True):
        model = export.load(path, "model", "saved by model.save", custom, args.safe_mode)
        model.name = name  # nested models need distinct names in an exported file
        models[name] = model
    Path(args.logs_dir).mkdir(parents=True, exist_ok=True)
    arrays, classes, held_out, resized = _read_images(args, names, models)
    (x_val, y_val), (x_test, y_test) = arrays
    val_labels = np.argmax(y_val, axis=1)
    if len(names) > combination.EVERY_SUBSET_UP_TO and not args.every_subset:
        # Which subset to keep is what --combine select answers, without the test set.
        pick = "" if "select" in args.combine else "; --combine select picks one"
        print(
            f"{len(names)} models make {2 ** len(names) - 1} subsets, too many to score "
            "in good time: scoring each model, all but each one, and all of them "
            f"(--every-subset scores every one{pick})"
        )

    def predict_one(name, images, raw=False):
        probs = prediction.predict(models[name], images, args.batch_size, args.tta, raw)
        return prediction.probabilities(f"model {name}", probs)

    def predict(images):
        return {name: predict_one(name, images) for name in names}

    test_probs, kinds = {}, {}
    for name, path in zip(names, args.models, strict=True):
        # One that outputs logits or one unit is wrapped to output probabilities: then
        # the table and the exported file compute the same.
        models[name], kinds[name], test_probs[name] = prediction.predict_probabilities(
            models[name], x_test, args.batch_size, args.tta, label=f"model {path}"
        )
        if kinds[name] != "softmax":
            print(f"note: model {name} outputs {_KIND_NOTES[kinds[name]]}")
    raw_pixels, at_chance = _rescue_raw_pixels(
        names, models, test_probs, (x_test, y_test[:, 0]), (x_val, val_labels), predict_one
    )
    fitted = set(args.combine) | ({args.export_rule} if args.export else set())
    wanted = fitted & set(combination.FITTED_RULES) or args.save_probs
    val_probs = predict(x_val) if wanted else {}
    rows = table_rows(
        names,
        args.combine,
        test_probs,
        val_probs,
        val_labels,
        y_test[:, 0],
        args.every_subset or None,
    )
    extra = {
        "per_class_errors": per_class_errors(names, test_probs, y_test[:, 0], classes),
        "models": dict(zip(names, args.models, strict=True)),
        "classes": list(classes),
        "validation_images": held_out,
        "outputs": kinds,
        "raw_pixels": raw_pixels,
        "resized_inputs": resized,
        "at_chance": at_chance,
    }
    if args.save_probs:
        extra["probabilities"] = save_probabilities(
            args.save_probs, names, classes, (test_probs, y_test[:, 0]), (val_probs, val_labels)
        )
    if args.export:
        extra["export"] = export.export(
            args.export,
            list(models.values()),
            args.export_rule,
            [val_probs[n] for n in names] if val_probs else None,
            val_labels,
            classes,
        )
        extra["export"]["loading_flags"] = export.loading_flags(args)
    if args.cost:
        sample = data.scale(x_test[: report.THROUGHPUT_BATCH])
        extra["costs"] = measure_costs(models, args, sample, extra.get("export"), custom)
    return rows, extra


def _read_images(args, names, models):
    """The validation and test images at the models' input size, resizing the models
    that take another; returns (arrays, classes, held_out, {name: its own size})."""
    channels = _one_kind(args.models, list(models.values()))
    # The fitted rules learn on the validation images only: the rest of the training
    # set is never decoded, and the images stay uint8 pixels until a batch is predicted
    # (a data set of large images would not fit in memory in float32). A tree's images
    # are resized to the models' input, as image_dataset_from_directory resized the
    # images they trained on.
    own = {name: export.fixed_size(model) for name, model in models.items()}
    several = len(set(own.values()) - {None}) > 1
    size = export.largest_size(models.values())
    arrays, classes, held_out = data.load_labelled(
        args.data_dir,
        args.limit,
        args.seed,
        channels,
        args.validation_split,
        True,
        size,
        own_size=several,
    )
    (x_val, _), (x_test, _) = arrays
    resized = {}
    if several:
        # Models of different input sizes: the images are read at their own size if
        # they share one no larger than the largest input (CIFAR-10's 32x32 beside a
        # model fine-tuned at 224x224), else at the largest; each model of another
        # size takes them through a Resizing layer to its own, in the table and in the
        # exported file alike. From their own size, that is what Keras' loader gave it.
        read = tuple(x_test.shape[1:3])
        for name, wanted in own.items():
            if wanted not in (None, read):
                models[name], resized[name] = export.at_size(models[name], read), list(wanted)
    for path, model in zip(args.models, models.values(), strict=True):
        export.check_fits(model, f"model {path}", x_test.shape[1:], len(classes))
    print(
        f"{len(names)} models, {len(classes)} classes, {len(x_test)} test images, "
        f"{len(x_val)} validation images ({held_out})"
    )
    for name, (height, width) in resized.items():
        print(
            f"note: model {name} takes {height}x{width} images: it is given the "
            f"{x_test.shape[1]}x{x_test.shape[2]} images through a Resizing layer to its "
            "size (bilinear), in the table and in an exported file"
        )
    return arrays, classes, held_out, resized


def _rescue_raw_pixels(names, models, test_probs, test, validation, predict_one):
    """Models at chance on [0, 1] pixels that are not on 0..255 take 0..255 from here
    on (their `models` and `test_probs` entries are replaced); returns (those names,
    the names still at chance)."""
    (x_test, labels), (x_val, val_labels) = test, validation
    # A model no better than guessing has almost surely been given its images on the
    # wrong scale; a fixed threshold would not do for two classes as for ten.
    at_chance = [name for name in names if combination.at_chance(test_probs[name], labels)]
    raw_pixels = []
    for name in at_chance:
        # The likeliest cause: a model that rescales its input itself (Rescaling(1/255),
        # as Keras' examples train on image_dataset_from_directory's 0..255 pixels).
        # Whether it is right is decided on the validation images, not the test set.
        if not combination.at_chance(predict_one(name, x_val, raw=True), val_labels):
            raw_pixels.append(name)
            models[name] = on_raw_pixels(models[name])  # the export takes [0, 1] alike
            test_probs[name] = predict_one(name, x_test)
            print(
                f"note: model {name} is at chance on pixels in [0, 1] but not on 0..255 "
                "(it rescales its input itself, as Keras' examples do): it is given "
                "0..255"
            )
    at_chance = [name for name in at_chance if name not in raw_pixels]
    for name in at_chance:  # silently wrong otherwise: every row with it would be noise
        error = combination.error_rate(test_probs[name], labels)
        print(
            f"note: model {name} is at chance level (test error {error:.2f}), on pixels in "
            "[0, 1] and in 0..255; is it a classifier of these images?"
        )
    return raw_pixels, at_chance


def save_probabilities(path, names, classes, test, val):
    """`names`, `classes`, and for the test and validation images (`test` and `val`:
    ({name: probabilities}, labels)) the labels and every model's probabilities,
    stacked as (models, images, classes), to an .npz file: what NumPy's `np.load`
    reads, without pickle. Written whole or not at all."""
    arrays = {"names": np.array(names), "classes": np.array(classes)}
    for split, (probs, labels) in (("test", test), ("val", val)):
        arrays[f"{split}_probs"] = np.stack([probs[n] for n in names]).astype(np.float32)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    # A file object, not a path: np.savez would add ".npz" to the temporary's name.
    with checkpoints.replacing(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)
    return str(path)


def measure_costs(models, args, sample, exported=None, custom=None):
    """The article's warning for any models: each one, the average of all of them as
    one graph, and the exported file as `predict` loads it (for `select`, only the
    models it kept)."""
    members = {
        name: (model, os.path.getsize(path))
        for (name, model), path in zip(models.items(), args.models, strict=True)
    }
    names = list(models)
    everything, _ = export.ensemble_model(list(models.values()), "average")
    total = sum(size for _, size in members.values())
    ensembles = {subset_name(names, names): (everything, total, names)}
    if exported:
        loaded = export.load(exported["path"], "--export", "", custom, args.safe_mode)
        label = f"{Path(exported['path']).name} ({exported['rule']})"
        ensembles[label] = (loaded, os.path.getsize(exported["path"]), exported.get("kept", names))
    return report.measure_costs(members, sample, ensembles)


_KIND_NOTES = {  # prediction.output_kind's kinds other than "softmax"
    "logits": "logits: it is scored, and exported, behind a softmax",
    "sigmoid": "one sigmoid unit: its p scores class 1 and 1 - p class 0",
    "logit": "one logit unit: its sigmoid p scores class 1 and 1 - p class 0",
}


def on_raw_pixels(model):
    """`model` behind a Rescaling(255): it takes [0, 1] images, as every model here does,
    and passes them on in 0..255, the pixels it wants. The wrapper keeps its name."""
    inputs = keras.Input(model.input_shape[1:], name=f"{model.name}_images")
    scaled = keras.layers.Rescaling(255.0, name=f"{model.name}_to_0_255")(inputs)
    return keras.Model(inputs, model(scaled), name=model.name)


def _one_kind(paths, models):
    """The channels of the models' images (3 if none fixes them), or an ExportError for
    models that disagree on channels or classes: one ensemble takes one kind of image
    to one set of classes (of any sizes: `export.at_size` gives each its own)."""
    channels, classes = {}, {}  # each: the first model that fixes it
    for path, model in zip(paths, models, strict=True):
        (_, _, channel_count), class_count = export.image_classifier(model, f"model {path}")
        channels.setdefault(channel_count, path)
        classes.setdefault(class_count, path)
    for counts, says in ((channels, "takes {}-channel images"), (classes, "scores {} classes")):
        counts.pop(None, None)
        if len(counts) > 1:
            (a, first), (b, second) = list(counts.items())[:2]
            raise export.ExportError(
                f"model {first} {says.format(a)} and model {second} {says.format(b)}; "
                "the models of one ensemble must take the same images to the same classes"
            )
    return next(iter(channels), 3)


def main(argv):
    return exit_code(
        "ensemble.py combine", lambda: _main(argv), "then run it again", every_os_error=True
    )


def _main(argv):
    """`python ensemble.py combine ...`; errors reach `ensembling.cli.exit_code`."""
    args = parse_args(argv)
    rows, extra = run(args)
    path = report.save_results(vars(args), rows, extra, stem=RESULTS_STEM)
    print(report.full_table(rows))
    for note in report.table_notes(rows):
        print(note)
    if "costs" in extra:
        print("\ncost on " + ", ".join(backend.devices()))
        print(report.cost_table(extra["costs"], files="file MB"))
    print(f"\nresults saved to {path} and {path.with_suffix('.md')}")
    if "probabilities" in extra:
        print(f"probabilities saved to {extra['probabilities']}")
    if "export" in extra:
        exported = extra["export"]
        print(f"ensemble exported to {exported['path']} ({export.described(exported)})")
        if extra["export"]["loading_flags"]:  # the file holds what these loaded
            print(
                f"note: give predict the same flags to load it: {extra['export']['loading_flags']}"
            )
    return 0
