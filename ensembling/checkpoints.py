"""What a member leaves in --weights-dir, and the rules that keep it consistent.

`ensemble.compile_and_train` (the article's function) and `--joint` share these,
so that both write the same files under the same rules, and a later run can tell
what it may reuse, continue or must refuse:

    weights/<name>.<epoch>-<loss>.weights.h5   best-so-far checkpoints (the article's)
    weights/<name>.best.json                   which of them has the lowest recorded loss
    weights/backup/<name>/                     Keras' BackupAndRestore state mid-training
    weights/backup/joint/                      the same for a --joint run (all its members)
    weights/backup/<name>.recipe.json          the flags that run trains with (see RECIPE_FLAGS)
    weights/.<name>.lock                       held by the run training <name>
    logs/<name>.csv                            one row per epoch

It imports nothing from the project but models.py (Keras only, for the article's
dropout rates), so that every module can raise `UsageError`.
"""

import contextlib
import csv
import inspect
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ensembling.errors import UsageError
from models import MODELS

# The article's checkpoint name, with Keras 3's mandatory `.weights.h5` suffix.
CHECKPOINT_PATTERN = "{name}.{{epoch:02d}}-{{loss:.2f}}.weights.h5"
CHECKPOINT_RE = re.compile(r"^(?P<name>\w+)\.(?P<epoch>\d+)-(?P<loss>[\d.]+|nan|inf)\.weights\.h5$")
BEST_SUFFIX = ".best.json"
PARTIAL_SUFFIX = ".partial.weights.h5"  # Keras insists on the .weights.h5 ending
BACKUP_FOLDER = "backup"
JOINT_BACKUP = "joint"  # under BACKUP_FOLDER: not a member name, so never a member's folder
BACKUP_METADATA = "training_metadata.json"  # Keras' name: {"epoch": epochs completed}
BACKUP_WEIGHTS = "latest.weights.h5"  # Keras' name, beside it
PREVIOUS = ".bkp"  # Keras' suffix for the copies of both that double_checkpoint keeps
JOINT_MEMBERS = "members.json"
JOINT_STATE = "state.npz"
# The settings that decide what a member's training computes. A run asking for other
# values must neither pass off nor continue a member trained under these: it is
# refused (`recipe_conflict`) unless --retrain says to replace it. --data-dir is left
# out (the same data may move), and so are flags that do not change what a healthy
# run computes (--restarts, --distribute) or that act after training (--tta, --combine).
RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "validation_split",
    "learning_rate",
    "seed",
    "limit",
    "joint",
    "precision",
    "augment",
    "label_smoothing",
    "schedule",
    "warmup_epochs",
    "ema",
    "weight_decay",
    "dropout",
    "input_dropout",
)


class Resume(NamedTuple):
    epoch: int  # epochs already completed (0: a fresh start)
    best_loss: float | None  # lowest training loss among them


def backup_dir(name, settings):
    return Path(settings.weights_dir) / BACKUP_FOLDER / name


def joint_backup_dir(settings):
    return Path(settings.weights_dir) / BACKUP_FOLDER / JOINT_BACKUP


