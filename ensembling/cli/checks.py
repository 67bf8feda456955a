"""`check_settings`: refuses settings that cannot work, with one line naming the flag,
before any data is read or file written."""

import math
import os
from pathlib import Path

import keras

from ensembling import checkpoints, export
from ensembling.errors import ExportError, UsageError
from ensembling.settings import PRECISIONS, TRAINING_BACKENDS, changes_recipe
from models import MODELS, PAPER_NAMES


def check_settings(settings, trains_members=True):
    """Refuses settings that cannot work, before any data is read or file written.
    distill trains no member (`trains_members`): the members' recipe is theirs."""
    _check_values(settings)
    _check_flag_pairs(settings)
    _check_backend(settings)
    _check_paths(settings, trains_members)


def _check_values(settings):
    """Each value on its own: known models, numbers in range."""
    unknown = [name for name in settings.models if name not in MODELS]
    if unknown:
        # The article's names ("NIN", "ALL-CNN-C") are what a reader of it would type.
        by_paper_name = {paper.lower(): name for name, paper in PAPER_NAMES.items()}
        meant = by_paper_name.get(unknown[0].lower())
        hint = f" ({meant} is {PAPER_NAMES[meant]})" if meant else ""
        raise UsageError(f"unknown model {unknown[0]!r}{hint}; choose from {', '.join(MODELS)}")
    if len(set(settings.models)) != len(settings.models):
        raise UsageError("--models lists a model twice; name each once")
    if settings.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {settings.epochs}")
    if settings.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if not 0 < settings.validation_split < 1:
        raise UsageError(
            f"--validation-split must lie strictly between 0 and 1, got {settings.validation_split}"
        )
    if not 0 < settings.learning_rate < math.inf:  # NaN fails too
        raise UsageError(
            f"--learning-rate must be a positive finite number, got {settings.learning_rate}"
        )
    if not 0 <= settings.seed < 2**32:  # what NumPy's legacy seeding, under Keras', takes
        raise UsageError(f"--seed must lie between 0 and {2**32 - 1}, got {settings.seed}")
    if settings.restarts < 0:
        raise UsageError(f"--restarts must be 0 or more, got {settings.restarts}")
    if settings.limit is not None and settings.limit < 1:
        raise UsageError(f"--limit must be a positive number of images, got {settings.limit}")
    if not 0 <= settings.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must lie in [0, 1), got {settings.label_smoothing}")
    if not 0 <= settings.weight_decay < math.inf:
        raise UsageError(
            f"--weight-decay must be 0 or more and finite, got {settings.weight_decay}"
        )
    if settings.dropout is not None and not 0 <= settings.dropout < 1:
        raise UsageError(f"--dropout must lie in [0, 1), got {settings.dropout}")
    if not 0 <= settings.input_dropout < 1:
        raise UsageError(f"--input-dropout must lie in [0, 1), got {settings.input_dropout}")
    if not 0 <= settings.warmup_epochs < settings.epochs:  # else it never reaches the rate
        raise UsageError(
            f"--warmup-epochs must be 0 or more and fewer than --epochs ({settings.epochs}), "
            f"got {settings.warmup_epochs}"
        )


def _check_flag_pairs(settings):
    """Flags that cannot go together."""
    if settings.distribute and (settings.joint or changes_recipe(settings)):
        raise UsageError(
            "--distribute spreads the article's one-member fit over devices; it does not "
            "combine with --joint or the recipe options of --preset fast"
        )
    if settings.parallel and (settings.joint or settings.distribute):
        if settings.joint:
            other = "--joint trains them in one step"
        else:
            other = "--distribute spreads one member over every device"
        raise UsageError(
            f"--parallel trains each member in a process of its own and {other}; pick one"
        )
    for flag, given in (("--parallel", settings.parallel), ("--train-only", settings.train_only)):
        if settings.eval_only and given:
            raise UsageError(f"{flag} is about training and --eval-only trains none; pick one")
    exports = [
        ("--export", settings.export, "ensemble"),
        ("--export-members", settings.export_members, "members"),
    ]
    for flag, given, what in exports:
        if settings.train_only and given is not None:
            raise UsageError(
                f"{flag} writes the evaluated {what} and --train-only evaluates none; "
                f"drop one, or export later with --eval-only {flag}"
            )


