"""The command line: `python ensemble.py [flags]` trains and ensembles (the article),
`python ensemble.py combine ...` ensembles saved classifiers, `python ensemble.py
predict ...` classifies images. Errors a user can fix print one line and exit 2.
"""

import dataclasses
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import keras

from ensembling import backend, export, parallel, report, training
from ensembling.cli import checks, combine, distill, options, predict
from ensembling.cli.exits import INTERRUPTED, exit_code


def main(argv, run):
    """Runs the command in `argv` and returns its exit code; training runs `run(settings)`,
    which `ensemble.py` passes in, so that the article's pipeline stays in that file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv[:1] and argv[0] in ("train", *options.COMMANDS) else "train"
    flags = argv[1:] if argv[:1] == [command] else argv
    if command == "train":
        return _train(flags, run)
    if command == "distill":
        return stoppable("ensemble.py distill", lambda: distill.main(flags))
    prog = f"ensemble.py {command}"
    body = {"predict": predict.main, "combine": combine.main}[command]
    try:
        return body(flags)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _train(flags, run):
    """`python ensemble.py [train] [flags]`: the article's run."""
    if any(arg.startswith("--pa") and "--parallel".startswith(arg) for arg in flags):
        # Before parsing: resolving --precision auto already opens the GPU.
        parallel.share_the_gpu()
    settings = options.parse_args(flags)
    return stoppable("ensemble.py", lambda: _train_and_report(settings, run))


def stoppable(prog, body):
    """`body()`'s exit code; stopped on purpose by Ctrl-C or a scheduler's SIGTERM, it
    says so in one line, and the same command resumes it."""
    training.reset_stop()
    try:
        # --parallel stops its member processes with SIGINT, which they may have been
        # started ignoring (a parent run in the background of a script).
        member = (signal.SIGINT,) if parallel.member_process() else ()
        with training.stopping_on_signals(always=member):
            return body()
    except KeyboardInterrupt:
        how, code = training.stopped_by()
        print(
            f"\n{prog}: {how}; run the same command again: what is trained is kept and "
            "training resumes after its last completed epoch",
            file=sys.stderr,
        )
        return code
    finally:
        training.reset_stop()  # the stop was this run's: the next one here starts afresh


def _train_and_report(settings, run):
    saved = {}
    code = exit_code(
        "ensemble.py",
        lambda: _run_and_save(settings, run, saved),
        "then run the same command again: it resumes",
    )
    if code != 0 or settings.train_only:
        return code
    rows, extra, path = saved["rows"], saved["extra"], saved["path"]
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
        plots = []

        def draw():
            plots.extend(_plots(settings, rows))
            return 0

        code = exit_code(  # the results are saved; only the plots can be missing
            "ensemble.py",
            draw,
            "then python ensemble.py --eval-only with the same --weights-dir draws the plots again",
        )
        if code:
            return code
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


def _run_and_save(settings, run, saved):
    """Checks `settings`, runs them and saves the results into `saved` (rows, extra,
    path); returns 0."""
    checks.check_settings(settings)
    print("settings:", json.dumps(dataclasses.asdict(settings)))
    # Said before hours of training, not after: a GPU that CUDA failed to find
    # otherwise shows only as a run a hundred times slower.
    print(
        f"keras {keras.__version__} on {keras.backend.backend()}, devices: "
        + ", ".join(backend.devices())
    )
    if not settings.eval_only and not backend.has_accelerator():
        print("no GPU found: training runs on the CPU, hours for the full recipe (see docs/gpu.md)")
    start = time.perf_counter()
    rows, extra = run(settings)
    extra["total_seconds"] = round(time.perf_counter() - start, 1)
    if settings.train_only:
        then = "; --eval-only with the same --weights-dir ensembles them"
        if parallel.member_process():  # --parallel's main process ensembles them
            then = ""
        print(f"trained {', '.join(settings.models)} in {extra['total_seconds']} s{then}")
        return 0
    saved.update(rows=rows, extra=extra, path=report.save_results(settings, rows, extra))
    return 0


def _plots(settings, rows):
    """The training curves of each member and the test errors of every row."""
    logs_dir = Path(settings.logs_dir)
    plots = report.plot_training_curves(logs_dir, settings.models)
    return [*plots, report.plot_test_errors(rows, logs_dir / "test_errors.png")]
