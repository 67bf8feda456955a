"""Ensembling ConvNets using Keras (Mikhaylov, 2017), reproduced in Keras 3.

    python ensemble.py                        # the article: download, train, reload, ensemble
    python ensemble.py --data-dir ../shared/data/cifar10-jpeg.tar.gz   # the same, offline
    python ensemble.py --eval-only            # ensemble the checkpoints already in weights/

Three CIFAR-10 ConvNets (ConvPool-CNN-C, ALL-CNN-C, NIN) are trained one after the
other for 20 epochs each with Adam at batch 32, checkpointing the weights with the
lowest training loss. Fresh copies on one shared input then reload those weights,
and their softmax outputs are averaged: all three, and each pair. The article
reports 24.1 / 26.1 / 31.6% test error for the members and 20.5% for all three.
"""

import math
import os
import signal
import sys

try:
    import keras
except (ImportError, ValueError) as error:  # the backend Keras was told to use fails
    if __name__ != "__main__":
        raise
    # Run as the program: one line, not Keras' traceback. ValueError: no such backend
    # ("Unable to import backend : jaxx"); ImportError: it is not installed.
    chosen = os.environ.get("KERAS_BACKEND")
    named = (
        f"KERAS_BACKEND={chosen}"
        if chosen
        else "its default backend (KERAS_BACKEND is unset: tensorflow, or what keras.json names)"
    )
    print(
        f"ensemble.py: error: Keras cannot load {named}: {error}; set KERAS_BACKEND to "
        "tensorflow, jax or torch, one that is installed (docs/gpu.md)",
        file=sys.stderr,
    )
    sys.exit(2)
import numpy as np

import data
from ensembling import backend, checkpoints, cli, combination, export, parallel, report, rows
from ensembling.cli import checks, exits
from ensembling.errors import UsageError
from ensembling.prediction import ensemble, evaluate_error, predict_members
from ensembling.settings import Settings
from ensembling.train import compile_and_train, load_members, train_members
from models import MODELS

__all__ = ["MODELS", "Settings", "compile_and_train", "ensemble", "evaluate_error", "main", "run"]


def run(settings):
    """Trains (unless `eval_only`), reloads the best weights, ensembles, scores.

    Returns (rows of the results table, extra results). Models are built under
    `settings.precision` (Keras' global dtype policy, restored afterwards).
    """
    with backend.DtypePolicy(backend.resolve_precision(settings.precision)):
        return _run(settings)


