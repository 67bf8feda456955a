"""Resume after a crash: a killed run continues; finished members are not retrained."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import signal_this_process_when, write_tree

import ensemble
from ensembling import checkpoints, training
from ensembling.cli import checks, exits

ROOT = Path(__file__).resolve().parents[1]


def command(tmp_path, epochs, *extra):
    return [
        sys.executable, str(ROOT / "ensemble.py"), "--data-dir", str(tmp_path / "tree"),
        "--models", "nin_cnn", "--epochs", str(epochs), "--no-cost",
        "--weights-dir", str(tmp_path / "weights"), "--logs-dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


def backed_up(tmp_path):
    """How many epochs NIN's backup holds."""
    metadata = tmp_path / "weights" / "backup" / "nin_cnn" / "training_metadata.json"
    try:
        return json.loads(metadata.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def stop_after_epoch(tmp_path, epochs, epoch, sig):
    """Runs the command for `epochs`, sends `sig` once `epoch` epochs are backed up.

    Returns the exit code, stdout and stderr; the run must not have finished first.
    """
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"  # files: no pipe to fill
    unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines, even when killed
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen(command(tmp_path, epochs), cwd=tmp_path, stdout=stdout,
                               stderr=stderr, env=unbuffered)  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if backed_up(tmp_path) >= epoch:
                os.kill(run.pid, sig)
                break
            time.sleep(0.02)
        run.wait()
    assert not (tmp_path / "weights" / "nin_cnn.best.json").exists(), "it ended before the signal"
    return run.returncode, out.read_text(), err.read_text()


def stop_here_after_epoch(tmp_path, epochs, epoch, sig, capsys):
    """`stop_after_epoch` in this process, for a signal the program handles."""
    with signal_this_process_when(lambda: backed_up(tmp_path) >= epoch, sig):
        code = ensemble.main(command(tmp_path, epochs)[2:])
    out, err = capsys.readouterr()
    assert not (tmp_path / "weights" / "nin_cnn.best.json").exists(), "it ended before the signal"
    return code, out, err


def resumed_after(stdout):
    """The epoch a resumed run says it continues after."""
    assert "resuming nin_cnn after epoch " in stdout, stdout[-3000:]
    return int(stdout.split("resuming nin_cnn after epoch ")[1].split()[0])


def test_a_run_stopped_by_sigterm_ctrl_c_or_sigkill_resumes_each_time_after_its_last_epoch(
    tmp_path, capsys
):
    # One run stopped three ways in turn, each time resumed by the same command.
    # SIGTERM is how Slurm preempts a job (SIGKILL follows after a grace time); killed
    # by it, a run once left its lock, which a requeued job took for a live run's.
    write_tree(tmp_path / "tree", train_per_class=8, test_per_class=2)
    # Each signal comes within 20 ms of an epoch's backup: the epochs still to go
    # (a second or more of training) leave no chance of finishing first.
    epochs, after = 12, 0
    for sig, stop_at, code, said in [
        (signal.SIGTERM, 2, 143, "stopped by SIGTERM"),
        (signal.SIGINT, 4, 130, "interrupted"),
        (signal.SIGKILL, 6, -signal.SIGKILL, None),
    ]:
        if sig == signal.SIGKILL:  # the end of a process: it takes one of its own
            returncode, out, err = stop_after_epoch(tmp_path, epochs, stop_at, sig)
        else:
            returncode, out, err = stop_here_after_epoch(tmp_path, epochs, stop_at, sig, capsys)
        if after:
            assert resumed_after(out) >= after
        assert returncode == code, err[-3000:]
        if said:  # a stop the run could handle: one line, and the lock released
            assert code == 128 + sig and "Traceback" not in err
            assert err.strip().splitlines()[-1].startswith(f"ensemble.py: {said}; run the same")
            assert not list((tmp_path / "weights").glob(".*.lock"))
        after = stop_at

    # The last resume in this process: only the stops needed a process of their own.
    assert ensemble.main(command(tmp_path, epochs)[2:]) == 0
    assert resumed_after(capsys.readouterr().out) >= after
    log = (tmp_path / "logs" / "nin_cnn.csv").read_text().splitlines()
    epochs_logged = [int(line.split(",")[0]) for line in log[1:]]
    assert epochs_logged == list(range(epochs))  # no gaps, no repeats
    record = json.loads((tmp_path / "weights" / "nin_cnn.best.json").read_text())
    assert record["epochs"] == epochs and (tmp_path / "weights" / record["file"]).is_file()
    assert not list((tmp_path / "weights").glob("*.partial*"))
    assert not (tmp_path / "weights" / "backup" / "nin_cnn").exists()
    results = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert [row["row"] for row in results["results"]] == ["NIN"]


def test_a_ctrl_c_that_keras_swallows_still_stops_the_run(tmp_path, capsys, monkeypatch):
    # Keras 3.15 turns each batch's logs into floats inside a bare `except:`
    # (python_utils.pythonify_logs); a Ctrl-C that lands there was lost and training
    # went on. Here one lands there, at the first batch's logs.
    from keras.src import backend

    convert, sent = backend.convert_to_numpy, []

    def convert_then_interrupt(value):
        if not sent and sys._getframe(1).f_code.co_name == "pythonify_logs":
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, in the try
        return convert(value)

    monkeypatch.setattr(backend, "convert_to_numpy", convert_then_interrupt)
    write_tree(tmp_path / "tree")
    assert ensemble.main(command(tmp_path, 3)[2:]) == exits.INTERRUPTED
    assert sent
    assert capsys.readouterr().err.strip().startswith("ensemble.py: interrupted")
    assert not (tmp_path / "weights" / "nin_cnn.best.json").exists()  # it did not go on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_ctrl_c_inside_the_backups_save_resumes_from_the_save_before(
    tmp_path, capsys, monkeypatch
):
    # Keras writes its backup in place, layer after layer: a Ctrl-C in the middle of
    # epoch 2's save leaves weights that open but lack most layers (seen under
    # --parallel's Ctrl-C test), and the resume died with "objects could not be loaded".
    import h5py
    import keras

    save, saves = keras.Model.save_weights, []

    def save_then_interrupt(model, filepath, *args, **kwargs):
        save(model, filepath, *args, **kwargs)
        if str(filepath).endswith(checkpoints.BACKUP_WEIGHTS):
            saves.append(filepath)
            if len(saves) == 2:  # as if the Ctrl-C came after the first layers
                with h5py.File(filepath, "a") as file:
                    for layer in list(file["layers"])[2:]:
                        del file["layers"][layer]
                raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save_weights", save_then_interrupt)
    write_tree(tmp_path / "tree")
    argv = command(tmp_path, 3)[2:]
    assert ensemble.main(argv) == exits.INTERRUPTED
    monkeypatch.undo()
    capsys.readouterr()
    assert ensemble.main(argv) == 0
    assert "resuming nin_cnn after epoch 1 " in capsys.readouterr().out
    rows = (tmp_path / "logs" / "nin_cnn.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [0, 1, 2]


def test_a_ctrl_c_during_training_waits_for_the_backup_to_be_saved(tmp_path, capfd, monkeypatch):
    # The same Ctrl-C as above, from the terminal: it is held back to the next batch's
    # end, so the save it lands in completes and the run resumes after that epoch.
    import keras

    save, saves = keras.Model.save_weights, []

    def interrupted_save(model, filepath, *args, **kwargs):
        if str(filepath).endswith(checkpoints.BACKUP_WEIGHTS):
            saves.append(filepath)
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # handled inside the save below
        save(model, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", interrupted_save)
    write_tree(tmp_path / "tree")
    argv = command(tmp_path, 4)[2:]
    assert ensemble.main(argv) == exits.INTERRUPTED
    # Forgotten once the run has ended: a Keras loop run later in this process (a
    # notebook's, or the next test's) would otherwise stop at its first batch.
    assert not training.INTERRUPTED.is_set()
    monkeypatch.undo()
    err = capfd.readouterr().err
    assert "stopping at the end of this batch; Ctrl-C again stops at once" in err
    assert ensemble.main(argv) == 0
    assert "resuming nin_cnn after epoch 2 " in capfd.readouterr().out


def test_in_a_training_loop_only_a_second_ctrl_c_raises_at_once():
    training.reset_stop()
    with training.stopping_at_batch_ends():
        try:
            training.interrupt(signal.SIGINT, None)  # held back: RaiseInterrupt raises it
        except KeyboardInterrupt:  # not raised on: it would stop pytest itself
            pytest.fail("the first Ctrl-C in a training loop was raised at once")
        assert training.INTERRUPTED.is_set()
        with pytest.raises(KeyboardInterrupt):
            training.RaiseInterrupt().on_train_batch_end(0)
        with pytest.raises(KeyboardInterrupt):
            training.interrupt(signal.SIGINT, None)
    training.reset_stop()
    with pytest.raises(KeyboardInterrupt):  # outside a training loop: at once
        training.interrupt(signal.SIGINT, None)
    training.reset_stop()


def test_a_parents_sigint_after_the_jobs_sigterm_still_waits_for_the_batch():
    # Slurm's SIGTERM reaches a --parallel member and its parent, which then stops the
    # member with SIGINT: one stop, held to the batch's end like the first.
    training.reset_stop()
    with training.stopping_at_batch_ends():
        try:
            training.interrupt(signal.SIGTERM, None)
            training.interrupt(signal.SIGINT, None)
        except KeyboardInterrupt:
            pytest.fail("a second, different stop signal was raised at once")
        with pytest.raises(KeyboardInterrupt):  # the same one again: at once
            training.interrupt(signal.SIGINT, None)
    assert training.stopped_by() == ("stopped by SIGTERM", 143)
    training.reset_stop()


def test_stop_signals_are_handled_unless_started_ignored_and_restored_after():
    # nohup starts a run ignoring SIGHUP, a shell script its background jobs ignoring
    # SIGINT: such a run must outlive its terminal, and a Ctrl-C meant for the script.
    before = {sig: signal.getsignal(sig) for sig in training.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with training.stopping_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is training.interrupt
            assert signal.getsignal(signal.SIGINT) is training.interrupt
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        # --parallel's member processes: their parent stops them with SIGINT, always.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with training.stopping_on_signals(always=(signal.SIGINT,)):
            assert signal.getsignal(signal.SIGINT) is training.interrupt
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_first_stop_signal_names_the_stop_and_its_exit_code():
    training.reset_stop()
    assert training.stopped_by() == ("interrupted", 130)  # a KeyboardInterrupt as such
    for sig in (signal.SIGTERM, signal.SIGINT):  # outside a training loop: at once
        with pytest.raises(KeyboardInterrupt):
            training.interrupt(sig, None)
    assert training.stopped_by() == ("stopped by SIGTERM", 143)
    training.reset_stop()
    assert training.stopped_by() == ("interrupted", 130) and not training.INTERRUPTED.is_set()


def write_backup(folder, weights, metadata, previous_weights, previous_metadata):
    """Keras' four backup files; None leaves one out."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        checkpoints.BACKUP_WEIGHTS: weights,
        checkpoints.BACKUP_METADATA: metadata,
        checkpoints.BACKUP_WEIGHTS + ".bkp": previous_weights,
        checkpoints.BACKUP_METADATA + ".bkp": previous_metadata,
    }
    for name, content in contents.items():
        if content is not None:
            (folder / name).write_text(content)


def epoch(n):
    return json.dumps({"epoch": n, "batch": 0})


@pytest.mark.parametrize(
    "when, files, left",
    [
        # (weights, metadata, .bkp weights, .bkp metadata) -> the same after settling
        ("after a complete save", ("w3", epoch(3), "w2", epoch(2)),
         ("w3", epoch(3), "w2", epoch(2))),
        ("after the first save", ("w1", epoch(1), None, None), ("w1", epoch(1), None, None)),
        ("copying the weights to .bkp", ("w3", epoch(3), "w", epoch(2)),
         ("w3", epoch(3), "w", epoch(2))),
        ("copying the metadata to .bkp", ("w3", epoch(3), "w3", ""),
         ("w3", epoch(3), "w3", "")),
        ("writing the weights", ("w", epoch(3), "w3", epoch(3)), ("w3", epoch(3), None, None)),
        ("between weights and metadata", ("w4", epoch(3), "w3", epoch(3)),
         ("w3", epoch(3), None, None)),
        ("writing the metadata", ("w4", "", "w3", epoch(3)), ("w3", epoch(3), None, None)),
        ("writing the first weights", ("w", None, None, None), None),
    ],
)  # fmt: skip
def test_a_backup_stopped_mid_save_is_rolled_back_to_the_save_before(tmp_path, when, files, left):
    folder = tmp_path / "backup" / "nin_cnn"
    write_backup(folder, *files)
    checkpoints.settle_backup(folder)
    if left is None:
        assert not folder.exists()  # nothing complete: a fresh start
        return
    expected = tmp_path / "expected"
    write_backup(expected, *left)
    found = {p.name: p.read_text() for p in folder.iterdir()}
    assert found == {p.name: p.read_text() for p in expected.iterdir()}, when


def test_settling_leaves_a_jax_joint_state_and_a_busy_joint_folder_alone(tmp_path):
    settings = settings_for(tmp_path)
    folder = checkpoints.joint_backup_dir(settings)
    folder.mkdir(parents=True)
    (folder / checkpoints.JOINT_STATE).write_bytes(b"state")
    checkpoints.settle_backup(folder)  # no Keras files: not Keras' to settle
    assert [p.name for p in folder.iterdir()] == [checkpoints.JOINT_STATE]
    (folder / checkpoints.JOINT_STATE).unlink()
    # A --joint run of two members, stopped mid-save: settled only by a run that
    # holds both members' locks, since another run may be writing it.
    write_backup(folder, "w", epoch(3), "w3", epoch(3))
    (folder / checkpoints.JOINT_MEMBERS).write_text(json.dumps({"members": ["a", "b"]}))
    checkpoints.settle_joint_backup(settings, ["a"])
    assert (folder / checkpoints.BACKUP_WEIGHTS).read_text() == "w"
    checkpoints.settle_joint_backup(settings, ["a", "b", "c"])
    assert (folder / checkpoints.BACKUP_WEIGHTS).read_text() == "w3"


def test_finished_members_are_skipped_unless_retrain(tmp_path, capsys):
    write_tree(tmp_path / "tree")
    argv = command(tmp_path, 1)[2:]
    assert ensemble.main(argv) == 0
    record = tmp_path / "weights" / "nin_cnn.best.json"
    first = record.read_text()
    capsys.readouterr()
    assert ensemble.main(argv) == 0
    assert "nin_cnn is already trained" in capsys.readouterr().out
    assert record.read_text() == first
    assert ensemble.main([*argv, "--retrain"]) == 0
    assert "training nin_cnn" in capsys.readouterr().out


def settings_for(tmp_path):
    for folder in ("weights", "logs"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return ensemble.Settings(weights_dir=str(tmp_path / "weights"), logs_dir=str(tmp_path / "logs"))


def test_resume_drops_what_ran_ahead_of_the_backup(tmp_path):
    settings = settings_for(tmp_path)
    weights, logs = tmp_path / "weights", tmp_path / "logs"
    backup = weights / "backup" / "nin_cnn"
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 2, "batch": 0}))
    rows = ["epoch,acc,loss,val_acc,val_loss", "0,0.1,2.0,0.1,2.0", "1,0.2,1.5,0.2,1.6",
            "2,0.3,1.2,0.3,1.4"]  # fmt: skip
    (logs / "nin_cnn.csv").write_text("\n".join(rows) + "\n")
    for name in ("nin_cnn.01-2.00.weights.h5", "nin_cnn.02-1.50.weights.h5",
                 "nin_cnn.03-1.20.weights.h5", "nin_cnn.03-1.20.partial.weights.h5"):  # fmt: skip
        (weights / name).write_bytes(b"x")
    resume = checkpoints.prepare_member("nin_cnn", settings)
    assert resume == checkpoints.Resume(2, 1.5)
    assert sorted(p.name for p in weights.glob("nin_cnn.*")) == [
        "nin_cnn.01-2.00.weights.h5",
        "nin_cnn.02-1.50.weights.h5",
    ]
    assert (logs / "nin_cnn.csv").read_text().splitlines() == rows[:3]


def test_a_fresh_start_clears_the_old_files_of_that_member_only(tmp_path):
    settings = settings_for(tmp_path)
    weights = tmp_path / "weights"
    for name in ("nin_cnn.05-0.50.weights.h5", "nin_cnn.best.json", "all_cnn.05-0.50.weights.h5"):
        (weights / name).write_bytes(b"x")
    assert checkpoints.prepare_member("nin_cnn", settings) == checkpoints.Resume(0, None)
    assert [p.name for p in weights.iterdir() if p.is_file()] == ["all_cnn.05-0.50.weights.h5"]


def test_a_half_written_checkpoint_is_never_taken(tmp_path):
    (tmp_path / "nin_cnn.04-0.90.weights.h5").write_bytes(b"x")
    (tmp_path / "nin_cnn.05-0.10.partial.weights.h5").write_bytes(b"truncated")
    assert checkpoints.best_checkpoint(tmp_path, "nin_cnn").name == "nin_cnn.04-0.90.weights.h5"


def test_checkpoints_are_published_under_their_final_names(tmp_path):
    write_tree(tmp_path / "tree")
    assert ensemble.main(command(tmp_path, 1)[2:]) == 0
    names = [p.name for p in (tmp_path / "weights").glob("nin_cnn.*.h5")]
    assert len(names) == 1 and ".partial" not in names[0]


def test_a_joint_run_killed_with_sigkill_resumes_after_its_last_epoch(tmp_path, capsys):
    # Both members of one --joint run continue from the saved joint state. On JAX the
    # state includes the shuffling generator and dropout seeds, so the resumed run's
    # losses are exactly those of a run that was never interrupted.
    import csv

    import keras

    # 20 images: one batch of 16 an epoch, and 4 to validate.
    write_tree(tmp_path / "tree", train_per_class=2, test_per_class=2)
    epochs, members = 4, ("nin_cnn", "all_cnn")  # killed after 1: 3 to go

    def joint_command(folder):
        return [
            sys.executable, str(ROOT / "ensemble.py"), "--data-dir", str(tmp_path / "tree"),
            "--models", *members, "--joint", "--epochs", str(epochs), "--batch-size", "16",
            "--no-cost", "--weights-dir", str(tmp_path / folder / "weights"),
            "--logs-dir", str(tmp_path / folder / "logs"),
        ]  # fmt: skip

    def losses(folder, name):
        with open(tmp_path / folder / "logs" / f"{name}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        assert [int(row["epoch"]) for row in rows] == list(range(epochs))  # no gap, no repeat
        return [float(row["loss"]) for row in rows]

    (tmp_path / "killed").mkdir()
    settings = settings_for(tmp_path / "killed")
    run = subprocess.Popen(joint_command("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        backup = checkpoints.read_joint_backup(settings)
        if backup and backup[0] >= 1:
            os.kill(run.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    # Resumed in this process: only the kill needed a process of its own.
    assert ensemble.main(joint_command("killed")[2:]) == 0
    assert "resuming nin_cnn, all_cnn after epoch" in capsys.readouterr().out
    for name in members:
        record = json.loads((tmp_path / "killed" / "weights" / f"{name}.best.json").read_text())
        assert record["epochs"] == epochs
        assert (tmp_path / "killed" / "weights" / record["file"]).is_file()
    assert not (tmp_path / "killed" / "weights" / "backup").exists() or not any(
        (tmp_path / "killed" / "weights" / "backup").iterdir()
    )
    results = json.loads((tmp_path / "killed" / "logs" / "results.json").read_text())
    assert len(results["results"]) == 3  # both members and their pair

    if keras.backend.backend() == "jax":
        assert ensemble.main(joint_command("whole")[2:]) == 0
        for name in members:
            assert losses("killed", name) == pytest.approx(losses("whole", name), rel=1e-5)
    else:
        for name in members:
            losses("killed", name)


def test_a_member_trained_with_other_flags_is_neither_reused_nor_replaced(tmp_path, capsys):
    # Before, --learning-rate 1e-4 reported the old 1e-3 checkpoints under the new
    # settings, and --epochs 2 deleted a finished 1-epoch run to train afresh.
    write_tree(tmp_path / "tree")
    argv = command(tmp_path, 1)[2:]
    assert ensemble.main(argv) == 0
    weights = tmp_path / "weights"
    before = {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()}
    for flags, asked in [
        (["--learning-rate", "0.0001"], "asks for --learning-rate 0.0001"),
        (["--epochs", "2"], "asks for --epochs 2"),
        (["--joint"], "asks for --joint"),
        (["--dropout", "0.3"], "trained with --dropout 0.5, this run asks for --dropout 0.3"),
        (
            ["--input-dropout", "0.2"],
            "with --input-dropout 0.0, this run asks for --input-dropout 0.2",
        ),
    ]:
        capsys.readouterr()
        assert ensemble.main([*argv, *flags]) == 2
        err = capsys.readouterr().err
        assert asked in err and "add --retrain" in err and err.count("\n") == 1, err
        assert {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()} == before

    # NIN's own rate is the article's: asking for it is the same recipe, also in a
    # record written before --dropout and --input-dropout existed.
    for written_before in (False, True):
        if written_before:
            record = json.loads((weights / "nin_cnn.best.json").read_text())
            del record["recipe"]["dropout"], record["recipe"]["input_dropout"]
            (weights / "nin_cnn.best.json").write_text(json.dumps(record))
        assert ensemble.main([*argv, "--dropout", "0.5", "--input-dropout", "0"]) == 0
        assert "nin_cnn is already trained" in capsys.readouterr().out
        assert ensemble.main([*argv, "--dropout", "0.3"]) == 2
        assert "--dropout 0.5, this run asks for --dropout 0.3" in capsys.readouterr().err
        assert ensemble.main([*argv, "--input-dropout", "0.2"]) == 2
        assert "--input-dropout 0.0, this run asks for --input-dropout 0.2" in (
            capsys.readouterr().err
        )

    # --eval-only scores them as they are, and results.json says how they were trained.
    assert ensemble.main([*argv, "--eval-only", "--learning-rate", "0.0001"]) == 0
    results = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert results["trained_with"]["nin_cnn"]["learning_rate"] == 0.001
    assert ensemble.main([*argv, "--learning-rate", "0.0001", "--retrain"]) == 0
    record = json.loads((weights / "nin_cnn.best.json").read_text())
    assert record["recipe"]["learning_rate"] == 0.0001
    assert not checkpoints.recipe_file("nin_cnn", settings_for(tmp_path)).exists()


@pytest.mark.parametrize("how", ["plain", "joint"])
def test_an_interrupted_member_resumes_only_with_the_flags_it_started_with(tmp_path, how):
    settings = dataclasses.replace(settings_for(tmp_path), models=["nin_cnn"], epochs=20)
    checkpoints.prepare_member("nin_cnn", settings)  # a fresh start records its recipe
    if how == "plain":
        folder = checkpoints.backup_dir("nin_cnn", settings)
        folder.mkdir(parents=True)
    else:
        folder = checkpoints.joint_backup_dir(settings)
        folder.mkdir(parents=True)
        (folder / checkpoints.JOINT_MEMBERS).write_text(json.dumps({"members": ["nin_cnn"]}))
    (folder / checkpoints.BACKUP_METADATA).write_text(json.dumps({"epoch": 3, "batch": 0}))
    assert checkpoints.recipe_conflict("nin_cnn", settings) is None
    expected = r"interrupted run of nin_cnn .*\(3 epochs done\) started with --epochs 20"
    with pytest.raises(checkpoints.UsageError, match=expected):
        checks.check_settings(dataclasses.replace(settings, epochs=5))
    checks.check_settings(dataclasses.replace(settings, epochs=5, retrain=True))
