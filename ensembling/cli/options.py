"""The command line: one parser with the commands `train` (the default: `python
ensemble.py [flags]`), `combine`, `predict` and `distill`; the flags several share
are declared once (flags.py). Training's flags become `Settings`: the article's
defaults first, then `--preset`'s values, then the flags given; distill's own become
`Distillation`.
"""

import argparse
import difflib
import sys

import ensembling.cli.flags as flags
from ensembling.settings import Distillation, Settings, settings_from

# `python ensemble.py COMMAND ...`: those besides training (ensemble.main runs them),
# with how each is called.
COMMANDS = {
    "combine": "python ensemble.py combine A.keras B.keras ...",
    "predict": "python ensemble.py predict --model FILE.keras IMAGE ...",
    "distill": "python ensemble.py distill [--student NAME] [training flags]",
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line, as every other bad input gets.

    argparse prints the whole usage first (18 lines for ensemble.py in 80 columns),
    which pushes the line that says what is wrong below a screen of flags.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; python {self.prog} --help lists every flag\n")


def command_line():
    """The whole command line: `train`, `combine`, `predict` and `distill`, each with
    its flags. A first word that is no command means `train` (`python ensemble.py
    --epochs 5`): `main` puts it in before parsing.
    """
    top = Parser(prog="ensemble.py", description=DESCRIPTION)
    commands = top.add_subparsers(dest="command", parser_class=Parser)
    # Each command gets parents of its own: set_defaults on one (combine's batch of 256)
    # changes the default of the parent's very action, which another would share.
    sources, prediction, scoring, results, exporting, loading = (
        flags.add_data_flags,
        flags.add_prediction_flags,
        flags.add_scoring_flags,
        flags.add_results_flags,
        flags.add_export_flags,
        flags.add_loading_flags,
    )
    train = commands.add_parser(
        "train",
        prog="ensemble.py",
        parents=flags.parents(sources, prediction, scoring, results, exporting),
        description=DESCRIPTION,
        epilog=f"Commands: {COMMANDS['combine']} ensembles any saved classifiers; "
        f"{COMMANDS['predict']} classifies images; {COMMANDS['distill']} trains one "
        "network on the ensemble's predictions. Each has its own --help.",
        argument_default=argparse.SUPPRESS,  # absent flags leave the preset's value
    )
    defaults = Settings()
    flags.add_training_flags(train, defaults)
    flags.add_run_flags(train.add_argument, defaults)
    flags.add_restart_flags(train.add_argument, defaults)
    flags.add_output_flags(train.add_argument)
    flags.add_recipe_options(train)
    combine = commands.add_parser(
        "combine",
        prog="ensemble.py combine",
        parents=flags.parents(sources, prediction, scoring, results, exporting, loading),
        description="Score every combination of saved image classifiers (.keras or .h5 "
        "files) on CIFAR-10 or any class-folder tree, and optionally export one as a "
        "single model.",
    )
    flags.add_combine_flags(combine.add_argument)
    combine.set_defaults(
        **SAVED_MODEL_DEFAULTS,
        cost=False,
        combine=["average"],
        export=None,
        export_rule="average",
        logs_dir="logs",
    )
    predict = commands.add_parser(
        "predict",
        prog="ensemble.py predict",
        parents=flags.parents(prediction, loading),
        description="Classify images with an ensemble exported by --export (or combine "
        "--export), or any Keras classifier of images.",
    )
    flags.add_predict_flags(predict.add_argument)
    predict.set_defaults(
        **{k: SAVED_MODEL_DEFAULTS[k] for k in ("batch_size", "tta", "custom_objects", "safe_mode")}
    )
    distill = commands.add_parser(
        "distill",
        prog="ensemble.py distill",
        parents=flags.parents(sources, prediction, results, loading),
        description="Train one network (the student) on the averaged predictions of the "
        "run's members, or of any saved classifiers (the teacher): the ensemble's "
        "accuracy at one network's cost (docs/distill.md).",
        argument_default=argparse.SUPPRESS,
    )
    flags.add_training_flags(distill, defaults)
    flags.add_restart_flags(distill.add_argument, defaults)
    flags.add_recipe_options(distill)
    flags.add_distill_flags(distill.add_argument, Distillation())
    return top, {"train": train, "combine": combine, "predict": predict, "distill": distill}


DESCRIPTION = (
    "Train the article's three CIFAR-10 ConvNets and evaluate their averaged ensembles. "
    "Defaults reproduce the article; --preset fast trades the recipe for accuracy per "
    "minute (see ensembling/recipe.py)."
)
# combine's and predict's defaults for the flags they share with training, which
# take the article's from `Settings` (or a preset's); their batches only predict.
SAVED_MODEL_DEFAULTS = {
    "data_dir": None,
    "limit": None,
    "seed": 0,
    "validation_split": None,
    "batch_size": 256,
    "tta": False,
    "custom_objects": None,
    "safe_mode": True,
}


def parse_args(argv=None):
    """Settings from the command line: the article's defaults, then --preset, then flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = vars(parse(["train", *argv]))
    del flags["command"]
    return settings_from(flags)


def parse_distill(argv):
    """(Settings, Distillation) from distill's flags: training's as `parse_args` reads
    them, distill's own into `Distillation`."""
    given = vars(parse(["distill", *argv]))
    del given["command"]
    own = {f: given.pop(f) for f in Distillation.__dataclass_fields__ if f in given}
    for field in ("teacher", "custom_objects"):
        if own.get(field) is not None:
            own[field] = tuple(own[field])
    return settings_from(given), Distillation(**own)


def parse(argv):
    """The command's namespace for `argv`, whose first word names the command."""
    _, parsers = command_line()
    command = parsers[argv[0]]  # its own errors, in its own name
    if argv[0] != "train":
        return command.parse_args(argv[1:], argparse.Namespace(command=argv[0]))
    train = command
    if argv[1:] and not argv[1].startswith("-"):
        # argparse would say "unrecognized arguments", leaving a mistyped command a
        # mystery; training takes flags only, so a first word can only be a command.
        close = difflib.get_close_matches(argv[1].lower(), [*COMMANDS, "train"], n=1, cutoff=0.6)
        train.error(
            f"unknown command {argv[1]!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; the commands are train (the default), {' and '.join(COMMANDS)}"
        )
    args, extra = train.parse_known_args(argv[1:], argparse.Namespace(command="train"))
    if extra and extra[0] in COMMANDS:  # python ensemble.py --data-dir D combine a b
        train.error(
            f"{extra[0]} is a command and comes first, its flags after it: {COMMANDS[extra[0]]}"
        )
    if extra:  # argparse's own message, as parse_args gives it
        train.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
