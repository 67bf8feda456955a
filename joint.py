"""The article's recipe with every member trained in one compiled step (`--joint`).

Same hyperparameters as `ensemble.compile_and_train`: batch 32, Adam at 1e-3, the
same epochs, float32, the last `validation_split` of the training set held out, and
each member checkpointed whenever *its own* training loss improves. The members
form one multi-output model whose loss is the sum of theirs; they share no
weights, so each member's gradient is exactly the one it would get alone, and Adam
updates every weight from its own gradient only. The one difference from training
them one after another: all members see the same batch order.

On JAX a whole epoch runs as one compiled call (a `lax.scan` over its steps through
Keras' stateless API) on data kept on the device; on the other backends the joint
model goes through `fit`, which still fuses the members into one step.
"""

import math
import sys
import time

import keras
import numpy as np
from keras import ops

# JAX only: run an epoch's steps as one compiled loop. None chooses by device (see
# _train_scanned); tests set it to compare both ways on the CPU.
SCAN_EPOCHS = None


def joint_model(members, model_input):
    """One model with every member's softmax as a named output, nothing shared but the input."""
    return keras.Model(model_input, [member(model_input) for member in members], name="joint")


def train_jointly(members, num_epochs, x_train, y_train, settings, callbacks_for):
    """Trains `members` together; returns {name: per-epoch logs} like `History.history`.

    `callbacks_for(member)` gives the Keras callbacks one member would get from
    `fit` (checkpoint, CSV log, dead check); they receive that member's logs at every
    epoch end, with the member's weights current, exactly as under `fit`.
    """
    model_input = members[0].inputs[0]
    joint = joint_model(members, model_input)
    split_at = math.floor(len(x_train) * (1.0 - settings.validation_split))  # as Keras
    train = (x_train[:split_at], y_train[:split_at])
    validation = (x_train[split_at:], y_train[split_at:])
    dispatch = _MemberDispatch(members, callbacks_for)
    if keras.backend.backend() == "jax":
        _train_scanned(joint, members, num_epochs, train, validation, settings, dispatch)
    else:
        _train_with_fit(joint, members, num_epochs, train, validation, settings, dispatch)
    return dispatch.histories


class _MemberDispatch(keras.callbacks.Callback):
    """Splits the joint model's logs per member and feeds each member's own callbacks."""

    def __init__(self, members, callbacks_for):
        super().__init__()
        self.names = [member.name for member in members]
        self.lists = [
            keras.callbacks.CallbackList(callbacks_for(member), model=member) for member in members
        ]
        self.histories = {name: {} for name in self.names}

    def on_train_begin(self, logs=None):
        for callbacks in self.lists:
            callbacks.on_train_begin()

    def on_epoch_begin(self, epoch, logs=None):
        for callbacks in self.lists:
            callbacks.on_epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        for name, callbacks in zip(self.names, self.lists, strict=True):
            member_logs = {
                "acc": logs[f"{name}_acc"],
                "loss": logs[f"{name}_loss"],
                "val_acc": logs[f"val_{name}_acc"],
                "val_loss": logs[f"val_{name}_loss"],
            }
            member_logs = {key: float(value) for key, value in member_logs.items()}
            for key, value in member_logs.items():
                self.histories[name].setdefault(key, []).append(value)
            callbacks.on_epoch_end(epoch, member_logs)

    def on_train_end(self, logs=None):
        for callbacks in self.lists:
            callbacks.on_train_end()


def _compile(joint, members, settings):
    joint.compile(
        loss=[keras.losses.categorical_crossentropy] * len(members),
        optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate),
        metrics=[["acc"]] * len(members),
    )


def _train_with_fit(joint, members, num_epochs, train, validation, settings, dispatch):
    _compile(joint, members, settings)
    repeat = len(members)
    joint.fit(
        x=train[0],
        y=[train[1]] * repeat,
        batch_size=settings.batch_size,
        epochs=num_epochs,
        verbose=1 if sys.stdout.isatty() else 2,
        callbacks=[dispatch],
        validation_data=(validation[0], [validation[1]] * repeat),
    )


