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

import dataclasses
import errno
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

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
    print(f"ensemble.py: error: Keras cannot load {named}: {error}; set KERAS_BACKEND to "
          "tensorflow, jax or torch, one that is installed (README, 'GPU set-up')",
          file=sys.stderr)  # fmt: skip
    sys.exit(2)
import numpy as np

import data
import evaluation
import export
import fast
import joint
import parallel
import report
import training
from checkpoints import (
    BEST_SUFFIX,
    MemberLocks,
    UsageError,
    backup_dir,
    best_checkpoint,
    is_finished,
    joint_backup_dir,
    logged_losses,
    prepare_member,
    read_joint_backup,
    record_best,
    recorded_attempts,
    recorded_recipe,
    settle_joint_backup,
    unfinished,
)
from config import COMMANDS, Settings, check_settings, parse_args
from models import MODELS, PAPER_NAMES
from training import (
    StopWhenDead,
    distribution_scope,
    member_callbacks,
    restart_if_dead,
    tensorboard_available,
)

# The article's table: (row, members), then its published test errors (the
# author's notebook, canonical CIFAR-10, Keras 2; NIN was trained 100 epochs there).
ARTICLE_ROWS = (
    ("ConvPool-CNN-C", ("conv_pool_cnn",)),
    ("ALL-CNN-C", ("all_cnn",)),
    ("NIN", ("nin_cnn",)),
    ("ensemble of three", ("conv_pool_cnn", "all_cnn", "nin_cnn")),
    ("pair A", ("conv_pool_cnn", "all_cnn")),
    ("pair B", ("conv_pool_cnn", "nin_cnn")),
    ("pair C", ("all_cnn", "nin_cnn")),
)
ARTICLE_ERRORS = {
    "ConvPool-CNN-C": 0.2414,
    "ALL-CNN-C": 0.2609,
    "NIN": 0.3164,
    "ensemble of three": 0.2049,
    "pair A": 0.2120,
    "pair B": 0.2282,
    "pair C": 0.2447,
}
# Disk full, quota, read-only file system, permission: the user can fix these.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


# --------------------------------------------------------------------------- the article


def build_member(name, model_input, settings=Settings()):
    """`MODELS[name]` on `model_input`, with `--dropout`'s and `--input-dropout`'s rates
    where they were given (a builder of one's own need not take them otherwise)."""
    rates = {} if settings.dropout is None else {"dropout": settings.dropout}
    if settings.input_dropout:
        rates["input_dropout"] = settings.input_dropout
    return MODELS[name](model_input, **rates)


def compile_and_train(model, num_epochs, x_train, y_train, settings=Settings()):
    """Compiles `model` as the article does and fits it, checkpointing the best epochs.

    A deep ReLU stack without normalisation sometimes dies early (every unit of a
    layer outputs zero, so the model gives one answer for every image and its loss
    sits at ln 10 for good; seen here on ConvPool-CNN-C). Such a run is stopped at the
    end of the epoch where it is seen and started again from fresh initial weights,
    at most `settings.restarts` times, each time with the full `num_epochs`.

    A run killed at any point continues, when started again, after its last
    completed epoch (Keras' `BackupAndRestore`, under `<weights_dir>/backup/`).

    Returns the Keras `History` of the last attempt, with `history.attempts` set; the
    best checkpoint is recorded in `<weights_dir>/<name>.best.json` so that reloading
    never guesses from file names.
    """
    for attempt in range(1, settings.restarts + 2):
        resume = prepare_member(model.name, settings)
        if resume.epoch:
            print(f"resuming {model.name} after epoch {resume.epoch} of an interrupted run")
        dead_check = StopWhenDead(x_train)
        model.compile(
            loss=keras.losses.categorical_crossentropy,
            optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate),
            metrics=["acc"],
        )
        # After the checkpoint and the log, so that a backup never runs ahead of them.
        backup = keras.callbacks.BackupAndRestore(
            str(backup_dir(model.name, settings)), double_checkpoint=True
        )
        with training.stopping_at_batch_ends():
            history = model.fit(
                x=x_train,
                y=y_train,
                batch_size=settings.batch_size,
                epochs=num_epochs,
                verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in log files
                callbacks=[
                    *member_callbacks(model, settings, resume=resume),  # RaiseInterrupt first
                    backup,
                    dead_check,
                    keras.callbacks.TerminateOnNaN(),
                ],
                validation_split=settings.validation_split,
            )
        if not restart_if_dead(model, dead_check, attempt, settings):
            break
    history.attempts = attempt
    losses = logged_losses(model.name, settings)
    history.failed = None
    if any(np.isnan(losses)) or any(np.isnan(history.history.get("loss", []))):
        history.failed = f"its loss became NaN in epoch {len(history.history['loss'])}"
        print(f"{model.name} stopped: {history.failed}; the other members go on")
        shutil.rmtree(backup_dir(model.name, settings), ignore_errors=True)
    record_best(model.name, losses, attempt, settings)
    return history


