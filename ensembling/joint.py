"""Every member trained in one compiled step (`--joint`, and `--preset fast`).

With the article's settings this is the article's recipe: batch 32, Adam at 1e-3,
the same epochs, float32, the last `validation_split` of the training set held
out, and each member checkpointed whenever *its own* training loss improves. The
members form one multi-output model whose loss is the sum of theirs; they share
no weights, so each member's gradient is exactly the one it would get alone, and
Adam updates every weight from its own gradient only. The one difference from
training them one after another: all members see the same batch order.

The recipe options of `recipe.py` (augmentation, label smoothing, a schedule, EMA
weights, bfloat16) live here too: augmentation layers sit between the shared
input and each member, so the members themselves stay the article's models.

On JAX a whole epoch runs as one compiled call (a `lax.scan` over its steps through
Keras' stateless API) on data kept on the device; on the other backends the joint
model goes through `fit`, which still fuses the members into one step.

A killed run resumes after its last completed epoch: at every epoch end, after the
members' checkpoints and logs, the whole state (weights, optimizer, shuffling
generator) goes to `weights/backup/joint/`, as one file written then renamed on
JAX, through Keras' `BackupAndRestore` elsewhere.
"""

import json
import math
import shutil
import sys
import time
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from ensembling import recipe, training
from ensembling.checkpoints import JOINT_MEMBERS, JOINT_STATE, joint_backup_dir, replacing

# JAX only: run an epoch's steps as one compiled loop. None chooses by device (see
# _train_scanned); tests set it to compare both ways on the CPU.
SCAN_EPOCHS = None
# JAX only: steps per loop iteration of the scanned epoch (lax.scan's `unroll`).
SCAN_UNROLL = 1
# Other backends: fit's own shuffling (tests turn it off to compare batch for batch).
FIT_SHUFFLE = True


class Trained(NamedTuple):
    histories: dict  # {name: per-epoch logs}, like History.history
    failed: dict  # {name: why it stopped}: its loss became NaN
    epoch_seconds: list  # per epoch: training steps (the first includes compiling)
    callback_seconds: list  # per epoch: validation, checkpoints, logs, dead checks


def joint_model(members, model_input, settings=None):
    """One model with every member's softmax as a named output, nothing shared but the input.

    With `settings.augment`, each member reads its own randomly translated and
    flipped copy of the input while training (`recipe.Augment`).
    """
    inputs = [model_input] * len(members)
    if settings is not None:
        inputs = recipe.training_inputs(members, model_input, settings)
    outputs = [member(x) for member, x in zip(members, inputs, strict=True)]
    return keras.Model(model_input, outputs, name="joint")


def train_jointly(members, num_epochs, x_train, y_train, settings, callbacks_for, initial_epoch=0):
    """Trains `members` together; returns a `Trained` record.

    With `initial_epoch`, continues the interrupted run whose state is in
    `weights/backup/joint/` (see `checkpoints.read_joint_backup`); the backup is
    removed once training ends.

    `callbacks_for(member)` gives the Keras callbacks one member would get from
    `fit` (checkpoint, CSV log, dead check); they receive that member's logs at every
    epoch end, with the member's weights current (its moving average with
    `settings.ema`), exactly as under `fit`. A member whose loss becomes NaN, or
    whose dead check stops it, gets no further callbacks; training ends early when
    no member is left. (A NaN member cannot spoil the others: nothing is shared.)
    """
    model_input = members[0].inputs[0]
    joint = joint_model(members, model_input, settings)
    split_at = math.floor(len(x_train) * (1.0 - settings.validation_split))  # as Keras
    train = (x_train[:split_at], y_train[:split_at])
    validation = (x_train[split_at:], y_train[split_at:])
    dispatch = _MemberDispatch(members, callbacks_for)
    train_with = _train_scanned if keras.backend.backend() == "jax" else _train_with_fit
    # Each member's callbacks start with RaiseInterrupt (training.member_callbacks).
    with training.stopping_at_batch_ends():
        train_with(joint, members, num_epochs, train, validation, settings, dispatch, initial_epoch)
    shutil.rmtree(joint_backup_dir(settings), ignore_errors=True)
    return Trained(
        dispatch.histories, dispatch.failed, dispatch.epoch_seconds, dispatch.callback_seconds
    )