def _run(settings):
    # 1. The data: CIFAR-10 as x / 255, one-hot training labels, test labels (N, 1).
    arrays = load_arrays(settings)
    (x_train, y_train), (x_test, y_test) = arrays
    # Seeded after the data, whose selection has a seed of its own: Keras' seeding
    # imports TensorFlow where installed, seconds that a bad --data-dir need not wait.
    keras.utils.set_random_seed(settings.seed)

    # 2-3. The three models, each compiled and trained with checkpoints (compile_and_train).
    trained = {"train_seconds": {}, "attempts": {}, "failed": {}}
    if not settings.eval_only:
        trained = train_members(settings, arrays, keras.Input(shape=x_train.shape[1:]))
    if settings.train_only:
        return None, trained
    failed = trained["failed"]
    names = [n for n in settings.models if n not in failed or best_checkpoint_exists(n, settings)]
    for name in set(settings.models) - set(names):
        print(f"{name} is left out of the ensembles: {failed[name]} before any checkpoint")
    if not names:
        raise UsageError("every member failed to train; see the messages above")

    # 4. As the article: new instances on one shared input, best weights reloaded.
    model_input = keras.Input(shape=x_train.shape[1:])
    members = load_members(names, model_input, settings.weights_dir)
    in_progress = note_unfinished(members, settings)

    # 5. Each member predicts once; every row (the article's 7 first) is scored from
    # these probabilities. Fitted rules learn on the validation split Keras held out.
    test_probs = predict_members(members, x_test, settings)
    split_at = math.floor(len(x_train) * (1 - settings.validation_split))  # as Keras
    x_val, val_labels = x_train[split_at:], np.argmax(y_train[split_at:], axis=1)
    fitted_rules = set(settings.combine) | ({settings.export_rule} if settings.export else set())
    val_probs = {}
    if fitted_rules & set(combination.FITTED_RULES):
        val_probs = predict_members(members, x_val, settings)
    labels = y_test[:, 0]
    table = rows.table_rows(names, settings.combine, test_probs, val_probs, val_labels, labels)

    # 6. What else the results hold: per-class errors, costs, the exported files.
    extra = {
        "per_class_errors": rows.per_class_errors(names, test_probs, labels, data.CLASS_NAMES),
        **{key: trained[key] for key in ("train_seconds", "attempts", "failed")},
        "checkpoints": {name: str(path) for name, (_, path) in members.items()},
        # What the checkpoints were trained with, which --eval-only's settings need not say.
        "trained_with": {name: checkpoints.recorded_recipe(name, settings) for name in members},
        "not_fully_trained": in_progress,
    }
    if trained.get("epoch_seconds"):  # joint training: where each epoch's time went
        extra["epoch_seconds"] = trained["epoch_seconds"]
    if settings.cost:
        sized = {name: (model, path.stat().st_size) for name, (model, path) in members.items()}
        extra["costs"] = report.measure_costs(
            sized, x_test, report.every_average(sized, model_input)
        )
    models = [members[n][0] for n in names]
    if settings.export:
        extra["export"] = export.export(
            settings.export,
            models,
            settings.export_rule,
            [val_probs[n] for n in names] if val_probs else None,
            val_labels,
        )
    if settings.export_members:
        extra["export_members"] = export.export_members(settings.export_members, models)
    return table, extra


def load_arrays(settings):
    """((x_train, y_train), (x_test, y_test)) of `settings.data_dir`, or as a --parallel
    member's process, the arrays its main process decoded; refuses a split too small."""
    arrays = parallel.handed_data(settings)
    decoded = " (decoded by the --parallel process)" if arrays else ""
    if arrays is None:
        arrays = data.load_data(settings.data_dir, limit=settings.limit, seed=settings.seed)
    (x_train, y_train), (x_test, y_test) = arrays
    print(
        f"data: {data.describe_source(settings.data_dir)}{decoded}: x_train {x_train.shape}, "
        f"y_train {y_train.shape}, x_test {x_test.shape}, y_test {y_test.shape}"
    )
    if not settings.eval_only:
        checks.check_training_images(settings, len(x_train))
    return arrays


def best_checkpoint_exists(name, settings):
    """True once `name` has a checkpoint in `settings.weights_dir` to reload."""
    return checkpoints.best_checkpoint(settings.weights_dir, name) is not None


def note_unfinished(members, settings):
    """{name: why} for members not fully trained, each said: they are scored all the
    same, and results of a half-trained member look like any other."""
    in_progress = {n: why for n in members if (why := checkpoints.unfinished(n, settings))}
    for name, why in in_progress.items():
        print(
            f"note: {name} is not fully trained: {why}; "
            f"scoring its best checkpoint so far, {members[name][1].name}"
        )
    return in_progress


def main(argv=None):
    """`python ensemble.py [COMMAND] [flags]`; returns the exit code (ensembling.cli)."""
    return cli.main(argv, run)


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # where a closed pipe shows when the output was buffered
    except BrokenPipeError:
        # The output's reader left (`predict ... | head`): end quietly, as Unix tools
        # that SIGPIPE ends do, not with a traceback; stdout goes nowhere from here
        # on, so that Python's own flush at exit raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = exits.BROKEN_PIPE
    # Done, and saved: a Ctrl-C from here on (or --parallel stopping a process that
    # was just ending) would only print a traceback from JAX's and matplotlib's exit
    # handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