def _check_backend(settings):
    """What the backend can do, the precision, and --export-rule's need of --export."""
    backend = keras.backend.backend()
    if not settings.eval_only and backend not in TRAINING_BACKENDS:
        # Keras' numpy and openvino backends only predict: fit raises NotImplementedError.
        raise UsageError(
            f"KERAS_BACKEND={backend} cannot train (Keras' {backend} backend only "
            "predicts); set KERAS_BACKEND to tensorflow, jax or torch, or score trained "
            "checkpoints with --eval-only"
        )
    if settings.distribute and backend not in ("jax", "tensorflow"):
        # Refused here, before the data loads; training.distribution_scope agrees.
        raise UsageError(
            f"--distribute needs the jax or tensorflow backend, not {backend}; "
            "set KERAS_BACKEND=jax or drop --distribute"
        )
    if settings.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if settings.export is None and settings.export_rule != "average":
        raise UsageError(
            f"--export-rule {settings.export_rule} chooses how an exported file combines its "
            "members; add --export PATH.keras"
        )
    if settings.eval_only and settings.retrain:
        raise UsageError("--retrain trains the members again and --eval-only trains none; pick one")


def _check_paths(settings, trains_members):
    """Folders that exist or can be made and written, files that do not collide, and
    checkpoints trained with these flags."""
    for flag, given in (
        ("--data-dir", settings.data_dir),
        ("--weights-dir", settings.weights_dir),
        ("--logs-dir", settings.logs_dir),
        ("--export", settings.export),
        ("--export-members", settings.export_members),
    ):
        if given == "":  # Path("") is the current folder: checkpoints would land there
            raise UsageError(f"{flag} is empty (an unset shell variable?); give a path")
    if settings.export is not None and Path(settings.export).suffix != ".keras":
        raise UsageError(f"--export {settings.export} must end in .keras")
    folders = [("--weights-dir", settings.weights_dir), ("--logs-dir", settings.logs_dir)]
    if settings.export_members is not None:
        folders.append(("--export-members", settings.export_members))
    for flag, folder in folders:
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {folder} is a file, not a folder; choose a folder")
        if settings.eval_only and flag == "--weights-dir":
            if not path.is_dir():
                raise UsageError(f"--weights-dir {folder} does not exist; train first")
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {flag} {folder} ({error.strerror})") from error
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {folder} is not writable; choose another folder")
    if trains_members and not settings.eval_only and not settings.retrain:
        for name in settings.models:
            conflict = checkpoints.recipe_conflict(name, settings)
            if conflict:
                raise UsageError(conflict)
    if settings.export is not None:  # after the folders above exist: it may be in one
        try:
            export.check_export_path(settings.export)
        except ExportError as error:
            raise UsageError(str(error)) from error
    if settings.export is not None and settings.export_members is not None:
        # Either file would replace the other, and the last one written would win.
        member_files = {
            Path(settings.export_members, f"{name}.keras").resolve(): name
            for name in settings.models
        }
        name = member_files.get(Path(settings.export).resolve())
        if name is not None:
            raise UsageError(
                f"--export {settings.export} is where --export-members writes {name}; "
                "give the ensemble a file of its own"
            )


def check_training_images(settings, count):
    """Refuses a validation split or a batch that leaves nothing to train on, once the
    data's `count` training images are known."""
    train_images = int(count * (1 - settings.validation_split))
    if train_images == 0:  # "lower --batch-size" would not do
        raise UsageError(
            f"--validation-split {settings.validation_split:g} of {count} images leaves "
            "none to train on; raise --limit or lower --validation-split"
        )
    if settings.batch_size > train_images:
        raise UsageError(
            f"--batch-size {settings.batch_size} exceeds the {train_images} training "
            "images left after the validation split; lower it or raise --limit"
        )