class _MemberDispatch(keras.callbacks.Callback):
    """Splits the joint model's logs per member and feeds each member's own callbacks."""

    def __init__(self, members, callbacks_for):
        super().__init__()
        self.members = list(members)
        self.lists = [
            keras.callbacks.CallbackList(callbacks_for(member), model=member) for member in members
        ]
        self.histories = {member.name: {} for member in members}
        self.failed = {}
        self.stopped = set()
        self.epoch_seconds, self.callback_seconds = [], []

    @property
    def all_stopped(self):
        return len(self.stopped) == len(self.members)

    def on_train_begin(self, logs=None):
        for callbacks in self.lists:
            callbacks.on_train_begin()

    def on_epoch_begin(self, epoch, logs=None):
        for member, callbacks in zip(self.members, self.lists, strict=True):
            if member.name not in self.stopped:
                callbacks.on_epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        for member, callbacks in zip(self.members, self.lists, strict=True):
            name = member.name
            if name in self.stopped:
                continue
            # fit names a single output's logs plainly ("loss"), several by output.
            single = len(self.members) == 1 and f"{name}_loss" not in logs
            member_logs = {
                f"{prefix}{key}": float(
                    logs[f"{prefix}{key}" if single else f"{prefix}{name}_{key}"]
                )
                for prefix in ("", "val_")
                for key in ("acc", "loss")
            }
            for key, value in member_logs.items():
                self.histories[name].setdefault(key, []).append(value)
            member.stop_training = False
            callbacks.on_epoch_end(epoch, member_logs)
            if math.isnan(member_logs["loss"]):
                self.failed[name] = f"its loss became NaN in epoch {epoch + 1}"
                print(f"{name} stopped: {self.failed[name]}; the other members go on")
                self.stopped.add(name)
            elif member.stop_training:  # its dead check
                self.stopped.add(name)
        if self.model is not None and self.all_stopped:
            self.model.stop_training = True  # under fit: nothing left to train
        self.callback_seconds.append(time.perf_counter() - start)

    def on_train_end(self, logs=None):
        for callbacks in self.lists:
            callbacks.on_train_end()


def _steps_per_epoch(num_train, settings):
    return max(math.ceil(num_train / settings.batch_size), 1)


def _train_with_fit(
    joint, members, num_epochs, train, validation, settings, dispatch, initial_epoch
):
    del initial_epoch  # Keras' BackupAndRestore below finds the epoch itself
    steps = _steps_per_epoch(len(train[0]), settings)
    joint.compile(
        loss=[recipe.loss_function(settings) for _ in members],
        optimizer=recipe.optimizer(settings, steps),
        metrics=[[training.accuracy()] for _ in members],
    )
    training.build_before_fit(joint)
    repeat = len(members)
    folder = joint_backup_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOINT_MEMBERS).write_text(json.dumps({"members": [m.name for m in members]}))
    # After the dispatch, so that the backup never runs ahead of checkpoints and logs.
    backup = keras.callbacks.BackupAndRestore(str(folder), double_checkpoint=True)
    callbacks = [training.RaiseInterrupt(), dispatch, backup]  # a Ctrl-C at a batch's end
    if settings.ema:  # the members' callbacks see (and checkpoint) the moving average
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    timer = _EpochTimer(dispatch)
    history = joint.fit(
        x=train[0],
        y=[train[1]] * repeat,
        batch_size=settings.batch_size,
        epochs=num_epochs,
        shuffle=FIT_SHUFFLE,
        verbose=1 if sys.stdout.isatty() else 2,
        callbacks=[timer, *callbacks],
        validation_data=(validation[0], [validation[1]] * repeat),
    )
    return history


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self, dispatch):
        super().__init__()
        self.dispatch = dispatch

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.dispatch.epoch_seconds.append(time.perf_counter() - self.start)