def read_joint_backup(settings):
    """(epochs completed, member names) of an interrupted `--joint` run, or None.

    The JAX path keeps one file (`state.npz`, its `meta` entry); the others keep
    Keras' BackupAndRestore files beside the list of members.
    """
    folder = joint_backup_dir(settings)
    state = folder / JOINT_STATE
    if state.is_file():
        try:
            with np.load(state) as saved:
                meta = json.loads(str(saved["meta"]))
            return int(meta["epoch"]), list(meta["members"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    try:
        done = int(json.loads((folder / BACKUP_METADATA).read_text())["epoch"])
        names = list(json.loads((folder / JOINT_MEMBERS).read_text())["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done, names


def settle_backup(folder):
    """Leaves Keras' BackupAndRestore files in `folder` as its last complete save wrote them.

    Keras (3.15, `double_checkpoint=True`) saves in place: it copies the weights and
    the metadata to `.bkp`, writes the new weights, then the new metadata, which is
    the save's commit. A Ctrl-C in between leaves weights that h5py opens but that
    hold only the layers written before it, and Keras falls back to the `.bkp` copies
    only when the weights do not open at all (OSError): the resume failed with
    "A total of 7 objects could not be loaded". So: metadata that reads and differs
    from its `.bkp` copy (or has none) means the last save completed, and nothing
    changes; otherwise the `.bkp` pair, the save before, replaces it, and without one
    the files go (the run starts afresh). Files of a JAX `--joint` run are not Keras'
    and are left alone.
    """
    folder = Path(folder)
    metadata, weights = folder / BACKUP_METADATA, folder / BACKUP_WEIGHTS
    previous_metadata = folder / (BACKUP_METADATA + PREVIOUS)
    previous_weights = folder / (BACKUP_WEIGHTS + PREVIOUS)
    keras_files = [metadata, weights, previous_metadata, previous_weights]
    if not any(path.exists() for path in keras_files):
        return
    if _backup_epoch(metadata) is not None and _text(metadata) != _text(previous_metadata):
        return  # the last save completed
    if _backup_epoch(previous_metadata) is not None and previous_weights.is_file():
        previous_weights.replace(weights)
        previous_metadata.replace(metadata)
        return
    for path in keras_files:
        path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def settle_joint_backup(settings, held):
    """`settle_backup` on the `--joint` folder, if this run holds all its members' locks
    (`held`): else another run may be writing it at this moment."""
    folder = joint_backup_dir(settings)
    listed = read_json(folder / JOINT_MEMBERS)
    members = listed.get("members") if isinstance(listed, dict) else None
    if isinstance(members, list) and set(members) <= set(held):
        settle_backup(folder)


def _backup_epoch(metadata):
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _text(path):
    try:
        return path.read_text()
    except OSError:
        return None


def prepare_member(name, settings, done=None):
    """Makes the files of `name` consistent before training it, and says where to start.

    With a backup left by a killed run (Keras' BackupAndRestore in the member's
    folder, or `done` epochs of a `--joint` run), training resumes after the last
    epoch it holds: log rows and checkpoints of any later epoch (the run died
    between writing them and the backup) are dropped. Without one, the member
    starts afresh and its old checkpoints, record and log are removed so that they
    cannot mix with the new run.
    """
    weights_dir, log = Path(settings.weights_dir), Path(settings.logs_dir) / f"{name}.csv"
    for partial in weights_dir.glob(f"{name}.*{PARTIAL_SUFFIX}"):
        partial.unlink()
    if done is None:
        settle_backup(backup_dir(name, settings))
        metadata = backup_dir(name, settings) / BACKUP_METADATA
        done = int(json.loads(metadata.read_text())["epoch"]) if metadata.is_file() else 0
    if not done:
        for stale in [
            *weights_dir.glob(f"{name}.*.weights.h5"),
            weights_dir / f"{name}{BEST_SUFFIX}",
            log,
        ]:
            stale.unlink(missing_ok=True)
        write_json(recipe_file(name, settings), recipe(name, settings))
        return Resume(0, None)
    rows = [row for row in read_log(log) if int(row["epoch"]) < done]
    if rows:
        with open(log, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for path in weights_dir.glob(f"{name}.*.weights.h5"):
        match = CHECKPOINT_RE.match(path.name)
        if match and match["name"] == name and int(match["epoch"]) > done:
            path.unlink()
    losses = [float(row["loss"]) for row in rows]
    return Resume(done, min(losses) if losses else None)


def is_finished(name, settings):
    """True when `name` completed `settings.epochs` epochs and its best checkpoint exists."""
    record_file = Path(settings.weights_dir) / f"{name}{BEST_SUFFIX}"
    if not record_file.is_file() or backup_dir(name, settings).exists():
        return False
    if name in (read_joint_backup(settings) or (0, []))[1]:
        return False  # part of an interrupted --joint run
    try:
        record = json.loads(record_file.read_text())
    except ValueError:
        return False
    best = Path(settings.weights_dir) / str(record.get("file"))
    return record.get("epochs") == settings.epochs and best.is_file()


def unfinished(name, settings):
    """Why `name`'s checkpoints in the weights folder may not be its last, or None.

    `--eval-only` scores whatever best checkpoint is there; this says when that is
    a member still in training, or one whose run stopped before its last epoch.
    """
    owner = _read_owner(Path(settings.weights_dir) / f".{name}.lock")
    if owner is not None and _alive(owner):
        return f"another run is training it (pid {owner.get('pid')} on {owner.get('host')})"
    if backup_dir(name, settings).exists() or name in (read_joint_backup(settings) or (0, []))[1]:
        return "its training was stopped before its last epoch; the same command resumes it"
    return None


def logged_losses(name, settings):
    """Training loss of every epoch, from the CSV log (which survives a resume)."""
    return [float(row["loss"]) for row in read_log(Path(settings.logs_dir) / f"{name}.csv")]


def read_log(log):
    if not log.is_file():
        return []
    with open(log, newline="") as file:
        return list(csv.DictReader(file))


def checkpoint_pattern(name, settings):
    return str(Path(settings.weights_dir) / CHECKPOINT_PATTERN.format(name=name))


def record_best(name, losses, attempts, settings):
    """Writes `<name>.best.json`: the file ModelCheckpoint wrote for the lowest loss."""
    if not losses or np.all(np.isnan(losses)):
        return
    best_epoch = int(np.nanargmin(losses))
    pattern = checkpoint_pattern(name, settings)
    record = {
        "file": Path(pattern.format(epoch=best_epoch + 1, loss=losses[best_epoch])).name,
        "epoch": best_epoch + 1,
        "loss": float(losses[best_epoch]),
        "epochs": len(losses),
        "attempts": attempts,
        "recipe": recipe(name, settings),
    }
    write_json(Path(settings.weights_dir) / f"{name}{BEST_SUFFIX}", record)
    recipe_file(name, settings).unlink(missing_ok=True)  # the record holds it now


def recipe(name, settings):
    """The RECIPE_FLAGS values `name` trains with under `settings`."""
    values = {flag: getattr(settings, flag) for flag in RECIPE_FLAGS}
    if values["dropout"] is None:  # the rate, not None: NIN's 0.5 is --dropout 0.5
        values["dropout"] = article_dropout(name)
    return values


def article_dropout(name):
    """The dropout rate of `name` in the article: its builder's default.

    None for a builder without a `dropout` argument (one swapped into MODELS).
    """
    if name not in MODELS:  # a distilled student (all_cnn_student) is no builder
        return None
    parameter = inspect.signature(MODELS[name]).parameters.get("dropout")
    return None if parameter is None else parameter.default


def recipe_file(name, settings):
    return Path(settings.weights_dir) / BACKUP_FOLDER / f"{name}.recipe.json"


def recorded_recipe(name, settings):
    """The recipe `name`'s finished checkpoints were trained with, or None if unrecorded."""
    return _record(name, settings).get("recipe")


def recorded_attempts(name, settings):
    """How many starts `name`'s finished run took (restarts after dying), or None."""
    return _record(name, settings).get("attempts")


def _record(name, settings):
    return read_json(Path(settings.weights_dir) / f"{name}{BEST_SUFFIX}") or {}


def recipe_conflict(name, settings):
    """Why this run may not continue or reuse `name`'s files, or None if it may.

    An interrupted run of `name` continues only under the recipe it started with; a
    finished one is reused only if it was trained under this run's recipe. Records
    written before recipes were recorded are trusted (their epochs are still checked).
    """
    done = 0
    metadata = backup_dir(name, settings) / BACKUP_METADATA
    if metadata.is_file():
        done = int((read_json(metadata) or {}).get("epoch", 0))
    joint = read_joint_backup(settings)
    if joint and name in joint[1]:
        done = max(done, joint[0])
    wanted = recipe(name, settings)
    if done:
        stored = read_json(recipe_file(name, settings))
        fix = "run it with the same flags to resume it, or add --retrain to start over"
        what = f"an interrupted run of {name} in {settings.weights_dir} ({done} epochs done)"
        what += " started"
    else:
        stored = recorded_recipe(name, settings)
        fix = "add --retrain to train it again, replacing its checkpoints"
        what = f"{name} in {settings.weights_dir} was trained"
    if not isinstance(stored, dict):
        return None
    # Recorded before --dropout or --input-dropout existed: the article's rates.
    stored = {"dropout": article_dropout(name), "input_dropout": 0.0, **stored}
    differ = [flag for flag in RECIPE_FLAGS if flag in stored and stored[flag] != wanted[flag]]
    if not differ:
        return None
    return (
        f"{what} with {_flags(stored, differ)}, this run asks for "
        f"{_flags(wanted, differ)}; {fix}, or give this run its own --weights-dir and --logs-dir"
    )


def _flags(values, flags):
    words = []
    for flag in flags:
        option = "--" + flag.replace("_", "-")
        value = values[flag]
        if isinstance(value, bool):
            words.append(option if value else f"no {option}")
        else:
            words.append(f"{option} {'all' if value is None else value}")
    return ", ".join(words)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(content, indent=2) + "\n")


@contextlib.contextmanager
def replacing(path, temporary=None):
    """Yields a temporary path to write; renamed to `path` once written. Never half a
    file under `path`, and the file there before stays whole if the write fails (a
    full disk, Ctrl-C): the temporary one is removed then."""
    path = Path(path)
    temporary = Path(temporary or path.with_name(path.name + ".partial"))
    try:
        yield temporary
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_text(path, text):
    with replacing(path) as temporary:
        temporary.write_text(text)


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


class MemberLocks:
    """Lock files that keep two runs from training the same member into one folder.

    One file per member (`.<name>.lock`), so that runs training *different* members
    into a shared folder (one per GPU) go ahead side by side. A lock whose process is
    gone (same machine, pid no longer alive; POSIX only) is stale and taken over.
    """

    def __init__(self, weights_dir, names):
        self.paths = [Path(weights_dir) / f".{name}.lock" for name in names]
        self.held = []

    def __enter__(self):
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self, path):
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.ctime(),
            "command": " ".join(sys.argv),
        }
        for _ in range(2):
            try:
                with open(path, "x") as file:
                    json.dump(owner, file)
                self.held.append(path)
                return
            except FileExistsError:
                other = _read_owner(path)
                if other is not None and _alive(other):
                    name = path.name.removeprefix(".").removesuffix(".lock")
                    # A run on another machine cannot be checked from here: if it died
                    # there (a lost node, a SIGKILL), only its user can tell.
                    gone = (
                        ""
                        if _checkable(other)
                        else (f", or if that run is no longer running there, delete {path}")
                    )
                    raise UsageError(
                        f"{name} is being trained into {path.parent} by another run (pid "
                        f"{other['pid']} on {other['host']} since {other['since']}: "
                        f"{other['command']}); wait for it or use another --weights-dir{gone}"
                    ) from None
                print(f"removing stale lock {path} (its run has ended)")
                path.unlink(missing_ok=True)
        raise UsageError(f"could not take the lock {path}; remove it if no run uses the folder")

    def __exit__(self, *exc):
        for path in self.held:
            path.unlink(missing_ok=True)
        self.held = []


def _read_owner(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # half-written by a run that died at once: stale


# os.kill(pid, 0) asks whether a process lives on POSIX systems only: on Windows,
# any signal but Ctrl-C's *terminates* the process, the very run the lock protects.
PIDS_CHECKABLE = os.name == "posix"


def _checkable(owner):
    """Whether this process can tell if the lock's owner still runs: same machine, POSIX."""
    return PIDS_CHECKABLE and owner.get("host") == socket.gethostname()


def _alive(owner):
    if not _checkable(owner):
        return True  # another machine's run, or Windows: it cannot be checked from here
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True
