"""What a run is asked to do: `Settings`, the command line that fills it, and its checks.

`Settings` holds every knob with the article's values as defaults; `ensemble.py`
prints it first and saves it beside the results. `parse_args` reads the command line
over the preset's values (`--preset fast`, see fast.py), and `check_settings` refuses
anything that cannot work, with one line naming the flag, before data is read or a
file is written.
"""

import argparse
import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import keras

import checkpoints
import evaluation
import export
import fast
from checkpoints import UsageError
from models import MODELS, PAPER_NAMES


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
    # The recipe options of fast.py; `--preset fast` sets them together.
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


# Keras' backends that train; its numpy and openvino ones only predict.
TRAINING_BACKENDS = ("tensorflow", "jax", "torch")
# `python ensemble.py COMMAND ...`: the two besides training (ensemble.main runs them),
# with how each is called.
COMMANDS = {
    "combine": "python ensemble.py combine A.keras B.keras ...",
    "predict": "python ensemble.py predict --model FILE.keras IMAGE ...",
}


def user_path(text):
    """A path flag's value, with a leading ~ expanded: the shell expands it only at a
    word's start, so `--weights-dir=~/ensemble` reaches us as typed, and a folder
    named ~ made in the current one invites `rm -rf ~`."""
    return os.path.expanduser(text)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line, as every other bad input gets.

    argparse prints the whole usage first (18 lines for ensemble.py in 80 columns),
    which pushes the line that says what is wrong below a screen of flags.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; python {self.prog} --help lists every flag\n")


def parse_args(argv=None):
    """Settings from the command line: the article's defaults, then --preset, then flags."""
    defaults = Settings()
    parser = Parser(
        prog="ensemble.py",
        description="Train the article's three CIFAR-10 ConvNets and evaluate their "
        "averaged ensembles. Defaults reproduce the article; --preset fast trades the "
        "recipe for accuracy per minute (see fast.py).",
        epilog=f"Commands: {COMMANDS['combine']} ensembles any saved classifiers; "
        f"{COMMANDS['predict']} classifies images. Each has its own --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # absent flags leave the preset's value
    )
    add = parser.add_argument
    add("--preset", choices=list(fast.PRESETS), help="article (default) or fast: sets the "
        "recipe flags below, which still override it")  # fmt: skip
    add("--epochs", type=int, help=f"epochs per member (article: {defaults.epochs})")
    add("--batch-size", type=int, help=f"batch size (article: {defaults.batch_size})")
    add(
        "--validation-split",
        type=float,
        help="fraction of the training set held out for validation, the last part "
        f"(article: {defaults.validation_split})",
    )
    add(
        "--learning-rate",
        type=float,
        help=f"Adam learning rate, the peak of a schedule (article: {defaults.learning_rate})",
    )
    add(
        "--models",
        nargs="+",
        metavar="NAME",
        help=f"members to train and evaluate, from: {', '.join(MODELS)} (default: all)",
    )
    add(
        "--data-dir",
        type=user_path,
        help="offline CIFAR-10: cifar-10-batches-py folder, cifar-10-python.tar.gz, a "
        "train/<class>/ test/<class>/ image tree (folder, .tar, .tar.gz or .zip), or an "
        ".npz of keras.datasets' x_train, y_train, x_test, y_test; default: download "
        "with Keras",
    )
    add("--limit", type=int, help="keep N train and N test images (default: all)")
    add("--seed", type=int, help=f"random seed (default: {defaults.seed})")
    add(
        "--weights-dir", type=user_path, help=f"checkpoint folder (default: {defaults.weights_dir})"
    )
    add(
        "--logs-dir", type=user_path, help=f"logs and results folder (default: {defaults.logs_dir})"
    )
    add(
        "--eval-only",
        action="store_true",
        help="skip training: ensemble the best checkpoints already in --weights-dir",
    )
    add(
        "--restarts",
        type=int,
        help="fresh starts for a member whose network dies (same output for every image); "
        f"0 trains each member exactly once, as the article (default: {defaults.restarts})",
    )
    add(
        "--joint",
        action=argparse.BooleanOptionalAction,  # --no-joint: the preset one member at a time
        help="train every member in one compiled step: same hyperparameters and "
        "checkpoints, members share the batch order (see joint.py)",
    )
    add(
        "--distribute",
        action="store_true",
        help="split each member's batches over every GPU of this machine (or of several "
        "machines, see README): DataParallel on JAX, MirroredStrategy on TensorFlow",
    )
    add(
        "--parallel",
        action="store_true",
        help="train the members at the same time, each in a process of its own (its own "
        "fit, as the article), sharing this machine's GPU or taking one GPU each",
    )
    add(
        "--train-only",
        action="store_true",
        help="stop after training: no evaluation (--eval-only does it later)",
    )
    add(
        "--retrain",
        action="store_true",
        help="train members afresh, replacing finished or interrupted runs (by default a "
        "new run skips finished members, resumes an interrupted one, and refuses to do "
        "either under other training flags)",
    )
    add(
        "--combine",
        nargs="+",
        choices=evaluation.RULES,
        help="combination rules to score; the article's average always comes first",
    )
    add(
        "--cost",
        action=argparse.BooleanOptionalAction,
        help="measure parameters, weight size, batch-1 latency and batch-256 throughput "
        "(default: on)",
    )
    add(
        "--export",
        type=user_path,
        metavar="PATH.keras",
        help="write the ensemble of all --models as one Keras model file",
    )
    add(
        "--export-rule",
        choices=export.EXPORT_RULES,
        help="combining layer of the exported file (default: average)",
    )
    add(
        "--export-members",
        type=user_path,
        metavar="DIR",
        help="also write each member as DIR/<name>.keras, a model of its own "
        "(python ensemble.py combine takes them, from several runs)",
    )
    recipe = parser.add_argument_group(
        "recipe options (see fast.py; --preset fast sets most of them)"
    )
    recipe.add_argument(
        "--precision",
        choices=fast.PRECISIONS,
        help="mixed_bfloat16 computes in bfloat16 with float32 weights; auto picks it on "
        "a GPU or TPU, float32 elsewhere (article: float32)",
    )
    recipe.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random translations (up to 4 pixels) and horizontal flips while training",
    )
    recipe.add_argument("--label-smoothing", type=float, help="e.g. 0.1 (article: 0)")
    recipe.add_argument(
        "--schedule",
        choices=fast.SCHEDULES,
        help="constant learning rate (article), or cosine decay to zero after any warm-up",
    )
    recipe.add_argument(
        "--warmup-epochs", type=int, help="linear warm-up to the learning rate, then the schedule"
    )
    recipe.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        help="checkpoint and evaluate the exponential moving average of the weights",
    )
    recipe.add_argument(
        "--weight-decay", type=float, help="AdamW's decoupled weight decay, e.g. 0.05 (article: 0)"
    )
    recipe.add_argument(
        "--dropout",
        type=float,
        metavar="RATE",
        help="dropout rate after both downsampling stages of every member, e.g. 0.5 as "
        "the All-CNN paper (article: none in ConvPool-CNN-C and ALL-CNN-C, 0.5 in NIN)",
    )
    recipe.add_argument(
        "--input-dropout",
        type=float,
        metavar="RATE",
        help="dropout rate on every member's input images, e.g. 0.2 as the All-CNN paper "
        "(article: 0)",
    )
    recipe.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average each test prediction with the prediction for its mirror image",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):
        # argparse would say "unrecognized arguments", leaving a mistyped command a
        # mystery; training takes flags only, so a first word can only be a command.
        close = difflib.get_close_matches(argv[0].lower(), COMMANDS, n=1, cutoff=0.6)
        parser.error(
            f"unknown command {argv[0]!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; the commands are {' and '.join(COMMANDS)}, and training takes flags only"
        )
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] in COMMANDS:  # python ensemble.py --data-dir D combine a b
        parser.error(
            f"{extra[0]} is a command and comes first, its flags after it: {COMMANDS[extra[0]]}"
        )
    if extra:  # argparse's own message, as parse_args gives it
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return settings_from(vars(args))


