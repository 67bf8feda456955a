"""The flags of every command, each declared once: `options.command_line` gives each
command the groups it takes, as argparse parent parsers or on its own parser."""

import argparse

from ensembling import combination, export, readers
from ensembling.settings import PRECISIONS, PRESETS, SCHEDULES, user_path
from models import MODELS


def parents(*adders):
    """Parsers of the flags that several commands share, each declared once."""
    parents = []
    for add_flags in adders:
        parents.append(argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS))
        add_flags(parents[-1].add_argument)
    return parents


def add_data_flags(add):
    """Where the images come from: training's and combine's."""
    add(
        "--data-dir",
        type=user_path,
        help="offline CIFAR-10: cifar-10-batches-py folder, cifar-10-python.tar.gz, a "
        "train/<class>/ test/<class>/ image tree (folder, .tar, .tar.gz or .zip), or an "
        ".npz of keras.datasets' x_train, y_train, x_test, y_test; combine also takes "
        "such a tree or .npz of other images (resized to the models' input); default: "
        "download CIFAR-10 with Keras",
    )
    add(
        "--limit",
        type=int,
        help="keep N training and N test images, chosen by --seed (default: all)",
    )
    add("--seed", type=int, help="random seed of the data's order and subset (default: 0)")
    add(
        "--validation-split",
        type=float,
        help="last fraction of the training set held out, on which the fitted rules "
        "learn (article: 0.2); combine takes a tree's own val/ folder first",
    )


def add_prediction_flags(add):
    """How images are predicted: every command's."""
    add(
        "--batch-size",
        type=int,
        help="images per batch, training and prediction (article: 32); combine's and "
        "predict's default is 256",
    )
    add(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average each prediction with the prediction for its mirror image",
    )


def add_scoring_flags(add):
    """What the results table scores and where it goes: training's and combine's."""
    add(
        "--combine",
        nargs="+",
        choices=combination.RULES,
        help="combination rules to score; the article's average always comes first",
    )


def add_results_flags(add):
    """Whether costs are measured, and where the results go: training's, combine's and distill's."""
    add(
        "--cost",
        action=argparse.BooleanOptionalAction,
        help="measure parameters, file size, batch-1 latency and batch-256 throughput "
        "(default: on when training; off in combine, where each model runs 23 times more)",
    )
    add("--logs-dir", type=user_path, help="logs and results folder (default: logs)")


def add_export_flags(add):
    """The one-file export: training's and combine's."""
    add(
        "--export",
        type=user_path,
        metavar="PATH.keras",
        help="write the ensemble of all the models as one Keras model file",
    )
    add(
        "--export-rule",
        choices=export.EXPORT_RULES,
        help="combining layer of the exported file (default: average)",
    )


def add_loading_flags(add):
    """Loading models that need more than Keras: combine's, predict's and distill's."""
    add(
        "--custom-objects",
        action="append",
        metavar="FILE.py",
        type=user_path,
        help="a Python file (or module) that defines the models' custom layers or "
        "functions; it is imported (its top level runs) and what it defines is given "
        "to Keras (repeatable)",
    )
    add(
        "--safe-mode",
        action=argparse.BooleanOptionalAction,
        help="refuse the Python code of Lambda layers, as Keras does (default); "
        "--no-safe-mode loads it, for files you trust",
    )


def add_training_flags(parser, defaults):
    """The recipe the article fixes (epochs, batch, rate, members), its data and folders."""
    add = parser.add_argument
    add(
        "--preset",
        choices=list(PRESETS),
        help="article (default) or fast: sets the recipe flags below, which still override it",
    )
    add("--epochs", type=int, help=f"epochs per member (article: {defaults.epochs})")
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
        "--weights-dir", type=user_path, help=f"checkpoint folder (default: {defaults.weights_dir})"
    )


