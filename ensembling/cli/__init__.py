"""The command line: `python ensemble.py [flags]` trains and ensembles (the article),
`python ensemble.py combine ...` ensembles saved classifiers, `python ensemble.py
predict ...` classifies images. Errors a user can fix print one line and exit 2.
"""

import dataclasses
import errno
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import keras

from ensembling import backend, export, parallel, report, training
from ensembling.cli import checks, combine, options, predict
from ensembling.errors import DataError, ExportError, TrainingFailed, UsageError

INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT (128 + 2)
BROKEN_PIPE = 141  # and for a program SIGPIPE ended (128 + 13): its reader left
# Disk full, quota, read-only file system, permission: the user can fix these.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv, run):
    """Runs the command in `argv` and returns its exit code; training runs `run(settings)`,
    which `ensemble.py` passes in, so that the article's pipeline stays in that file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in options.COMMANDS:
        command = {"predict": predict.main, "combine": combine.main}[argv[0]]
        try:
            return command(argv[1:])
        except KeyboardInterrupt:
            print(f"\nensemble.py {argv[0]}: interrupted", file=sys.stderr)
            return INTERRUPTED
    if any(arg.startswith("--pa") and "--parallel".startswith(arg) for arg in argv):
        # Before parsing: resolving --precision auto already opens the GPU.
        parallel.share_the_gpu()
    settings = options.parse_args(argv)
    training.reset_stop()
    try:
        # --parallel stops its member processes with SIGINT, which they may have been
        # started ignoring (a parent run in the background of a script).
        member = (signal.SIGINT,) if parallel.member_process() else ()
        with training.stopping_on_signals(always=member):
            return _train_and_report(settings, run)
    except KeyboardInterrupt:
        # Ctrl-C or a scheduler's SIGTERM is how runs are stopped on purpose: say how to
        # go on, not where Python was.
        how, code = training.stopped_by()
        print(
            f"\nensemble.py: {how}; run the same command again: trained members are "
            "kept and training resumes after its last completed epoch",
            file=sys.stderr,
        )
        return code


def _storage_error(error, then):
    """One line for a full disk or an unwritable folder (exit code 2); re-raises others."""
    if error.errno not in STORAGE_ERRNOS:
        raise error
    where = f" writing {error.filename}" if error.filename else ""
    print(
        f"ensemble.py: error: {error.strerror or error}{where}; free space or fix "
        f"permissions, {then}",
        file=sys.stderr,
    )
    return 2


def _train_and_report(settings, run):
    try:
        checks.check_settings(settings)
        print("settings:", json.dumps(dataclasses.asdict(settings)))
        # Said before hours of training, not after: a GPU that CUDA failed to find
        # otherwise shows only as a run a hundred times slower.
        print(
            f"keras {keras.__version__} on {keras.backend.backend()}, devices: "
            + ", ".join(backend.devices())
        )
        if not settings.eval_only and not backend.has_accelerator():
            print(
                "no GPU found: training runs on the CPU, hours for the full recipe "
                "(see docs/gpu.md)"
            )
        start = time.perf_counter()
        rows, extra = run(settings)
        extra["total_seconds"] = round(time.perf_counter() - start, 1)
        if settings.train_only:
            then = "; --eval-only with the same --weights-dir ensembles them"
            if parallel.member_process():  # --parallel's main process ensembles them
                then = ""
            print(f"trained {', '.join(settings.models)} in {extra['total_seconds']} s{then}")
            return 0
        path = report.save_results(settings, rows, extra)
    except (UsageError, DataError, ExportError) as error:
        print(f"ensemble.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"ensemble.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        return _storage_error(error, "then run the same command again: it resumes")
    logs_dir = Path(settings.logs_dir)
    print()
    print(report.format_table(rows))
    print("\nevery combination (NLL, ECE and Brier need probabilities: none for votes)")
    print(report.full_table(rows))
    for note in report.table_notes(rows):
        print(note)
    if "costs" in extra:
        print("\ncost on " + ", ".join(backend.devices()))
        print(report.cost_table(extra["costs"]))
    print(f"\nresults saved to {path} and {path.with_suffix('.md')}")
    if importlib.util.find_spec("matplotlib") is None:  # installed without requirements.txt
        print(
            "plots skipped: matplotlib is not installed (pip install matplotlib, then "
            "python ensemble.py --eval-only with the same --weights-dir draws them)"
        )
    else:
        try:
            plots = report.plot_training_curves(logs_dir, settings.models)
            plots.append(report.plot_test_errors(rows, logs_dir / "test_errors.png"))
        except OSError as error:  # the results are saved; only the plots are missing
            return _storage_error(
                error,
                "then python ensemble.py --eval-only with the same "
                "--weights-dir draws the plots again",
            )
        print("plots: " + ", ".join(str(p) for p in plots))
    tta = "; without flip TTA, which the table used" if settings.tta else ""
    if "export" in extra:
        exported = extra["export"]
        print(f"ensemble exported to {exported['path']} ({export.described(exported)}{tta})")
    if "export_members" in extra:
        print(
            f"members exported to {', '.join(extra['export_members'].values())}"
            + (f" ({tta[2:]})" if tta else "")
        )
    print(f"{extra['total_seconds']} s in all")
    return 0
