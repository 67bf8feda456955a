"""--parallel: one process per member, each training as a one-member run would."""

import csv
import dataclasses
import errno
import json
import signal
import subprocess
import tempfile
from pathlib import Path

import keras
import pytest
from conftest import signal_this_process_when, write_tree

import data
import ensemble
from ensembling import checkpoints, parallel
from ensembling.cli import checks, options
from ensembling.settings import Settings, settings_argv, settings_from


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--preset", "fast", "--epochs", "2", "--no-augment", "--dropout", "0.5", "--ema",
         "--input-dropout", "0.2"],
        ["--models", "nin_cnn", "all_cnn", "--limit", "100", "--learning-rate", "1e-4",
         "--no-cost", "--joint", "--retrain", "--data-dir", "a folder/with spaces",
         "--combine", "vote", "stack", "--seed", "7", "--validation-split", "0.25"],
        ["--preset", "fast", "--no-tta", "--precision", "float32", "--label-smoothing", "0",
         "--schedule", "constant", "--warmup-epochs", "0", "--restarts", "0",
         "--export", "x.keras", "--export-rule", "stack", "--parallel", "--train-only"],
    ],
)  # fmt: skip
def test_settings_argv_parses_back_to_the_same_settings(argv):
    settings = options.parse_args(argv)
    assert options.parse_args(settings_argv(settings)) == settings


@pytest.mark.parametrize("preset", ["article", "fast"])
def test_settings_argv_spells_every_boolean_flag_both_ways(preset):
    # NEGATABLE lists the --flag/--no-flag pairs by hand; a flag missing from
    # it (or listed wrongly) fails here, whichever way its preset sets it.
    base = settings_from({"preset": preset})
    for field in dataclasses.fields(Settings):
        if isinstance(getattr(base, field.name), bool):
            flipped = dataclasses.replace(base, **{field.name: not getattr(base, field.name)})
            assert options.parse_args(settings_argv(flipped)) == flipped, field.name


def test_each_member_process_takes_its_command_line_whatever_the_run_exports(tmp_path, monkeypatch):
    # Exports are the main process's, after training; a member process trains only.
    monkeypatch.chdir(tmp_path)
    settings = options.parse_args(["--parallel", "--export", "e.keras", "--export-rule", "stack",
                                  "--export-members", "members", "--epochs", "3"])  # fmt: skip
    for name in settings.models:
        member = options.parse_args(parallel.command(name, settings)[2:])
        checks.check_settings(member)  # raised UsageError for --export with --train-only
        assert member.models == (name,) and member.train_only and member.epochs == 3
        assert member.export is None and member.export_members is None


def test_each_process_gets_a_gpu_in_turn(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [parallel.gpu_for(i, 2) for i in range(3)] == ["0", "1", "0"]
    assert parallel.gpu_for(0, 0) is None  # the CPU: nothing to choose
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the ids this process sees as 0, 1
    assert [parallel.gpu_for(i, 2) for i in range(3)] == ["3", "5", "3"]


def argv_for(tmp_path, epochs, *extra):
    return [
        "--data-dir", str(tmp_path / "tree"), "--models", "nin_cnn", "all_cnn",
        "--epochs", str(epochs), "--batch-size", "16", "--no-cost",
        "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l"), *extra,
    ]  # fmt: skip


def losses(logs, name):
    rows = csv.DictReader((Path(logs) / f"{name}.csv").read_text().splitlines())
    return [float(row["loss"]) for row in rows]


def test_parallel_trains_each_member_in_its_own_process_as_a_one_member_run(
    tmp_path, capsys, monkeypatch
):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert ensemble.main(argv_for(tmp_path, 2, "--parallel")) == 0
    out = capsys.readouterr().out
    for name in ("nin_cnn", "all_cnn"):
        assert f"training {name} in its own process" in out
        assert f"[{name}] training {name} (" in out  # relayed from its process
        assert f"[{name}] data: {tmp_path / 'tree'} (decoded by the --parallel" in out
        assert f"[{name}] trained {name} in " in out
    assert "--eval-only with the same" not in out  # the main process ensembles them
    assert not list((tmp_path / "tmp").iterdir())  # the handed-over data is gone
    results = json.loads((tmp_path / "l" / "results.json").read_text())
    assert set(results["train_seconds"]) == {"nin_cnn", "all_cnn"}
    assert results["attempts"] == {"nin_cnn": 1, "all_cnn": 1}
    assert [row["row"] for row in results["results"]] == ["ALL-CNN-C", "NIN", "pair C"]
    assert not list((tmp_path / "w").glob(".*.lock"))

    # NIN trained exactly as `--models nin_cnn` trains it on its own: the same weights,
    # batches and dropout masks.
    alone = tmp_path / "alone"
    flags = ["--data-dir", str(tmp_path / "tree"), "--models", "nin_cnn", "--epochs", "2",
             "--batch-size", "16", "--no-cost", "--weights-dir", str(alone / "w"),
             "--logs-dir", str(alone / "l")]  # fmt: skip
    assert ensemble.main(flags) == 0
    expected = losses(alone / "l", "nin_cnn")
    if keras.backend.backend() == "torch":  # its CPU kernels round differently each run
        assert losses(tmp_path / "l", "nin_cnn") == pytest.approx(expected, rel=1e-5)
    else:
        assert losses(tmp_path / "l", "nin_cnn") == expected


