"""The training command line: `python ensemble.py [flags]` into `Settings`.

The article's defaults come first, then `--preset`'s values, then the flags given.
"""

import argparse
import difflib
import sys

from ensembling import combination, export
from ensembling.settings import (
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    Settings,
    settings_from,
    user_path,
)
from models import MODELS

# `python ensemble.py COMMAND ...`: the two besides training (ensemble.main runs them),
# with how each is called.
COMMANDS = {
    "combine": "python ensemble.py combine A.keras B.keras ...",
    "predict": "python ensemble.py predict --model FILE.keras IMAGE ...",
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line, as every other bad input gets.

    argparse prints the whole usage first (18 lines for ensemble.py in 80 columns),
    which pushes the line that says what is wrong below a screen of flags.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; python {self.prog} --help lists every flag\n")


def parse_args(argv=None):
    """Settings from the command line: the article's defaults, then --preset, then flags."""
    parser = training_parser()
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


def training_parser():
    """`python ensemble.py`'s parser; absent flags leave the preset's values."""
    defaults = Settings()
    parser = Parser(
        prog="ensemble.py",
        description="Train the article's three CIFAR-10 ConvNets and evaluate their "
        "averaged ensembles. Defaults reproduce the article; --preset fast trades the "
        "recipe for accuracy per minute (see ensembling/recipe.py).",
        epilog=f"Commands: {COMMANDS['combine']} ensembles any saved classifiers; "
        f"{COMMANDS['predict']} classifies images. Each has its own --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # absent flags leave the preset's value
    )
    _add_training_flags(parser, defaults)
    _add_run_flags(parser.add_argument, defaults)
    _add_output_flags(parser.add_argument)
    _add_recipe_options(parser)
    return parser


def _add_training_flags(parser, defaults):
    """The recipe the article fixes (epochs, batch, rate, members), its data and folders."""
    add = parser.add_argument
    add(
        "--preset",
        choices=list(PRESETS),
        help="article (default) or fast: sets the recipe flags below, which still override it",
    )
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


def _add_run_flags(add, defaults):
    """What a run does: train, evaluate or both, and how members are trained."""
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
        "machines, see docs/gpu.md): DataParallel on JAX, MirroredStrategy on TensorFlow",
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


def _add_output_flags(add):
    """What a run scores and writes besides the article's table."""
    add(
        "--combine",
        nargs="+",
        choices=combination.RULES,
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


def _add_recipe_options(parser):
    """The options `--preset fast` sets together (ensembling/recipe.py)."""
    recipe = parser.add_argument_group(
        "recipe options (see ensembling/recipe.py; --preset fast sets most of them)"
    )
    recipe.add_argument(
        "--precision",
        choices=PRECISIONS,
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
        choices=SCHEDULES,
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
