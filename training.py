"""Training helpers: checkpoints, their records, resuming, and dead members.

`ensemble.compile_and_train` (the article's function) and `--joint` share these,
so that both write the same files under the same rules:

    weights/<name>.<epoch>-<loss>.weights.h5   best-so-far checkpoints (the article's)
    weights/<name>.best.json                   which of them has the lowest recorded loss
    weights/backup/<name>/                     Keras' BackupAndRestore state mid-training
    logs/<name>.csv                            one row per epoch
"""

import importlib.util
import json
import re
from pathlib import Path

import keras
import numpy as np


class UsageError(ValueError):
    """A flag or file the user chose cannot work; the message says what to do instead."""


# The article's checkpoint name, with Keras 3's mandatory `.weights.h5` suffix.
CHECKPOINT_PATTERN = "{name}.{{epoch:02d}}-{{loss:.2f}}.weights.h5"
CHECKPOINT_RE = re.compile(r"^(?P<name>\w+)\.(?P<epoch>\d+)-(?P<loss>[\d.]+|nan|inf)\.weights\.h5$")
BEST_SUFFIX = ".best.json"
# A live softmax varies from image to image; a dead network's varies by rounding only.
DEAD_OUTPUT_STD = 1e-6
DEAD_PROBE_IMAGES = 256


def member_callbacks(model, settings, tensorboard=True):
    """The article's checkpoint plus logs, for one member, whichever way it is trained.

    TensorBoard's callback reads the model's optimizer, which a member trained
    inside the joint model does not have: that path keeps the CSV logs only.
    """
    logs_dir = Path(settings.logs_dir)
    callbacks = [
        # The article monitors the *training* loss, so the validation split only reports.
        keras.callbacks.ModelCheckpoint(
            checkpoint_pattern(model.name, settings),
            monitor="loss",
            save_weights_only=True,
            save_best_only=True,
            mode="auto",
        ),
        keras.callbacks.CSVLogger(str(logs_dir / f"{model.name}.csv")),
    ]
    if tensorboard and tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs_dir / model.name)))
    return callbacks


def checkpoint_pattern(name, settings):
    return str(Path(settings.weights_dir) / CHECKPOINT_PATTERN.format(name=name))


def record_best(name, losses, attempts, settings):
    """Writes `<name>.best.json`: the file ModelCheckpoint wrote for the lowest loss."""
    if np.all(np.isnan(losses)):
        return
    best_epoch = int(np.nanargmin(losses))
    pattern = checkpoint_pattern(name, settings)
    record = {
        "file": Path(pattern.format(epoch=best_epoch + 1, loss=losses[best_epoch])).name,
        "epoch": best_epoch + 1,
        "loss": float(losses[best_epoch]),
        "attempts": attempts,
    }
    record_file = Path(settings.weights_dir) / f"{name}{BEST_SUFFIX}"
    record_file.write_text(json.dumps(record, indent=2) + "\n")


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


def best_checkpoint(weights_dir, name):
    """Path of `name`'s best weights in `weights_dir`, or None if it has none.

    The record written after training names the epoch with the lowest recorded
    loss. Without it (weights copied from elsewhere) the file names decide: the
    lowest loss, and among equal rounded losses the latest epoch, since a
    best-only checkpoint is written only when the loss improves.
    """
    weights_dir = Path(weights_dir)
    record_file = weights_dir / f"{name}{BEST_SUFFIX}"
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            path = weights_dir / record["file"]
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"{record_file} is unreadable ({error}); delete it to choose by file name"
            ) from error
        if path.is_file():
            return path
    candidates = []
    for path in weights_dir.glob(f"{name}.*.weights.h5"):
        match = CHECKPOINT_RE.match(path.name)
        if match and match["name"] == name:
            candidates.append((float(match["loss"]), -int(match["epoch"]), path))
    candidates = [c for c in candidates if np.isfinite(c[0])]
    return min(candidates)[2] if candidates else None


def tensorboard_available():
    # Keras' TensorBoard callback writes through tf.summary, whatever the backend,
    # and TensorFlow 2.21 no longer installs the tensorboard package it needs.
    return all(importlib.util.find_spec(name) for name in ("tensorflow", "tensorboard"))
