"""What runs inside `fit` for each member: the article's checkpoint and logs, the
dead-member check and restart, and where a member trains (one device or all).

The files these write, and the rules for reusing them, are in `checkpoints.py`.
"""

import contextlib
import functools
import importlib.util
import os
import signal
import threading
from pathlib import Path

import keras
import numpy as np

from ensembling.checkpoints import PARTIAL_SUFFIX, Resume, UsageError, checkpoint_pattern

# Set by `interrupt`, the handler of Ctrl-C and the other stop signals.
INTERRUPTED = threading.Event()
# Set while a training loop runs (`stopping_at_batch_ends`): a first Ctrl-C then only
# sets INTERRUPTED, and `RaiseInterrupt` raises it at the next batch or epoch end.
# Raised wherever it landed, it was lost in Keras 3.15's bare `except:` around each
# batch's logs (`python_utils.pythonify_logs`, which on JAX waits for the device);
# it cut Keras' in-place backup save short (a weights file that lacks layers); it
# aborted the process from inside HDF5 (exit code -6); or Python printed it as a
# traceback it ignored, from JAX's garbage-collection callback. A second Ctrl-C
# raises at once.
AT_BATCH_ENDS = threading.Event()
# The stop signals received, in order: the first names the stop and its exit code.
RECEIVED = []
# Ctrl-C, a scheduler's stop (Slurm's preemption sends SIGTERM, then SIGKILL after a
# grace time), a closed terminal: each stops a run the same way, releasing its locks,
# which a requeued job on another machine could not tell from a live run's. Windows
# has no SIGHUP, and importing this module there must not fail for want of it.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
# A live softmax varies from image to image; a dead network's varies by rounding only.
DEAD_OUTPUT_STD = 1e-6
DEAD_PROBE_IMAGES = 256


def accuracy():
    """The article's "acc" metric as an object: its variables exist before `fit`
    (`build_before_fit` says why that matters)."""
    return keras.metrics.CategoricalAccuracy(name="acc")


def build_before_fit(trainer):
    """Creates `trainer`'s optimizer variables now, not inside `fit`'s first step.

    Keras on TensorFlow builds the optimizer (and metrics given by name) while it
    traces the training step, and TensorFlow then traces the whole step a second
    time, because the first trace created variables: about a second a member on a
    CPU, for nothing. Built here, the step is traced once. The state is the same.
    """
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def member_callbacks(model, settings, resume=None):
    """The article's checkpoint plus logs, for one member, whichever way it is trained.

    Checkpoints are written under a `.partial` name and renamed once complete, so
    a run killed mid-write never leaves a half file under a checkpoint's name.
    `resume` (from `prepare_member`) carries the best loss of the epochs already
    done, so the checkpoint rule continues where it stopped.
    """
    logs_dir = Path(settings.logs_dir)
    resume = resume or Resume(0, None)
    callbacks = [
        RaiseInterrupt(),
        # The article monitors the *training* loss, so the validation split only reports.
        CheckpointOf(
            model,
            checkpoint_pattern(model.name, settings).replace(".weights.h5", PARTIAL_SUFFIX),
            monitor="loss",
            save_weights_only=True,
            save_best_only=True,
            mode="auto",
            initial_value_threshold=resume.best_loss,
        ),
        PublishCheckpoints(Path(settings.weights_dir), model.name),
        keras.callbacks.CSVLogger(str(logs_dir / f"{model.name}.csv"), append=resume.epoch > 0),
    ]
    if tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs_dir / model.name)))
    return callbacks


def interrupt(signum, frame):
    """Handler of the stop signals: Python's KeyboardInterrupt, remembered in
    `INTERRUPTED` (and the signal in `RECEIVED`). In a training loop (`AT_BATCH_ENDS`)
    a signal waits for the batch's end, unless the same signal came before: a second
    Ctrl-C stops at once. A different one waits too, since under Slurm a --parallel
    member gets the job's SIGTERM and then its parent's SIGINT, one stop, not two.
    """
    again = signum in RECEIVED
    RECEIVED.append(signum)
    INTERRUPTED.set()
    if AT_BATCH_ENDS.is_set() and not again:
        if len(RECEIVED) > 1:
            return  # already stopping at the batch's end, and said so
        # os.write, not print: a handler that prints while the interrupted code
        # prints raises "reentrant call" in Python's buffered stream.
        if signum == signal.SIGINT:
            os.write(2, b"\nstopping at the end of this batch; Ctrl-C again stops at once\n")
        else:
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: stopping at the end of this batch\n".encode())
        return
    raise KeyboardInterrupt


def reset_stop():
    """Forgets the stop signals received: a new run in this process starts afresh."""
    INTERRUPTED.clear()
    RECEIVED.clear()


def stopped_by():
    """How the run was stopped, and its exit code: ("interrupted", 130) for Ctrl-C,
    ("stopped by SIGTERM", 143) for a scheduler's stop, as shells count them."""
    number = RECEIVED[0] if RECEIVED else signal.SIGINT  # a KeyboardInterrupt raised as such
    how = "interrupted" if number == signal.SIGINT else f"stopped by {signal.Signals(number).name}"
    return how, 128 + number