def settings_from(flags):
    """Settings from {field: value}: the article's defaults, the preset, then `flags`."""
    preset = flags.get("preset", "article")
    values = {**fast.PRESETS[preset], **flags, "preset": preset}
    for field in ("models", "combine"):
        if field in values:
            values[field] = tuple(values[field])
    if "precision" in values:
        values["precision"] = fast.resolve_precision(values["precision"])
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


def check_settings(settings):
    """Refuses settings that cannot work, before any data is read or file written."""
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
    if settings.distribute and (settings.joint or fast.changes_recipe(settings)):
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
    exports = [("--export", settings.export, "ensemble"),
               ("--export-members", settings.export_members, "members")]  # fmt: skip
    for flag, given, what in exports:
        if settings.train_only and given is not None:
            raise UsageError(
                f"{flag} writes the evaluated {what} and --train-only evaluates none; "
                f"drop one, or export later with --eval-only {flag}"
            )
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
    if settings.precision not in fast.PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(fast.PRECISIONS)}")
    if settings.export is None and settings.export_rule != "average":
        raise UsageError(
            f"--export-rule {settings.export_rule} chooses how an exported file combines its "
            "members; add --export PATH.keras"
        )
    if settings.eval_only and settings.retrain:
        raise UsageError("--retrain trains the members again and --eval-only trains none; pick one")
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
    if not settings.eval_only and not settings.retrain:
        for name in settings.models:
            conflict = checkpoints.recipe_conflict(name, settings)
            if conflict:
                raise UsageError(conflict)
    if settings.export is not None:  # after the folders above exist: it may be in one
        try:
            export.check_export_path(settings.export)
        except export.ExportError as error:
            raise UsageError(str(error)) from error
    if settings.export is not None and settings.export_members is not None:
        # Either file would replace the other, and the last one written would win.
        member_files = {Path(settings.export_members, f"{name}.keras").resolve(): name
                        for name in settings.models}  # fmt: skip
        name = member_files.get(Path(settings.export).resolve())
        if name is not None:
            raise UsageError(
                f"--export {settings.export} is where --export-members writes {name}; "
                "give the ensemble a file of its own"
            )