def add_run_flags(add, defaults):
    """What a run does: train, evaluate or both, and how members are trained."""
    add(
        "--eval-only",
        action="store_true",
        help="skip training: ensemble the best checkpoints already in --weights-dir",
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


def add_restart_flags(add, defaults):
    """Restarting a network that died, and training again what is trained."""
    add(
        "--restarts",
        type=int,
        help="fresh starts for a member whose network dies (same output for every image); "
        f"0 trains each member exactly once, as the article (default: {defaults.restarts})",
    )
    add(
        "--retrain",
        action="store_true",
        help="train members afresh, replacing finished or interrupted runs (by default a "
        "new run skips finished members, resumes an interrupted one, and refuses to do "
        "either under other training flags)",
    )


def add_output_flags(add):
    """What a run scores and writes besides the article's table."""
    add(
        "--export-members",
        type=user_path,
        metavar="DIR",
        help="also write each member as DIR/<name>.keras, a model of its own "
        "(python ensemble.py combine takes them, from several runs)",
    )


def add_recipe_options(parser):
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


def add_combine_flags(add):
    """combine's own: the models, every subset, the probabilities saved."""
    add(
        "models",
        nargs="+",
        metavar="MODEL.keras",
        type=user_path,
        help="two or more classifiers of images in [0, 1] (CIFAR-10's: "
        "32x32x3, 10 classes) to class probabilities or logits; each is "
        "named after its file (and folders, if files share a name); a "
        "folder stands for the .keras and .h5 files in it and its "
        "folders",
    )
    add(
        "--every-subset",
        action="store_true",
        help=f"score every subset even beyond {combination.EVERY_SUBSET_UP_TO} "
        "models (default: then each model, all but each one, and all)",
    )
    add(
        "--save-probs",
        metavar="PATH.npz",
        type=user_path,
        help="also write the probabilities the table is scored from, each "
        "model's on the test and validation images, with the labels, to "
        "an .npz file for NumPy",
    )


def add_distill_flags(add, defaults):
    """distill's own: the teacher, the student and the loss's two knobs."""
    add(
        "--teacher",
        nargs="+",
        metavar="MODEL.keras",
        type=user_path,
        help="saved classifiers (files, or folders of them, as combine takes) whose "
        "combined probabilities teach; an --export file of a fitted rule is one such "
        "(default: the best checkpoints of --models in --weights-dir)",
    )
    add(
        "--teacher-rule",
        choices=export.EXPORT_RULES,
        help="how the teacher combines its models; the fitted rules learn on the "
        "validation split (default: average, the article's)",
    )
    add(
        "--student",
        metavar="NAME|FILE.keras",
        help=f"the network to train: one of {', '.join(MODELS)}, or a classifier's "
        ".keras file ending in a softmax (default: the member with the lowest "
        "validation error in --logs-dir, else conv_pool_cnn)",
    )
    add(
        "--student-weights",
        choices=("fresh", "current"),
        help="a student file trains from new weights (default) or from its own",
    )
    add(
        "--temperature",
        type=float,
        metavar="T",
        help=f"softens both sides' probabilities in the distillation loss (default: "
        f"{defaults.temperature:g})",
    )
    add(
        "--label-weight",
        type=float,
        metavar="W",
        help="weight of the true labels' cross-entropy; 1 - W goes to the teacher's "
        f"softened probabilities (default: {defaults.label_weight:g})",
    )
    add(
        "--export",
        type=user_path,
        metavar="PATH.keras",
        help="where the trained student goes, one .keras file that predict takes "
        "(default: WEIGHTS_DIR/student.keras)",
    )


TOP_CLASSES = 3  # predict's default --top
PIXELS = ("auto", "0-1", "0-255")  # --pixels


def add_predict_flags(add):
    """predict's own: the model, the images, what is shown and written."""
    add(
        "--model",
        required=True,
        type=user_path,
        help="a .keras (or .h5) classifier of images; one written by --export names its classes",
    )
    add(
        "images",
        nargs="+",
        metavar="IMAGE",
        type=user_path,
        help=f"image files ({readers.IMAGE_KINDS}) of any size, or folders of them",
    )
    add(
        "--top", type=int, help=f"classes shown per image (default: {TOP_CLASSES}, or all of fewer)"
    )
    add(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="soften (T > 1) or sharpen the probabilities: softmax(log(p) "
        "/ T), with the T that --combine temperature fitted (results.json); "
        "the top class stays",
    )
    add(
        "--pixels",
        choices=PIXELS,
        default="auto",
        help="the images' scale: 0-1 (x / 255, the article's, and every "
        "exported file's), 0-255, or auto: 0-255 for a model that rescales "
        "its input itself (a first Rescaling(1/255), say), else 0-1",
    )
    # One comma-separated value, not nargs="+", which would take the images after it too.
    add(
        "--classes",
        metavar="NAME,NAME,...",
        type=_comma_separated,
        help="the model's class names, in the order of its outputs (default: "
        "those the file names; else CIFAR-10's for 10 classes, 'class 0', "
        "'class 1', ... for others)",
    )
    add(
        "--csv",
        metavar="PATH.csv",
        type=user_path,
        help="also write every image's probability of every class to this "
        "file: a header (image, predicted, the class names), then one row "
        "per image",
    )


def _comma_separated(text):
    return [name.strip() for name in text.split(",")]
