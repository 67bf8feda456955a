"""Distillation: one network (the student) trained on an ensemble's predictions (the
teacher), for the ensemble's accuracy at one network's cost (Hinton et al., 2015).

Keras' own `keras.distillation.Distiller` trains it, with `LogitsDistillation`:

    loss = w * CE(labels, student) + (1 - w) * T^2 * KL(softmax(t / T) || softmax(s / T))

The teacher's logits `t` are the log of its combined probabilities (the members'
average; averaging their logits would be another teacher), the student's `s` its
scores before its softmax. The teacher runs in inference mode and is never updated;
it sees the very images the student sees, augmented or not, in every batch (fixed
teacher outputs, computed once, overfit: Beyer et al., 2022).

`LogitsDistillation` is given `keras.losses.KLDivergence()` itself: by the name
"kl_divergence", its default, Keras 3.15 takes the KL divergence of the logits as
if they were probabilities, which is near zero whatever the models
(tests/test_distill.py checks the loss against the formula above).
"""

import shutil
import time
from pathlib import Path

import keras
import numpy as np
from keras import ops

from ensembling import export, recipe, training
from ensembling.checkpoints import (
    BACKUP_FOLDER,
    MemberLocks,
    backup_dir,
    best_checkpoint,
    is_finished,
    read_json,
    recipe_conflict,
    write_json,
)
from ensembling.errors import ExportError, TrainingFailed, UsageError
from ensembling.train import fit_member

TEMPERATURE = 4.0
LABEL_WEIGHT = 0.1
_FLOOR = 1e-12  # the smallest probability the teacher's logarithm takes: log 0 is -inf


class LogProbabilities(keras.layers.Layer):
    """log p: logits whose softmax is the probabilities p (the teacher's, here)."""

    def call(self, probs):
        return ops.log(ops.maximum(ops.cast(probs, "float32"), _FLOOR))


def teacher_model(teacher, rule="average", validation=None):
    """The teacher's logits as one model: `teacher` (a classifier ending in a softmax,
    or a list of them, combined under `rule` as `export.ensemble_model` combines them)
    and then the log of its probabilities. A fitted rule learns on `validation`,
    (images, one-hot labels) the student does not train on."""
    if isinstance(teacher, (list, tuple)):
        val_probs = val_labels = None
        if rule != "average":
            if validation is None:
                raise ExportError(f"the {rule} teacher is fitted: give validation images")
            images, labels = validation
            val_probs = [np.asarray(m.predict(images, verbose=0)) for m in teacher]
            val_labels = np.argmax(labels, axis=1)
        teacher = export.ensemble_model(list(teacher), rule, val_probs, val_labels)[0]
    inputs = keras.Input(teacher.input_shape[1:], name="images")
    logits = LogProbabilities(dtype="float32", name="teacher_logits")(teacher(inputs))
    return keras.Model(inputs, logits, name="teacher")


def student_logits(student, label="the student"):
    """(`student` ending in a softmax layer of its own, a model of its scores before
    that softmax), both sharing its layers, or an ExportError for a model that ends in
    no softmax. A last Dense(softmax) is split in two, Dense then Softmax: the same
    function, now with the scores to distil from."""
    last = student.layers[-1] if getattr(student, "inputs", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and activation == "softmax"
    ):
        scores = last.input
    elif activation == "softmax":  # the layer's own activation: linear from here on
        last.activation = keras.activations.linear
        scores = student.outputs[0]
        probs = keras.layers.Softmax(name=f"{student.name}_softmax", dtype="float32")(scores)
        student = keras.Model(_input(student), probs, name=student.name)
    else:
        raise ExportError(
            f"{label} does not end in a softmax (its last layer is "
            f"{type(last).__name__ if last else 'not known: a subclassed model'}); "
            "distillation trains a classifier's scores before its softmax"
        )
    # float32 whatever the policy: LogitsDistillation compares them with the teacher's.
    as_float = keras.layers.Activation("linear", dtype="float32", name=f"{student.name}_logits")
    return student, keras.Model(_input(student), as_float(scores), name=f"{student.name}_scores")


def _input(model):
    """The model's one input as a tensor: called with a batch, a model built on a list
    of one input warns that the structures differ."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


class Batches(keras.utils.PyDataset):
    """(images, labels) in a new order each epoch and, with `augment`, translated and
    flipped by `recipe.Augment` here, before the batch reaches the `Distiller`: the
    teacher then sees the very images the student sees."""

    def __init__(self, x, y, batch_size, augment=False, seed=0):
        super().__init__()
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.seed, self.epoch = seed, 0
        self.order = np.random.default_rng([seed, 0]).permutation(len(x))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = self.x[picked]
        if self.augment:  # seeded per batch: the same whichever thread asks first
            seed = int(np.random.default_rng([self.seed, self.epoch, index]).integers(2**31))
            augment = recipe.Augment(seed=seed, dtype="float32")  # float32 under any policy
            images = ops.convert_to_numpy(augment(images, training=True))
        return images, self.y[picked]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))


def distiller(
    teacher,
    scores,
    temperature=TEMPERATURE,
    label_weight=LABEL_WEIGHT,
    optimizer="adam",
    label_smoothing=0.0,
):
    """Keras' `Distiller` of `scores` (`student_logits`' second model) from `teacher`
    (`teacher_model`), compiled and built, as Keras' `BackupAndRestore` wants it."""
    trainer = keras.distillation.Distiller(
        teacher,
        scores,
        keras.distillation.LogitsDistillation(temperature, loss=keras.losses.KLDivergence()),
        student_loss_weight=label_weight,
    )
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        ),
        metrics=[training.accuracy()],
    )
    trainer(np.zeros((1, *scores.input_shape[1:]), dtype="float32"))
    return training.build_before_fit(trainer)