def _train_scanned(
    joint, members, num_epochs, train, validation, settings, dispatch, initial_epoch
):
    import jax.numpy as jnp

    names = [member.name for member in members]
    num_train, batch_size = len(train[0]), settings.batch_size
    steps = _steps_per_epoch(num_train, settings)
    optimizer = recipe.optimizer(settings, steps)
    optimizer.build(joint.trainable_variables)
    x_train, y_train = jnp.asarray(train[0]), jnp.asarray(train[1])  # resident on the device
    x_val, y_val = jnp.asarray(validation[0]), jnp.asarray(validation[1])

    run_steps, evaluate = _compiled_steps(joint, len(members), optimizer, settings)

    trainable = [v.value for v in joint.trainable_variables]
    non_trainable = [v.value for v in joint.non_trainable_variables]
    optimizer_vars = [v.value for v in optimizer.variables]
    slot = {id(v): i for i, v in enumerate(optimizer.variables)}
    averages = [slot[id(v)] for v in getattr(optimizer, "_model_variables_moving_average", [])]
    rng = np.random.default_rng(settings.seed)
    if initial_epoch:
        saved = load_state(settings)
        arrays = [jnp.asarray(a) for a in saved["arrays"]]
        trainable, non_trainable = (
            arrays[: len(trainable)],
            arrays[len(trainable) : -len(optimizer_vars)],
        )
        optimizer_vars = arrays[-len(optimizer_vars) :]
        rng.bit_generator.state = saved["rng"]
    dispatch.on_train_begin()
    for epoch in range(initial_epoch, num_epochs):
        dispatch.on_epoch_begin(epoch)
        epoch_start = time.perf_counter()
        batches = _epoch_batches(rng, num_train, steps, batch_size)
        sums = jnp.zeros(2 * len(members), jnp.float32)
        state = (trainable, non_trainable, optimizer_vars, sums)
        trainable, non_trainable, optimizer_vars, sums = run_steps(state, batches, x_train, y_train)
        # With EMA the members are validated, checkpointed and probed as averages.
        shown = [optimizer_vars[i] for i in averages] if settings.ema else trainable
        val_sums = sum(
            evaluate(shown, non_trainable, x_val[i : i + 1000], y_val[i : i + 1000])
            for i in range(0, len(validation[0]), 1000)
        )
        sums, val_sums = np.asarray(sums), np.asarray(val_sums)
        dispatch.epoch_seconds.append(time.perf_counter() - epoch_start)
        logs = _epoch_logs(names, sums / num_train, val_sums / max(len(validation[0]), 1))
        # Members' callbacks save and probe the Keras variables. They get copies:
        # Keras' predict (the dead check) donates the variables' buffers to its
        # compiled call, which would delete the arrays this loop carries on with.
        for variable, value in zip(joint.trainable_variables, shown, strict=True):
            variable.assign(jnp.copy(value))
        for variable, value in zip(joint.non_trainable_variables, non_trainable, strict=True):
            variable.assign(jnp.copy(value))
        print(
            f"epoch {epoch + 1}/{num_epochs} {dispatch.epoch_seconds[-1]:.1f}s: "
            + _summary([n for n in names if n not in dispatch.stopped], logs),
            flush=True,
        )
        dispatch.on_epoch_end(epoch, logs)
        save_state(settings, epoch + 1, names, [*trainable, *non_trainable, *optimizer_vars], rng)
        if dispatch.all_stopped:
            break
    dispatch.on_train_end()