def test_a_member_process_decodes_the_data_itself_without_the_parents(tmp_path, monkeypatch):
    settings = options.parse_args(["--data-dir", "a", "--limit", "20"])
    assert parallel.handed_data(settings) is None  # not a member process
    monkeypatch.setenv(parallel.DATA_FILE, str(tmp_path / "gone.npz"))
    assert parallel.handed_data(settings) is None  # a stale variable
    image_tree = write_tree(tmp_path / "tree")
    arrays = data.load_data(image_tree, limit=20)
    with parallel.handing_over(arrays, settings) as handover:
        monkeypatch.setenv(parallel.DATA_FILE, handover[parallel.DATA_FILE])
        assert parallel.handed_data(settings)[0][0].shape == (20, 32, 32, 3)
        other = dataclasses.replace(settings, seed=1)  # another selection of the images
        assert parallel.handed_data(other) is None
    assert not Path(handover[parallel.DATA_FILE]).exists()


def test_a_full_temporary_folder_leaves_the_decoding_to_each_process(monkeypatch, capsys):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "save_decoded", full)
    with parallel.handing_over(None, Settings()) as handover:
        assert handover == {parallel.DATA_FILE: ""}
        monkeypatch.setenv(parallel.DATA_FILE, "")
        assert parallel.member_process() and parallel.handed_data(Settings()) is None
    assert "(No space left on device): each member's process decodes it" in capsys.readouterr().out


def test_a_failed_member_process_is_one_line_and_exit_1(tmp_path, capsys):
    # Another run holds NIN's lock: its process refuses, ALL-CNN-C's trains on.
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    (tmp_path / "w").mkdir()
    with checkpoints.MemberLocks(tmp_path / "w", ["nin_cnn"]):
        assert ensemble.main(argv_for(tmp_path, 1, "--parallel")) == 1
    captured = capsys.readouterr()
    assert "[nin_cnn] ensemble.py: error: nin_cnn is being trained" in captured.out
    err = captured.err.strip().splitlines()
    assert err == [
        "ensemble.py: error: training failed for nin_cnn (exit code 2): its lines above say "
        "why; fix that and run the same command again (finished members are kept)"
    ]
    assert (tmp_path / "w" / "all_cnn.best.json").is_file()
    assert not (tmp_path / "l" / "results.json").exists()


def test_train_only_trains_and_leaves_evaluation_to_eval_only(tmp_path, capsys):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    assert ensemble.main(argv_for(tmp_path, 1, "--train-only")) == 0
    assert "--eval-only with the same --weights-dir ensembles them" in capsys.readouterr().out
    assert not (tmp_path / "l" / "results.json").exists()
    assert ensemble.main(argv_for(tmp_path, 1, "--eval-only")) == 0
    assert (tmp_path / "l" / "results.json").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_reaches_every_process_and_the_same_command_resumes(tmp_path, capsys, sig):
    write_tree(tmp_path / "tree", train_per_class=8, test_per_class=2)
    # After an epoch of ALL-CNN-C comes the stop, with 4 more to go (4 s or more).
    epochs = 5
    argv = argv_for(tmp_path, epochs, "--parallel")
    backups = [tmp_path / "w" / "backup" / name / "training_metadata.json"
               for name in ("nin_cnn", "all_cnn")]  # fmt: skip
    nin_done = tmp_path / "w" / "nin_cnn.best.json"

    # The main process is this one, stopped once both member processes are past an
    # epoch (NIN, much the faster, may be done already); it stops them in turn.
    def past_an_epoch():
        return backups[1].is_file() and (backups[0].is_file() or nin_done.is_file())

    with signal_this_process_when(past_an_epoch, sig):
        code = ensemble.main(argv)
    out, err = capsys.readouterr()
    assert code == 128 + sig, err[-3000:]  # 130 for Ctrl-C, 143 for SIGTERM
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert err.strip().splitlines()[-1].startswith(f"ensemble.py: {said}; run the same")
    both = out + err
    assert "Traceback" not in both, both[both.find("Traceback") - 500 :][:4000]
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "w") not in left  # no member process outlived it
    assert not list((tmp_path / "w").glob(".*.lock"))
    if sig == signal.SIGTERM:
        return  # the same stop inside: resuming after it is the Ctrl-C case's

    # The same command again, in this process: only the stop needed one of its own.
    code = ensemble.main(argv)
    again = capsys.readouterr()
    assert code == 0, again.out[-4000:] + again.err[-1000:]
    # NIN, much the faster, may have finished just before the stop; ALL-CNN-C cannot.
    assert "resuming all_cnn after epoch" in again.out, out + "\n=====\n" + again.out
    assert "resuming nin_cnn after epoch" in again.out or "nin_cnn is already" in again.out
    for name in ("nin_cnn", "all_cnn"):
        rows = csv.DictReader((tmp_path / "l" / f"{name}.csv").read_text().splitlines())
        assert [int(row["epoch"]) for row in rows] == list(range(epochs))  # no gap, no repeat
