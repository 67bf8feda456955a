"""Training the members and reloading them: one after the other as the article does
(`compile_and_train`), all in one compiled step (`--joint`, joint.py) or each in a
process of its own (`--parallel`, parallel.py). Checkpoints, resume state and locks
are checkpoints.py's; callbacks and signals are training.py's.
"""

import shutil
import sys
import time

import keras
import numpy as np

from ensembling import backend, joint, parallel, training
from ensembling.checkpoints import (
    BEST_SUFFIX,
    MemberLocks,
    backup_dir,
    best_checkpoint,
    is_finished,
    joint_backup_dir,
    logged_losses,
    prepare_member,
    read_joint_backup,
    record_best,
    recorded_attempts,
    settle_joint_backup,
)
from ensembling.errors import UsageError
from ensembling.settings import Settings, changes_recipe
from ensembling.training import (
    StopWhenDead,
    distribution_scope,
    member_callbacks,
    restart_if_dead,
    tensorboard_available,
)
from models import MODELS, PAPER_NAMES


def train_members(settings, arrays, model_input):
    """Trains the members of `settings.models` that have no finished run (all of them
    with `--retrain`), here or in processes. Returns {"train_seconds", "attempts",
    "failed", "epoch_seconds"}: per group, per member, why a member failed."""
    (x_train, y_train), _ = arrays
    if not tensorboard_available():
        print(f"TensorBoard needs tensorflow and tensorboard: CSV logs in {settings.logs_dir}/")
    to_train = []
    for name in settings.models:
        if is_finished(name, settings) and not settings.retrain:
            print(
                f"{name} is already trained ({settings.weights_dir}/{name}{BEST_SUFFIX}); "
                "--retrain trains it again"
            )
        else:
            to_train.append(name)
    if settings.parallel and len(to_train) > 1:
        train_seconds = train_in_processes(to_train, settings, arrays)
        failed = {  # the process said why: a loss that became NaN in the first epoch
            name: "its loss became NaN"
            for name in to_train
            if best_checkpoint(settings.weights_dir, name) is None
        }
        attempts = {name: recorded_attempts(name, settings) for name in to_train}
        return {
            "train_seconds": train_seconds,
            "attempts": attempts,
            "failed": failed,
            "epoch_seconds": {},
        }
    train_seconds, attempts, failed, epoch_seconds = train_here(
        to_train, model_input, x_train, y_train, settings
    )
    return {
        "train_seconds": train_seconds,
        "attempts": attempts,
        "failed": failed,
        "epoch_seconds": epoch_seconds,
    }


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

    def compiled():
        model.compile(
            loss=keras.losses.categorical_crossentropy,
            optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate),
            metrics=[training.accuracy()],
        )
        return training.build_before_fit(model)

    data = {
        "x": x_train,
        "y": y_train,
        "batch_size": settings.batch_size,
        "validation_split": settings.validation_split,
    }
    history = fit_member(model, compiled, data, num_epochs, x_train, settings)
    if history.failed:
        print(f"{model.name} stopped: {history.failed}; the other members go on")
    return history


def fit_member(model, compiled, data, num_epochs, probe, settings):
    """Fits what `compiled()` returns (`model` itself, or a `Distiller` training it) on
    `data` (`fit`'s arguments) with `model`'s checkpoints, logs and backup, restarting
    it where it dies on the `probe` images; `compile_and_train` says the rest."""
    for attempt in range(1, settings.restarts + 2):
        resume = prepare_member(model.name, settings)
        if resume.epoch:
            print(f"resuming {model.name} after epoch {resume.epoch} of an interrupted run")
        dead_check = StopWhenDead(probe)
        trainer = compiled()
        # After the checkpoint and the log, so that a backup never runs ahead of them.
        backup = keras.callbacks.BackupAndRestore(
            str(backup_dir(model.name, settings)), double_checkpoint=True
        )
        callbacks = [
            *member_callbacks(model, settings, resume=resume),  # RaiseInterrupt first
            backup,
            dead_check,
            keras.callbacks.TerminateOnNaN(),
        ]
        if settings.ema:  # the checkpoints and logs see the moving average
            callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
        with training.stopping_at_batch_ends():
            history = trainer.fit(
                **data,
                epochs=num_epochs,
                verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in log files
                callbacks=callbacks,
            )
        if not restart_if_dead(model, dead_check, attempt, settings):
            break
    history.attempts = attempt
    losses = logged_losses(model.name, settings)
    history.failed = None
    if any(np.isnan(losses)) or any(np.isnan(history.history.get("loss", []))):
        history.failed = f"its loss became NaN in epoch {len(history.history['loss'])}"
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


def train_here(names, model_input, x_train, y_train, settings):
    """Trains `names` in this process, one after the other or jointly.

    Returns ({group: seconds}, {name: attempts}, {name: why it failed}, {group: seconds
    of each epoch}, the last for joint training only).
    """
    train_seconds, attempts, failed, epoch_seconds = {}, {}, {}, {}
    with MemberLocks(settings.weights_dir, names):
        settle_joint_backup(settings, names)  # each member's own: prepare_member
        # A plain run cannot continue --joint's state, and --retrain continues none.
        plain = not settings.joint and not changes_recipe(settings)
        in_joint_backup = set((read_joint_backup(settings) or (0, []))[1]) & set(names)
        if settings.retrain or (plain and in_joint_backup):
            shutil.rmtree(joint_backup_dir(settings), ignore_errors=True)
        if settings.retrain:
            for name in names:
                shutil.rmtree(backup_dir(name, settings), ignore_errors=True)
        # The recipe options train inside joint.py's step: without --joint, each
        # member goes through it on its own.
        groups = [names] if settings.joint else []
        if not settings.joint and changes_recipe(settings):
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
    gpus = sum(d.split(":")[0].lower() in ("gpu", "cuda") for d in backend.devices())
    with parallel.handing_over(arrays, settings) as handover:
        return parallel.train(names, settings, gpus, handover)


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