def _train_scanned(joint, members, num_epochs, train, validation, settings, dispatch):
    import jax
    import jax.numpy as jnp

    names = [member.name for member in members]
    optimizer = keras.optimizers.Adam(learning_rate=settings.learning_rate)
    optimizer.build(joint.trainable_variables)
    x_train, y_train = jnp.asarray(train[0]), jnp.asarray(train[1])  # resident on the device
    x_val, y_val = jnp.asarray(validation[0]), jnp.asarray(validation[1])

    # The data go in as arguments: closed over, a jitted function would embed them
    # in the compiled program as constants.
    def step(state, index, x_all, y_all):
        trainable, non_trainable, optimizer_vars, sums = state
        x, y = x_all[index], y_all[index]

        def total_loss(trainable):
            outputs, new_non_trainable = joint.stateless_call(
                trainable, non_trainable, x, training=True
            )
            outputs = outputs if len(members) > 1 else [outputs]
            losses = [ops.mean(keras.losses.categorical_crossentropy(y, o)) for o in outputs]
            return sum(losses), (losses, outputs, new_non_trainable)

        (_, (losses, outputs, non_trainable)), grads = jax.value_and_grad(total_loss, has_aux=True)(
            trainable
        )
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        correct = [_correct(y, o) for o in outputs]
        batch = y.shape[0]
        sums = sums + jnp.stack([loss * batch for loss in losses] + correct)
        return (trainable, non_trainable, optimizer_vars, sums), None

    scan = SCAN_EPOCHS if SCAN_EPOCHS is not None else jax.default_backend() != "cpu"
    if not scan:
        # XLA's CPU convolutions run many times slower inside a loop (measured: 23 s
        # against 0.5 s an epoch for ALL-CNN-C on 64 images), and dispatch is cheap
        # there anyway: one compiled call per step.
        one_step = jax.jit(step)

        def run_steps(state, batches, x_all, y_all):
            for batch in batches:
                state = one_step(state, batch, x_all, y_all)[0]
            return state

    else:
        # On an accelerator the time goes to launching steps, not to computing them:
        # a whole epoch of steps runs as one compiled loop.
        @jax.jit
        def run_steps(state, batches, x_all, y_all):
            return jax.lax.scan(lambda s, i: step(s, i, x_all, y_all), state, batches)[0]

    @jax.jit
    def evaluate(trainable, non_trainable, x, y):
        outputs, _ = joint.stateless_call(trainable, non_trainable, x, training=False)
        outputs = outputs if len(members) > 1 else [outputs]
        losses = [ops.sum(keras.losses.categorical_crossentropy(y, o)) for o in outputs]
        return jnp.stack(losses + [_correct(y, o) for o in outputs])

    trainable = [v.value for v in joint.trainable_variables]
    non_trainable = [v.value for v in joint.non_trainable_variables]
    optimizer_vars = [v.value for v in optimizer.variables]
    rng = np.random.default_rng(settings.seed)
    num_train, batch_size = len(train[0]), settings.batch_size
    full_steps = num_train // batch_size
    dispatch.on_train_begin()
    for epoch in range(num_epochs):
        dispatch.on_epoch_begin(epoch)
        epoch_start = time.perf_counter()
        order = rng.permutation(num_train).astype(np.int32)
        sums = jnp.zeros(2 * len(members), jnp.float32)
        state = (trainable, non_trainable, optimizer_vars, sums)
        if full_steps:
            batches = order[: full_steps * batch_size].reshape(full_steps, batch_size)
            state = run_steps(state, jnp.asarray(batches), x_train, y_train)
        if num_train % batch_size:  # Keras trains on the last, smaller batch too
            last = jnp.asarray(order[full_steps * batch_size :][None])
            state = run_steps(state, last, x_train, y_train)
        trainable, non_trainable, optimizer_vars, sums = state
        val_sums = sum(
            evaluate(trainable, non_trainable, x_val[i : i + 1000], y_val[i : i + 1000])
            for i in range(0, len(validation[0]), 1000)
        )
        sums, val_sums = np.asarray(sums), np.asarray(val_sums)
        count, val_count = num_train, max(len(validation[0]), 1)
        logs = {}
        for i, name in enumerate(names):
            logs[f"{name}_loss"] = sums[i] / count
            logs[f"{name}_acc"] = sums[len(names) + i] / count
            logs[f"val_{name}_loss"] = val_sums[i] / val_count
            logs[f"val_{name}_acc"] = val_sums[len(names) + i] / val_count
        # Members' callbacks save and probe the Keras variables: bring them up to date.
        for variable, value in zip(joint.trainable_variables, trainable, strict=True):
            variable.assign(value)
        for variable, value in zip(joint.non_trainable_variables, non_trainable, strict=True):
            variable.assign(value)
        seconds = time.perf_counter() - epoch_start
        print(
            f"epoch {epoch + 1}/{num_epochs} {seconds:.1f}s: " + _summary(names, logs), flush=True
        )
        dispatch.on_epoch_end(epoch, logs)
        # Keras' predict (the dead check) donates the variables' buffers to its own
        # compiled call and stores fresh ones: continue from those.
        trainable = [v.value for v in joint.trainable_variables]
        non_trainable = [v.value for v in joint.non_trainable_variables]
    dispatch.on_train_end()


def _correct(y, outputs):
    matches = ops.equal(ops.argmax(y, axis=-1), ops.argmax(outputs, axis=-1))
    return ops.sum(ops.cast(matches, "float32"))


def _summary(names, logs):
    return "  ".join(
        f"{name} loss {logs[f'{name}_loss']:.4f} acc {logs[f'{name}_acc']:.4f} "
        f"val_acc {logs[f'val_{name}_acc']:.4f}"
        for name in names
    )