def train_jointly(names, model_input, x_train, y_train, settings):
    """Every member in one compiled step (joint.py); returns (attempts, failed, seconds).

    Members that die are drawn afresh and trained again, together, while restarts
    remain (`--restarts`); the others keep their finished run. `failed` names the
    members whose loss became NaN; `seconds` splits the time of each epoch.
    """
    members = [build_member(name, model_input, settings) for name in names]
    attempts, failed = {}, {}
    seconds = {"epochs": [], "callbacks": []}
    pending, dead_checks, resumes = members, {}, {}
    backup = read_joint_backup(settings)
    if backup and backup[1] == list(names) and backup[0] > 0:
        print(f"resuming {', '.join(names)} after epoch {backup[0]} of an interrupted run")
        resumes = {name: prepare_member(name, settings, done=backup[0]) for name in names}
    else:  # a backup of other members, or none: these start afresh
        shutil.rmtree(joint_backup_dir(settings), ignore_errors=True)

    def callbacks_for(member):
        dead_checks[member.name] = StopWhenDead(x_train)
        # Keras' TensorBoard callback logs the model's optimizer's learning rate, and
        # fails on a model that has no `optimizer` at all, as a member trained inside
        # the joint model: None logs the member's metrics without it.
        member.optimizer = None
        callbacks = member_callbacks(member, settings, resume=resumes.get(member.name))
        return [*callbacks, dead_checks[member.name]]

    for attempt in range(1, settings.restarts + 2):
        for member in pending:
            attempts[member.name] = attempt
            if member.name not in resumes:
                shutil.rmtree(backup_dir(member.name, settings), ignore_errors=True)
                prepare_member(member.name, settings)
        initial_epoch = backup[0] if resumes else 0
        trained = joint.train_jointly(
            pending, settings.epochs, x_train, y_train, settings, callbacks_for, initial_epoch
        )
        resumes = {}  # a restart starts from fresh weights
        failed.update(trained.failed)
        seconds["epochs"] += [round(s, 2) for s in trained.epoch_seconds]
        seconds["callbacks"] += [round(s, 2) for s in trained.callback_seconds]
        pending = [
            member
            for member in pending
            if member.name not in trained.failed
            and restart_if_dead(member, dead_checks[member.name], attempt, settings)
        ]
        if not pending:
            break
    for name in names:
        record_best(name, logged_losses(name, settings), attempts[name], settings)
    return attempts, failed, seconds


def evaluate_error(model, x_test, y_test, batch_size=32):
    """Fraction of test images whose most probable class is wrong."""
    pred = model.predict(x_test, batch_size=batch_size, verbose=0)
    pred = np.argmax(pred, axis=1)
    pred = np.expand_dims(pred, axis=1)  # same shape as y_test: (N, 1)
    return float(np.sum(np.not_equal(pred, y_test)) / y_test.shape[0])


def ensemble(models, model_input):
    """One model on the shared input whose output is the mean of the members' softmax."""
    outputs = [model.outputs[0] for model in models]
    y = keras.layers.Average(dtype="float32")(outputs)  # float32 under mixed precision too
    return keras.Model(model_input, y, name="ensemble")


def load_members(names, model_input, weights_dir):
    """Fresh members on `model_input` with their best weights, as the article reloads them."""
    members = {}
    for name in names:
        path = best_checkpoint(weights_dir, name)
        if path is None:
            raise UsageError(
                f"no checkpoint for {name} in {weights_dir}/; train it first "
                f"(python ensemble.py --models {name}) or pass --weights-dir"
            )
        model = MODELS[name](model_input)  # dropout, absent from weights, is inert here
        try:
            model.load_weights(str(path))
        except Exception as error:  # h5py, shape and format errors all mean the same
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            raise UsageError(
                f"{path} does not hold {name} weights ({type(error).__name__}: {first_line}); "
                f"delete it or retrain with --models {name} --retrain"
            ) from error
        members[name] = (model, path)
    return members