def distill(
    teacher,
    student,
    x,
    y,
    epochs=20,
    batch_size=32,
    temperature=TEMPERATURE,
    label_weight=LABEL_WEIGHT,
    rule="average",
    validation_data=None,
    augment=False,
    seed=0,
    optimizer="adam",
    callbacks=(),
    verbose="auto",
):
    """Trains `student` on `teacher`'s predictions for images `x` (in [0, 1]) with
    one-hot labels `y`, and returns it, ending in its softmax.

    `teacher`: a classifier ending in a softmax, or a list of them, combined under
    `rule` (`teacher_model`; fitted rules learn on `validation_data`). `student`: a
    classifier ending in a softmax, trained from the weights it has. Any Keras
    classifiers of the same images and classes will do.
    """
    student, scores = student_logits(student)
    trainer = distiller(
        teacher_model(teacher, rule, validation_data),
        scores,
        temperature,
        label_weight,
        optimizer=optimizer,
    )
    trainer.fit(
        Batches(x, y, batch_size, augment, seed),
        epochs=epochs,
        validation_data=validation_data,
        callbacks=list(callbacks),
        verbose=verbose,
    )
    return student


def train_student(student, scores, teacher, teacher_names, arrays, settings, how):
    """`distill` under the run's recipe (`settings`, `how`: a `Distillation`), with the
    members' checkpoints, logs, backup, restarts and locks, under the student's name.

    `student` and `scores` are `student_logits`' pair; `teacher_names` say what the
    teacher is (its files or checkpoints) in the student's record. `arrays`: ((images,
    labels) to train on, the validation split's). Returns the seconds it trained, or
    None where a finished run of the same teacher and recipe was there to reuse.
    """
    (x_train, y_train), validation = arrays
    batches = Batches(x_train, y_train, settings.batch_size, settings.augment, settings.seed)
    record, wanted = _record_path(student.name, settings), _wanted(how, teacher_names)
    with MemberLocks(settings.weights_dir, [student.name]):
        conflict = None if settings.retrain else _conflict(student.name, settings, wanted)
        if conflict:
            raise UsageError(conflict)
        if settings.retrain:
            shutil.rmtree(backup_dir(student.name, settings), ignore_errors=True)
        elif is_finished(student.name, settings) and read_json(record) == wanted:
            print(
                f"{student.name} is already distilled ({settings.weights_dir}); "
                "--retrain distils it again"
            )
            return None
        if not backup_dir(student.name, settings).exists():
            write_json(_pending_path(student.name, settings), wanted)

        def compiled():
            return distiller(
                teacher,
                scores,
                how.temperature,
                how.label_weight,
                optimizer=recipe.optimizer(settings, len(batches)),
                label_smoothing=settings.label_smoothing,
            )

        print(
            f"distilling {student.name} for {settings.epochs} epochs (temperature "
            f"{how.temperature:g}, label weight {how.label_weight:g})"
        )
        start = time.perf_counter()
        data = {"x": batches, "validation_data": validation}
        history = fit_member(student, compiled, data, settings.epochs, x_train, settings)
        if history.failed:
            raise TrainingFailed(
                f"{student.name} stopped: {history.failed}; lower --learning-rate, or check "
                "that the teacher's outputs are finite"
            )
        write_json(record, wanted)
        _pending_path(student.name, settings).unlink(missing_ok=True)
        return round(time.perf_counter() - start, 1)


def reload_best(student, settings):
    """`student` with its best distilled weights, and their file."""
    path = best_checkpoint(settings.weights_dir, student.name)
    if path is None:
        raise UsageError(f"{student.name} has no checkpoint in {settings.weights_dir}/")
    student.load_weights(str(path))
    return path


def _wanted(how, teacher_names):
    """What decides a distilled student besides `checkpoints.RECIPE_FLAGS`."""
    return {
        "teacher": list(teacher_names),
        "teacher_rule": how.teacher_rule,
        "temperature": how.temperature,
        "label_weight": how.label_weight,
        "student_weights": how.student_weights,
    }


def _conflict(name, settings, wanted):
    """Why this run may not resume or reuse `name`'s files, or None (as
    `checkpoints.recipe_conflict`, for the distillation's own choices too: `wanted`)."""
    why = recipe_conflict(name, settings)
    if why:
        return why
    resuming = backup_dir(name, settings).exists()
    stored = read_json(_pending_path(name, settings) if resuming else _record_path(name, settings))
    differ = [key for key in wanted if stored is not None and stored.get(key) != wanted[key]]
    if not differ:
        return None
    what = "an interrupted distillation" if resuming else "the distilled student"
    fix = "the same flags resume it" if resuming else "--retrain distils it again"
    said = ", ".join(f"{key} {stored.get(key)}" for key in differ)
    return (
        f"{what} {name} in {settings.weights_dir} has {said}, not what this run asks; "
        f"{fix}, or give this run its own --weights-dir and --logs-dir"
    )


def _record_path(name, settings):
    return Path(settings.weights_dir) / f"{name}.distill.json"


def _pending_path(name, settings):
    return Path(settings.weights_dir) / BACKUP_FOLDER / f"{name}.distill.json"
