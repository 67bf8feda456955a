"""What a run is asked to do: `Settings`, every knob with the article's value as its
default, and the presets that change several at once.

`ensemble.py` prints the settings first and saves them beside the results;
`ensembling.cli` fills them from the command line and checks them.
"""

import dataclasses
import os
from dataclasses import dataclass

from ensembling.backend import resolve_precision
from models import MODELS


@dataclass(frozen=True)
class Settings:
    """Every knob of a run. Defaults are the article's; saved with the results."""

    epochs: int = 20  # per member
    batch_size: int = 32  # images per step, training and prediction
    validation_split: float = 0.2  # last fraction of the training set, never trained on
    learning_rate: float = 1e-3  # Adam's default, as the article uses Adam()
    models: tuple = tuple(MODELS)  # members to train and evaluate
    data_dir: str | None = None  # None downloads with Keras
    limit: int | None = None  # keep this many train and test images (quick runs)
    seed: int = 0  # data shuffle, subset and weight initialisation
    weights_dir: str = "weights"
    logs_dir: str = "logs"
    eval_only: bool = False  # skip training, ensemble existing checkpoints
    restarts: int = 2  # fresh starts allowed for a member whose ReLUs all died
    joint: bool = False  # train all members in one compiled step (joint.py)
    retrain: bool = False  # train members again even if a finished run is recorded
    combine: tuple = ("average",)  # rules scored besides the article's average
    cost: bool = True  # measure parameters, size, latency and throughput
    export: str | None = None  # write the ensemble of all members as one .keras file
    export_rule: str = "average"  # how the exported file combines its members
    export_members: str | None = None  # write each member as DIR/<name>.keras (for combine)
    # The recipe options of recipe.py; `--preset fast` sets them together.
    preset: str = "article"
    precision: str = "float32"  # or "mixed_bfloat16" (bfloat16 compute, float32 weights)
    augment: bool = False  # random translations and flips on the device while training
    label_smoothing: float = 0.0
    schedule: str = "constant"  # or "cosine": decay to zero along a cosine
    warmup_epochs: int = 0  # linear warm-up from zero to the learning rate, either schedule
    ema: bool = False  # checkpoint and evaluate the weights' moving average
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: the article's Adam)
    dropout: float | None = None  # after each downsampling stage (None: 0, 0, 0.5 in NIN)
    input_dropout: float = 0.0  # on each member's input images (the All-CNN paper: 0.2)
    tta: bool = False  # average each test prediction with its mirror image's
    distribute: bool = False  # one member's batches split over every device (training.py)
    parallel: bool = False  # each member trained in its own process, at once (parallel.py)
    train_only: bool = False  # stop after training: no evaluation, no results.json


@dataclass(frozen=True)
class Distillation:
    """What `python ensemble.py distill` adds to `Settings`; saved with its results.

    Temperature 4 and a weight of 0.1 on the true labels (0.9 on the teacher's) are
    the choices of Hinton et al. (2015) and Stanton et al. (2021) for CIFAR-10.
    """

    teacher: tuple = ()  # model files or folders; (): the members in settings.weights_dir
    teacher_rule: str = "average"  # how the teacher combines its models (combine's rules)
    student: str | None = None  # a builder of models.py or a model file; None: the best member
    student_weights: str = "fresh"  # a student file's own weights ("current") or new ones
    temperature: float = 4.0
    label_weight: float = 0.1  # of the true labels' cross-entropy; the rest is the teacher's
    export: str | None = None  # the student as one .keras file; None: <weights_dir>/student.keras
    custom_objects: tuple = ()  # Python files defining the custom layers of given files
    safe_mode: bool = True


# Keras' backends that train; its numpy and openvino ones only predict.
TRAINING_BACKENDS = ("tensorflow", "jax", "torch")

PRESETS = {
    "article": {},
    # Measured on one H100 (bench/RESULTS.md): 150 epochs take 223 s end to end.
    "fast": {
        "epochs": 150,
        "batch_size": 512,
        "learning_rate": 2e-3,  # peak; Adam's 1e-3 suits batch 32, 512 takes a larger step
        "validation_split": 0.1,
        "joint": True,
        "precision": "auto",
        "augment": True,
        "label_smoothing": 0.1,
        "schedule": "cosine",
        "warmup_epochs": 2,
        "tta": True,
        "combine": ("average", "weighted"),  # the weak NIN gets a smaller say
    },
}
PRECISIONS = ("float32", "mixed_bfloat16", "auto")
SCHEDULES = ("constant", "cosine")


def changes_recipe(settings):
    """True when `settings` train differently from the article (beyond epochs and sizes)."""
    return (
        settings.precision != "float32"
        or settings.augment
        or settings.label_smoothing > 0
        or settings.schedule != "constant"
        or settings.warmup_epochs > 0
        or settings.ema
        or settings.weight_decay > 0
    )


def user_path(text):
    """A path flag's value, with a leading ~ expanded: the shell expands it only at a
    word's start, so `--weights-dir=~/ensemble` reaches us as typed, and a folder
    named ~ made in the current one invites `rm -rf ~`."""
    return os.path.expanduser(text)


def settings_from(flags):
    """Settings from {field: value}: the article's defaults, the preset, then `flags`."""
    preset = flags.get("preset", "article")
    values = {**PRESETS[preset], **flags, "preset": preset}
    for field in ("models", "combine"):
        if field in values:
            values[field] = tuple(values[field])
    if "precision" in values:
        values["precision"] = resolve_precision(values["precision"])
    if "warmup_epochs" not in flags and "epochs" in values and "warmup_epochs" in values:
        # The preset's warm-up shrinks for short runs (--preset fast --epochs 2).
        values["warmup_epochs"] = min(values["warmup_epochs"], max(values["epochs"] - 1, 0))
    return Settings(**values)


# Boolean flags that argparse spells --flag / --no-flag; the others are store_true.
NEGATABLE = ("joint", "cost", "augment", "ema", "tta")


def settings_argv(settings):
    """Command-line arguments that `parse_args` turns back into `settings`.

    Only the values that differ from the preset's are spelled out, after `--preset`
    itself; `tests/test_parallel.py` checks the round trip.
    """
    base = settings_from({"preset": settings.preset})
    argv = ["--preset", settings.preset]
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        if field.name == "preset" or value == getattr(base, field.name):
            continue
        option = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            if value or field.name in NEGATABLE:
                argv.append(option if value else "--no-" + option[2:])
            # a store_true flag at False is the default of every preset
        elif isinstance(value, tuple):
            argv += [option, *map(str, value)]
        elif value is not None:
            argv += [option, repr(value) if isinstance(value, float) else str(value)]
    return argv