# --------------------------------------------------------------------------- the run


def run(settings):
    """Trains (unless eval_only), reloads the best weights, ensembles, reports. Returns rows.

    Models are built under `settings.precision` (Keras' global dtype policy, restored
    afterwards).
    """
    with fast.DtypePolicy(fast.resolve_precision(settings.precision)):
        return _run(settings)


def _run(settings):
    keras.utils.set_random_seed(settings.seed)
    arrays = parallel.handed_data(settings)  # in a --parallel member's process
    decoded = " (decoded by the --parallel process)" if arrays else ""
    if arrays is None:
        arrays = data.load_data(settings.data_dir, limit=settings.limit, seed=settings.seed)
    (x_train, y_train), (x_test, y_test) = arrays
    print(
        f"data: {data.describe_source(settings.data_dir)}{decoded}: x_train {x_train.shape}, "
        f"y_train {y_train.shape}, x_test {x_test.shape}, y_test {y_test.shape}"
    )
    train_images = int(len(x_train) * (1 - settings.validation_split))
    if train_images == 0 and not settings.eval_only:  # "lower --batch-size" would not do
        raise UsageError(
            f"--validation-split {settings.validation_split:g} of {len(x_train)} images leaves "
            "none to train on; raise --limit or lower --validation-split"
        )
    if settings.batch_size > train_images and not settings.eval_only:
        raise UsageError(
            f"--batch-size {settings.batch_size} exceeds the {train_images} training "
            "images left after the validation split; lower it or raise --limit"
        )
    model_input = keras.Input(shape=x_train.shape[1:])
    train_seconds, attempts, failed, epoch_seconds = {}, {}, {}, {}
    if not settings.eval_only:
        if not tensorboard_available():
            print(f"TensorBoard needs tensorflow and tensorboard: CSV logs in {settings.logs_dir}/")
        to_train = []
        for name in settings.models:
            if is_finished(name, settings) and not settings.retrain:
                print(f"{name} is already trained ({settings.weights_dir}/{name}{BEST_SUFFIX}); "
                      "--retrain trains it again")  # fmt: skip
            else:
                to_train.append(name)
        if settings.parallel and len(to_train) > 1:
            train_seconds = train_in_processes(to_train, settings, arrays)
            attempts = {name: recorded_attempts(name, settings) for name in to_train}
            failed = {  # the process said why: a loss that became NaN in the first epoch
                name: "its loss became NaN"
                for name in to_train
                if best_checkpoint(settings.weights_dir, name) is None
            }
        else:
            train_seconds, attempts, failed, epoch_seconds = train_here(
                to_train, model_input, x_train, y_train, settings
            )
    if settings.train_only:
        return None, {"train_seconds": train_seconds, "attempts": attempts, "failed": failed}
    names = [
        n for n in settings.models if n not in failed or best_checkpoint(settings.weights_dir, n)
    ]
    for name in set(settings.models) - set(names):
        print(f"{name} is left out of the ensembles: {failed[name]} before any checkpoint")
    if not names:
        raise UsageError("every member failed to train; see the messages above")

    # As the article: new instances on one shared input, best weights reloaded.
    model_input = keras.Input(shape=x_train.shape[1:])
    members = load_members(names, model_input, settings.weights_dir)
    # Scored all the same, but said: results of a member half-trained look like any other.
    in_progress = {name: why for name in names if (why := unfinished(name, settings))}
    for name, why in in_progress.items():
        print(f"note: {name} is not fully trained: {why}; "
              f"scoring its best checkpoint so far, {members[name][1].name}")  # fmt: skip
    # Each member predicts once; every row is scored from these probabilities. The
    # fitted rules learn on the validation split Keras held out, never on the test set.
    test_probs = predict_members(members, x_test, settings)
    split_at = math.floor(len(x_train) * (1 - settings.validation_split))  # as Keras
    x_val, val_labels = x_train[split_at:], np.argmax(y_train[split_at:], axis=1)
    fitted_rules = set(settings.combine) | ({settings.export_rule} if settings.export else set())
    val_probs = {}
    if fitted_rules & set(evaluation.FITTED_RULES):
        val_probs = predict_members(members, x_val, settings)
    rows = table_rows(names, settings.combine, test_probs, val_probs, val_labels, y_test[:, 0])
    extra = {
        "per_class_errors": per_class_errors(names, test_probs, y_test[:, 0], data.CLASS_NAMES),
        "train_seconds": train_seconds,
        "attempts": attempts,
        "failed": failed,
        "checkpoints": {name: str(path) for name, (_, path) in members.items()},
        # What the checkpoints were trained with, which --eval-only's settings need not say.
        "trained_with": {name: recorded_recipe(name, settings) for name in members},
        "not_fully_trained": in_progress,
    }
    if epoch_seconds:  # joint training: where each epoch's time went
        extra["epoch_seconds"] = epoch_seconds
    if settings.cost:
        extra["costs"] = measure_costs(members, model_input, x_test)
    if settings.export:
        extra["export"] = export.export(
            settings.export,
            [members[n][0] for n in names],
            settings.export_rule,
            [val_probs[n] for n in names] if val_probs else None,
            val_labels,
        )
    if settings.export_members:
        extra["export_members"] = export.export_members(
            settings.export_members, [members[n][0] for n in names]
        )
    return rows, extra