def _compiled_steps(joint, num_members, optimizer, settings):
    """(run_steps, evaluate): an epoch of training steps of every member at once, and
    the members' summed losses and correct counts on a batch, both compiled by JAX."""
    import jax
    import jax.numpy as jnp

    label_smoothing = settings.label_smoothing

    def member_losses(y, outputs, mask):
        outputs = outputs if num_members > 1 else [outputs]
        losses = [
            ops.sum(
                mask * keras.losses.categorical_crossentropy(y, o, label_smoothing=label_smoothing)
            )
            for o in outputs
        ]
        correct = [ops.sum(mask * _matches(y, o)) for o in outputs]
        return losses, correct

    # The data go in as arguments: closed over, a jitted function would embed them
    # in the compiled program as constants. Every batch has the same shape: the last,
    # smaller one is padded and masked (its loss is still the mean over its images,
    # as under fit), so that one compiled step serves the whole run.
    def step(state, batch, x_all, y_all):
        trainable, non_trainable, optimizer_vars, sums = state
        index, mask = batch
        x, y = x_all[index], y_all[index]
        count = ops.sum(mask)

        def total_loss(trainable):
            outputs, new_non_trainable = joint.stateless_call(
                trainable, non_trainable, x, training=True
            )
            losses, correct = member_losses(y, outputs, mask)
            return sum(losses) / count, (losses, correct, new_non_trainable)

        (_, (losses, correct, non_trainable)), grads = jax.value_and_grad(total_loss, has_aux=True)(
            trainable
        )
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        sums = sums + jnp.stack(losses + correct)
        return (trainable, non_trainable, optimizer_vars, sums), None

    scan = SCAN_EPOCHS if SCAN_EPOCHS is not None else jax.default_backend() != "cpu"
    if not scan:
        # XLA's CPU convolutions run many times slower inside a loop (measured: 23 s
        # against 0.5 s an epoch for ALL-CNN-C on 64 images), and dispatch is cheap
        # there anyway: one compiled call per step.
        one_step = jax.jit(step)

        def run_steps(state, batches, x_all, y_all):
            for i in range(batches[0].shape[0]):
                state = one_step(state, (batches[0][i], batches[1][i]), x_all, y_all)[0]
                if training.INTERRUPTED.is_set():  # a Ctrl-C, held back to a step's end
                    raise KeyboardInterrupt
            return state

    else:
        # On an accelerator the time goes to launching steps, not to computing them:
        # a whole epoch of steps runs as one compiled loop.
        @jax.jit
        def run_steps(state, batches, x_all, y_all):
            return jax.lax.scan(
                lambda s, b: step(s, b, x_all, y_all), state, batches, unroll=SCAN_UNROLL
            )[0]

    @jax.jit
    def evaluate(trainable, non_trainable, x, y):
        outputs, _ = joint.stateless_call(trainable, non_trainable, x, training=False)
        losses, correct = member_losses(y, outputs, jnp.ones(x.shape[0], jnp.float32))
        return jnp.stack(losses + correct)

    return run_steps, evaluate


def _epoch_batches(rng, num_train, steps, batch_size):
    """(indices, mask) of each step's images in a fresh shuffled order; the last batch
    is padded and masked, so that every step has one shape."""
    import jax.numpy as jnp

    order = epoch_order(rng, num_train).astype(np.int32)
    padded = np.zeros(steps * batch_size, np.int32)
    padded[:num_train] = order
    mask = (np.arange(steps * batch_size) < num_train).astype(np.float32)
    return (
        jnp.asarray(padded.reshape(steps, batch_size)),
        jnp.asarray(mask.reshape(steps, batch_size)),
    )


def _epoch_logs(names, means, val_means):
    """Keras-style logs of each member from the mean losses and accuracies (the first
    half of each array the losses, the second the accuracies)."""
    logs = {}
    for i, name in enumerate(names):
        logs[f"{name}_loss"] = means[i]
        logs[f"{name}_acc"] = means[len(names) + i]
        logs[f"val_{name}_loss"] = val_means[i]
        logs[f"val_{name}_acc"] = val_means[len(names) + i]
    return logs


def save_state(settings, done, names, arrays, rng):
    """JAX path: everything needed to continue after epoch `done`, in one renamed file."""
    folder = joint_backup_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": done, "members": names, "rng": rng.bit_generator.state}
    with replacing(folder / JOINT_STATE, folder / f".{JOINT_STATE}.partial") as partial:
        with open(partial, "wb") as file:
            np.savez(
                file,
                meta=np.array(json.dumps(meta)),
                **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)},
            )


def load_state(settings):
    with np.load(joint_backup_dir(settings) / JOINT_STATE) as saved:
        meta = json.loads(str(saved["meta"]))
        arrays = [saved[f"a{i}"] for i in range(len(saved.files) - 1)]
    return {**meta, "arrays": arrays}


def epoch_order(rng, num_train):
    """The order of the training images in one epoch: shuffled, as `fit` does."""
    return rng.permutation(num_train)


def _matches(y, outputs):
    return ops.cast(ops.equal(ops.argmax(y, axis=-1), ops.argmax(outputs, axis=-1)), "float32")


def _summary(names, logs):
    return "  ".join(
        f"{name} loss {logs[f'{name}_loss']:.4f} acc {logs[f'{name}_acc']:.4f} "
        f"val_acc {logs[f'val_{name}_acc']:.4f}"
        for name in names
    )