@contextlib.contextmanager
def stopping_on_signals(signals=STOP_SIGNALS, always=()):
    """Within: each of `signals` goes to `interrupt` (from the main thread only, where
    Python runs handlers), and the handlers before are put back after.

    A signal the process was started ignoring stays ignored, unless it is in `always`:
    `nohup` ignores SIGHUP so that a long run outlives its terminal, and a shell script
    starts its background jobs ignoring SIGINT.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in signals:
        if sig in always or signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is None:  # set outside Python: the default is the nearest
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


@contextlib.contextmanager
def stopping_at_batch_ends():
    """Within: a first Ctrl-C is raised at the next batch or epoch end (`RaiseInterrupt`
    must be among the loop's callbacks), not wherever it lands."""
    AT_BATCH_ENDS.set()
    try:
        yield
    finally:
        AT_BATCH_ENDS.clear()


class RaiseInterrupt(keras.callbacks.Callback):
    """Raises a Ctrl-C held back by `interrupt` (`INTERRUPTED`) at the next batch end."""

    def on_train_batch_end(self, batch, logs=None):
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch, logs=None):
        self.on_train_batch_end(None)


class CheckpointOf(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint of `model` itself, whichever model `fit` trains: a
    distillation fits a `Distiller`, whose weights include the teacher's."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.target = model

    def set_model(self, model):
        super().set_model(self.target)


class PublishCheckpoints(keras.callbacks.Callback):
    """Renames the checkpoint just written from its `.partial` name to its real one."""

    def __init__(self, weights_dir, name):
        super().__init__()
        self.weights_dir, self.name = weights_dir, name

    def on_epoch_end(self, epoch, logs=None):
        for partial in self.weights_dir.glob(f"{self.name}.*{PARTIAL_SUFFIX}"):
            final = partial.name.removesuffix(PARTIAL_SUFFIX) + ".weights.h5"
            partial.replace(self.weights_dir / final)  # atomic on one file system


def restart_if_dead(model, dead_check, attempt, settings):
    """True after preparing `model` for another attempt; False to keep it as it is."""
    if dead_check.dead_epoch is None:
        return False
    where = f"{model.name} died in epoch {dead_check.dead_epoch} (same output for every image)"
    if attempt > settings.restarts:
        print(f"{where}; no restarts left (--restarts {settings.restarts}), keeping it")
        return False
    print(f"{where}; restarting from fresh weights, attempt {attempt + 1}")
    for stale in Path(settings.weights_dir).glob(f"{model.name}.*.weights.h5"):
        stale.unlink()
    # NumPy's global generator, seeded by keras.utils.set_random_seed: a new draw at
    # every restart, the same sequence on every run.
    reinitialize(model, seed=int(np.random.randint(2**31 - 1)))
    return True


class StopWhenDead(keras.callbacks.Callback):
    """Stops training once the model answers every probe image identically.

    That only happens when a whole layer has gone silent (dead ReLUs): its gradient
    is then zero, so the model can never recover and further epochs are wasted.
    """

    def __init__(self, x_train):
        super().__init__()
        self.probe = x_train[:DEAD_PROBE_IMAGES]
        self.dead_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        if self.dead_epoch is not None:
            return
        outputs = self.model.predict(self.probe, verbose=0)
        if float(np.max(np.std(outputs, axis=0))) < DEAD_OUTPUT_STD:
            self.dead_epoch = epoch + 1
            self.model.stop_training = True


def reinitialize(model, seed):
    """Draws every layer's weights afresh, from its initializer's distribution.

    A Keras 3 initializer fixes its seed when it is created, so calling the same
    one again returns the *same* weights (and a dead start would die again, as it
    did on the CPU here): each draw gets a new initializer with a seed of its own.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for attribute in ("kernel", "bias"):
            variable = getattr(layer, attribute, None)
            initializer = getattr(layer, f"{attribute}_initializer", None)
            if variable is None or initializer is None:
                continue
            config = initializer.get_config()
            if "seed" in config:
                config["seed"] = int(rng.integers(2**31 - 1))
            fresh = type(initializer).from_config(config)
            variable.assign(fresh(variable.shape, dtype=variable.dtype))


def distribution_scope(settings, batch_size):
    """Where one member is built, compiled and fitted: one device, or all (`--distribute`).

    Data parallelism as each backend ships it: Keras' `DataParallel` on JAX (every
    step's batch split across the devices, gradients averaged: the same update as
    one device on the whole batch), `tf.distribute.MirroredStrategy` on TensorFlow.
    Several machines: on JAX set KERAS_DISTRIBUTION_JOB_ADDRESSES,
    KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID on each
    (`keras.distribution.initialize` reads them); on TensorFlow set TF_CONFIG, which
    selects `MultiWorkerMirroredStrategy`.
    """
    if not settings.distribute:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "jax":
        if "KERAS_DISTRIBUTION_NUM_PROCESSES" in os.environ:
            _join_processes()
        devices = keras.distribution.list_devices()
        if batch_size % len(devices):
            raise UsageError(
                f"--distribute splits each batch over {len(devices)} devices: --batch-size "
                f"{batch_size} must be a multiple of {len(devices)}"
            )
        print(f"--distribute: DataParallel over {len(devices)} devices ({', '.join(devices)})")
        return keras.distribution.DataParallel(devices=devices).scope()
    if backend == "tensorflow":
        import tensorflow as tf

        if "TF_CONFIG" in os.environ:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            strategy = tf.distribute.MirroredStrategy()
        print(
            f"--distribute: {type(strategy).__name__} over {strategy.num_replicas_in_sync} devices"
        )
        return strategy.scope()
    raise UsageError(f"--distribute needs the jax or tensorflow backend, not {backend}")


@functools.cache
def _join_processes():
    """Once per process: several members each open a scope, JAX joins the job once."""
    keras.distribution.initialize()


def tensorboard_available():
    # Keras' TensorBoard callback writes through tf.summary, whatever the backend,
    # and TensorFlow 2.21 no longer installs the tensorboard package it needs.
    return all(importlib.util.find_spec(name) for name in ("tensorflow", "tensorboard"))