def train_here(names, model_input, x_train, y_train, settings):
    """Trains `names` in this process, one after the other or jointly.

    Returns ({group: seconds}, {name: attempts}, {name: why it failed}, {group: seconds
    of each epoch}, the last for joint training only).
    """
    train_seconds, attempts, failed, epoch_seconds = {}, {}, {}, {}
    with MemberLocks(settings.weights_dir, names):
        settle_joint_backup(settings, names)  # each member's own: prepare_member
        # A plain run cannot continue --joint's state, and --retrain continues none.
        plain = not settings.joint and not fast.changes_recipe(settings)
        in_joint_backup = set((read_joint_backup(settings) or (0, []))[1]) & set(names)
        if settings.retrain or (plain and in_joint_backup):
            shutil.rmtree(joint_backup_dir(settings), ignore_errors=True)
        if settings.retrain:
            for name in names:
                shutil.rmtree(backup_dir(name, settings), ignore_errors=True)
        # The recipe options train inside joint.py's step: without --joint, each
        # member goes through it on its own.
        groups = [names] if settings.joint else []
        if not settings.joint and fast.changes_recipe(settings):
            groups = [[name] for name in names]
        for group in groups:
            how = "jointly " if len(group) > 1 else ""
            print(f"training {', '.join(group)} {how}for {settings.epochs} epochs")
            start = time.perf_counter()
            trained = train_jointly(group, model_input, x_train, y_train, settings)
            train_seconds["+".join(group)] = round(time.perf_counter() - start, 1)
            attempts.update(trained[0])
            failed.update(trained[1])
            epoch_seconds["+".join(group)] = trained[2]
        for name in () if groups else names:
            print(f"training {name} ({PAPER_NAMES[name]}) for {settings.epochs} epochs")
            start = time.perf_counter()
            with distribution_scope(settings, settings.batch_size):
                model = build_member(name, model_input, settings)
                history = compile_and_train(model, settings.epochs, x_train, y_train, settings)
            train_seconds[name] = round(time.perf_counter() - start, 1)
            attempts[name] = history.attempts
            if history.failed:
                failed[name] = history.failed
    return train_seconds, attempts, failed, epoch_seconds


def train_in_processes(names, settings, arrays):
    """`--parallel`: each member trained by a process of its own (parallel.py).

    The processes read `arrays` (the data, decoded here) from a temporary file.
    Returns {name: seconds}. On a machine with several GPUs each process gets one.
    """
    gpus = sum(d.split(":")[0].lower() in ("gpu", "cuda") for d in fast.devices())
    with parallel.handing_over(arrays, settings) as handover:
        return parallel.train(names, settings, gpus, handover)


def predict_members(members, images, settings):
    """{name: softmax outputs} for the loaded `members` ({name: (model, path)}).

    With `settings.tta` each output is the mean over the image and its mirror image.
    """
    return {
        n: fast.predict(m, images, settings.batch_size, settings.tta)
        for n, (m, _) in members.items()
    }


def measure_costs(members, model_input, x_test):
    """The article's warning in numbers: each member, then each average ensemble (an
    exported file costs what the ensemble of its members does, give or take its
    combining layers)."""
    costs = {}
    for name, (model, path) in members.items():
        costs[name] = {**report.measure_cost(model, x_test), "weight_bytes": path.stat().st_size}
    for size in range(2, len(members) + 1):
        for names in itertools.combinations(members, size):
            combined = ensemble([members[n][0] for n in names], model_input)
            checkpoints = sum(costs[n]["weight_bytes"] for n in names)
            costs["+".join(names)] = report.ensemble_cost(
                combined, x_test, checkpoints, names, costs
            )
    return costs


def table_rows(names, rules, test_probs, val_probs, val_labels, labels, every_subset=None):
    """Every non-empty subset of members under every rule; the article's 7 rows first.

    Beyond `evaluation.EVERY_SUBSET_UP_TO` members, unless `every_subset`: each
    member, all but each one, and all of them (`evaluation.subsets`).
    """
    twice = evaluation.repeated(names)
    if twice:  # their probabilities, keyed by name, would already be one member's
        raise ValueError(
            f"two members are both named {twice!r}; give each its own name "
            f"(model.name = '{twice}_2')"
        )
    article = [members for _, members in ARTICLE_ROWS if set(members) <= set(names)]
    # Subsets in any member order (--models nin_cnn all_cnn) are still the article's rows.
    ordered = article + [
        s
        for s in evaluation.subsets(names, every_subset)
        if set(s) not in [set(a) for a in article]
    ]
    rows = []
    for rule in ("average", *(r for r in rules if r != "average")):
        for members in ordered:
            if len(members) == 1 and rule not in evaluation.ONE_MODEL_RULES:
                continue  # a single model is itself under this rule
            combined, fitted = evaluation.combine(rule, members, test_probs, val_probs, val_labels)
            base = row_name(members, names)
            row = {
                "row": base if rule == "average" else f"{base} ({rule})",
                "members": list(members),
                "rule": rule,
                **evaluation.row_metrics(combined, [test_probs[m] for m in members], labels),
                "article_error": ARTICLE_ERRORS.get(base) if rule == "average" else None,
            }
            if rule in evaluation.WEIGHTING_RULES:
                row["weights"] = fitted["weights"]
            if rule == "temperature":
                row["temperature"] = round(fitted["temperature"], 4)
            rows.append(row)
    return rows


def per_class_errors(names, test_probs, labels, classes):
    """{"classes": names, row: [test error of each class]} for each member and, of
    several, their average (the article's ensemble): where averaging helps."""
    errors = {"classes": list(classes)}
    for name in names:
        errors[row_name((name,), names)] = evaluation.per_class_error(
            test_probs[name], labels, len(classes)
        )
    if len(names) > 1:
        mean = evaluation.average([test_probs[n] for n in names])
        errors[row_name(tuple(names), names)] = evaluation.per_class_error(
            mean, labels, len(classes)
        )
    return errors


def row_name(members, names):
    """The table's name for the average of `members` (of all `names`): the article's,
    in any member order, or `subset_name`'s."""
    article = (row for row, chosen in ARTICLE_ROWS if set(chosen) == set(members))
    return next(article, None) or subset_name(members, names)


# Beyond this many members, the rows of all of them and of all but one are named so:
# eight seeds' names joined by "+" run past a hundred characters, and the row of all
# but one is read for the one it leaves out.
JOINED_NAMES_UP_TO = 4


def subset_name(members, names):
    """A row's name: its members joined by "+", or of many, "all 8" and "all but a"."""
    if len(names) > JOINED_NAMES_UP_TO and len(members) == len(names):
        return f"all {len(names)}"
    if len(names) > JOINED_NAMES_UP_TO and len(members) == len(names) - 1:
        return f"all but {next(name for name in names if name not in members)}"
    return "+".join(members)


def format_table(rows):
    """One aligned table: row, members, our test error, the article's."""
    header = ("model or ensemble", "members", "test error", "article")
    lines = [
        (r["row"], "+".join(r["members"]), f"{r['test_error']:.4f}", f"{r['article_error']:.4f}")
        for r in rows
        if r.get("article_error") is not None
    ]
    return report.aligned(header, lines, right_from=2)


# --------------------------------------------------------------------------- CLI

INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT (128 + 2)
BROKEN_PIPE = 141  # and for a program SIGPIPE ended (128 + 13): its reader left


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        import combine  # imports this module: loaded only when asked for
        import predict

        command = {"predict": predict.main, "combine": combine.main}[argv[0]]
        try:
            return command(argv[1:])
        except KeyboardInterrupt:
            print(f"\nensemble.py {argv[0]}: interrupted", file=sys.stderr)
            return INTERRUPTED
    if any(arg.startswith("--pa") and "--parallel".startswith(arg) for arg in argv):
        # Before parsing: resolving --precision auto already opens the GPU.
        parallel.share_the_gpu()
    settings = parse_args(argv)
    training.reset_stop()
    try:
        # --parallel stops its member processes with SIGINT, which they may have been
        # started ignoring (a parent run in the background of a script).
        member = (signal.SIGINT,) if parallel.member_process() else ()
        with training.stopping_on_signals(always=member):
            return _train_and_report(settings)
    except KeyboardInterrupt:
        # Ctrl-C or a scheduler's SIGTERM is how runs are stopped on purpose: say how to
        # go on, not where Python was.
        how, code = training.stopped_by()
        print(
            f"\nensemble.py: {how}; run the same command again: trained members are "
            "kept and training resumes after its last completed epoch",
            file=sys.stderr,
        )
        return code


def _storage_error(error, then):
    """One line for a full disk or an unwritable folder (exit code 2); re-raises others."""
    if error.errno not in STORAGE_ERRNOS:
        raise error
    where = f" writing {error.filename}" if error.filename else ""
    print(f"ensemble.py: error: {error.strerror or error}{where}; free space or fix "
          f"permissions, {then}", file=sys.stderr)  # fmt: skip
    return 2


def _train_and_report(settings):
    try:
        check_settings(settings)
        print("settings:", json.dumps(dataclasses.asdict(settings)))
        # Said before hours of training, not after: a GPU that CUDA failed to find
        # otherwise shows only as a run a hundred times slower.
        print(f"keras {keras.__version__} on {keras.backend.backend()}, devices: "
              + ", ".join(fast.devices()))  # fmt: skip
        if not settings.eval_only and not fast.has_accelerator():
            print("no GPU found: training runs on the CPU, hours for the full recipe "
                  "(see the README's GPU set-up)")  # fmt: skip
        start = time.perf_counter()
        rows, extra = run(settings)
        extra["total_seconds"] = round(time.perf_counter() - start, 1)
        if settings.train_only:
            then = "; --eval-only with the same --weights-dir ensembles them"
            if parallel.member_process():  # --parallel's main process ensembles them
                then = ""
            print(f"trained {', '.join(settings.models)} in {extra['total_seconds']} s{then}")
            return 0
        path = report.save_results(settings, rows, extra)
    except (UsageError, data.DataError, export.ExportError) as error:
        print(f"ensemble.py: error: {error}", file=sys.stderr)
        return 2
    except parallel.TrainingFailed as error:
        print(f"ensemble.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        return _storage_error(error, "then run the same command again: it resumes")
    logs_dir = Path(settings.logs_dir)
    print()
    print(format_table(rows))
    print("\nevery combination (NLL, ECE and Brier need probabilities: none for votes)")
    print(report.full_table(rows))
    for note in report.table_notes(rows):
        print(note)
    if "costs" in extra:
        print("\ncost on " + ", ".join(fast.devices()))
        print(report.cost_table(extra["costs"]))
    print(f"\nresults saved to {path} and {path.with_suffix('.md')}")
    if importlib.util.find_spec("matplotlib") is None:  # installed without requirements.txt
        print("plots skipped: matplotlib is not installed (pip install matplotlib, then "
              "python ensemble.py --eval-only with the same --weights-dir draws them)")  # fmt: skip
    else:
        try:
            plots = report.plot_training_curves(logs_dir, settings.models)
            plots.append(report.plot_test_errors(rows, logs_dir / "test_errors.png"))
        except OSError as error:  # the results are saved; only the plots are missing
            return _storage_error(error, "then python ensemble.py --eval-only with the same "
                                  "--weights-dir draws the plots again")  # fmt: skip
        print("plots: " + ", ".join(str(p) for p in plots))
    tta = "; without flip TTA, which the table used" if settings.tta else ""
    if "export" in extra:
        exported = extra["export"]
        print(f"ensemble exported to {exported['path']} ({export.described(exported)}{tta})")
    if "export_members" in extra:
        print(f"members exported to {', '.join(extra['export_members'].values())}"
              + (f" ({tta[2:]})" if tta else ""))  # fmt: skip
    print(f"{extra['total_seconds']} s in all")
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # where a closed pipe shows when the output was buffered
    except BrokenPipeError:
        # The output's reader left (`predict ... | head`): end quietly, as Unix tools
        # that SIGPIPE ends do, not with a traceback; stdout goes nowhere from here
        # on, so that Python's own flush at exit raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = BROKEN_PIPE
    # Done, and saved: a Ctrl-C from here on (or --parallel stopping a process that
    # was just ending) would only print a traceback from JAX's and matplotlib's exit
    # handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
