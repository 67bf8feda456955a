"""A member whose loss turns NaN, two runs on one weights folder, folders we cannot write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_tree
from PIL import Image

import ensemble
from ensembling.cli import combine, options, predict
from models import nin_cnn


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "tree")


def cli(tmp_path, *flags):
    return ensemble.main(
        ["--data-dir", str(tmp_path / "tree"), "--weights-dir", str(tmp_path / "weights"),
         "--logs-dir", str(tmp_path / "logs"), "--no-cost", "--epochs", "1", *flags]
    )  # fmt: skip


@pytest.mark.parametrize("joint", [False, True], ids=["one fit per member", "--joint"])
def test_a_member_whose_loss_becomes_nan_stops_and_the_others_go_on(
    tmp_path, tree, capsys, monkeypatch, joint
):
    def poisoned_nin(model_input):
        model = nin_cnn(model_input)
        # The 10-class map has no ReLU after it (a ReLU would turn NaN into 0).
        scores = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-1]
        scores.bias.assign(np.full(scores.bias.shape, np.nan, "float32"))
        return model

    monkeypatch.setitem(ensemble.MODELS, "nin_cnn", poisoned_nin)
    flags = ["--joint", "--epochs", "2"] if joint else []
    assert cli(tmp_path, "--models", "all_cnn", "nin_cnn", *flags) == 0
    out = capsys.readouterr().out
    assert "nin_cnn stopped: its loss became NaN in epoch 1; the other members go on" in out
    assert "nin_cnn is left out of the ensembles" in out
    results = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert [row["row"] for row in results["results"]] == ["ALL-CNN-C"]
    assert "nin_cnn" in results["failed"]
    if joint:  # the healthy member trained every epoch; the NaN one was dropped after one
        assert (tmp_path / "logs" / "all_cnn.csv").read_text().count("\n") == 3
        assert (tmp_path / "logs" / "nin_cnn.csv").read_text().count("\n") == 2


def test_a_second_run_on_a_member_in_training_fails_fast_naming_the_first(tmp_path, tree, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    holder = {"pid": os.getpid(), "host": os.uname().nodename, "since": "Thu 10:00",
              "command": "python ensemble.py --models nin_cnn"}  # fmt: skip
    (weights / ".nin_cnn.lock").write_text(json.dumps(holder))
    assert cli(tmp_path, "--models", "nin_cnn") == 2
    err = capsys.readouterr().err
    assert f"nin_cnn is being trained into {weights} by another run (pid {os.getpid()}" in err
    assert err.count("\n") == 1 and "delete" not in err  # on this machine: it is alive
    assert (weights / ".nin_cnn.lock").is_file()  # the other run's lock is left alone
    # A different member in the same folder goes ahead (one member per GPU).
    assert cli(tmp_path, "--models", "all_cnn") == 0
    assert not (weights / ".all_cnn.lock").exists()  # released on exit


def test_a_lock_from_another_machine_says_how_to_clear_it_if_that_run_died(tmp_path, tree, capsys):
    # A shared folder on a cluster: whether a run on another node lives cannot be
    # checked from here, so it counts as alive, and the line says what to do if not.
    weights = tmp_path / "weights"
    weights.mkdir()
    holder = {"pid": 4242, "host": "node-that-died", "since": "Thu 10:00", "command": "-"}
    (weights / ".nin_cnn.lock").write_text(json.dumps(holder))
    assert cli(tmp_path, "--models", "nin_cnn") == 2
    err = capsys.readouterr().err
    assert "by another run (pid 4242 on node-that-died since Thu 10:00" in err
    assert f"or if that run is no longer running there, delete {weights / '.nin_cnn.lock'}" in err
    assert err.count("\n") == 1 and (weights / ".nin_cnn.lock").is_file()


def test_where_processes_cannot_be_checked_a_lock_is_kept_and_never_signalled(
    tmp_path, tree, capsys, monkeypatch
):
    # On Windows os.kill(pid, 0) would not ask whether the run lives: it would kill it.
    from ensembling import checkpoints

    monkeypatch.setattr(checkpoints, "PIDS_CHECKABLE", False)
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail(f"os.kill{args}"))
    weights = tmp_path / "weights"
    weights.mkdir()
    holder = {"pid": 4242, "host": os.uname().nodename, "since": "-", "command": "-"}
    (weights / ".nin_cnn.lock").write_text(json.dumps(holder))
    assert cli(tmp_path, "--models", "nin_cnn") == 2
    err = capsys.readouterr().err
    assert f"or if that run is no longer running there, delete {weights / '.nin_cnn.lock'}" in err
    assert (weights / ".nin_cnn.lock").is_file()


def test_eval_only_says_which_members_are_not_fully_trained(tmp_path, tree, capsys):
    assert cli(tmp_path, "--models", "nin_cnn", "all_cnn") == 0
    assert "not fully trained" not in capsys.readouterr().out
    results = tmp_path / "logs" / "results.json"
    assert json.loads(results.read_text())["not_fully_trained"] == {}
    weights = tmp_path / "weights"
    # One member still in training in another run, the other stopped half way.
    holder = {"pid": os.getpid(), "host": os.uname().nodename, "since": "-", "command": "-"}
    (weights / ".nin_cnn.lock").write_text(json.dumps(holder))
    (weights / "backup" / "all_cnn").mkdir(parents=True)
    assert cli(tmp_path, "--models", "nin_cnn", "all_cnn", "--eval-only") == 0
    out = capsys.readouterr().out
    assert (f"note: nin_cnn is not fully trained: another run is training it (pid "
            f"{os.getpid()} on {os.uname().nodename}); scoring its best checkpoint so far, "
            "nin_cnn.01-") in out  # fmt: skip
    assert "note: all_cnn is not fully trained: its training was stopped before its last" in out
    assert set(json.loads(results.read_text())["not_fully_trained"]) == {"nin_cnn", "all_cnn"}


def test_a_stale_lock_is_taken_over(tmp_path, tree, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)  # fmt: skip
    weights = tmp_path / "weights"
    weights.mkdir()
    holder = {"pid": int(finished.stdout), "host": os.uname().nodename, "since": "-",
              "command": "-"}  # fmt: skip
    (weights / ".nin_cnn.lock").write_text(json.dumps(holder))
    assert cli(tmp_path, "--models", "nin_cnn") == 0
    assert "removing stale lock" in capsys.readouterr().out
    assert not (weights / ".nin_cnn.lock").exists()


def test_a_full_disk_while_saving_is_one_line_exit_2_and_loses_nothing(
    tmp_path, tree, capsys, monkeypatch
):
    import errno

    import keras

    def no_space(self, filepath, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(keras.Model, "save_weights", no_space)
    assert cli(tmp_path, "--models", "nin_cnn") == 2
    err = capsys.readouterr().err
    assert "No space left on device writing" in err and "run the same command again" in err
    assert err.count("\n") == 1
    assert not list((tmp_path / "weights").glob("nin_cnn.*.weights.h5"))  # no half checkpoint
    assert not (tmp_path / "weights" / ".nin_cnn.lock").exists()


def test_a_full_disk_while_writing_the_results_keeps_the_last_ones_whole(
    tmp_path, tree, capsys, monkeypatch
):
    import errno
    import pathlib

    assert cli(tmp_path, "--models", "nin_cnn") == 0
    results = tmp_path / "logs" / "results.json"
    before = results.read_text()
    write_text = pathlib.Path.write_text

    def half_then_no_space(self, text, *args, **kwargs):
        if "results" in self.name:
            write_text(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_no_space)
    assert cli(tmp_path, "--models", "nin_cnn", "--eval-only", "--tta") == 2
    assert "No space left on device writing" in capsys.readouterr().err
    assert results.read_text() == before  # the last run's, whole
    assert sorted(p.name for p in results.parent.glob("results*")) == ["results.json", "results.md"]


def test_a_full_disk_while_plotting_is_one_line_exit_2_and_keeps_the_last_plots(
    tmp_path, tree, capsys, monkeypatch
):
    import errno

    import matplotlib.figure

    assert cli(tmp_path, "--models", "nin_cnn") == 0
    plots = sorted((tmp_path / "logs").glob("*.png"))
    assert [p.name for p in plots] == ["nin_cnn_curves.png", "test_errors.png"]
    before = {p: p.read_bytes() for p in plots}
    savefig = matplotlib.figure.Figure.savefig

    def half_then_no_space(self, path, *args, **kwargs):
        savefig(self, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_no_space)
    capsys.readouterr()
    assert cli(tmp_path, "--models", "nin_cnn", "--eval-only", "--tta") == 2
    out, err = capsys.readouterr()
    assert "results saved to" in out  # before the plots, and whole
    assert err.count("\n") == 1 and "No space left on device writing" in err
    assert "--eval-only with the same --weights-dir draws the plots again" in err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "logs").glob("*.png*"))} == before


def test_without_matplotlib_the_run_ends_well_and_says_how_to_draw_the_plots(
    tmp_path, tree, capsys, monkeypatch
):
    # pip install keras jax, without requirements.txt: only the plots need matplotlib.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now fails
    assert cli(tmp_path, "--models", "nin_cnn") == 0
    out = capsys.readouterr().out
    assert "results saved to" in out and "plots skipped: matplotlib is not installed" in out
    assert not list((tmp_path / "logs").glob("*.png"))


def test_a_weights_dir_that_is_a_file_is_refused(tmp_path, tree, capsys):
    (tmp_path / "weights").write_text("not a folder")
    assert cli(tmp_path) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "weights").read_text() == "not a folder"


# Runs the rest of its arguments as a Python program without root's file privilege
# (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave the bounding set, so the program
# exec'd next never has them): file permissions then bind root too. Done in a
# wrapper process rather than a preexec_fn, which would fork a multithreaded JAX.
WITHOUT_ROOT_PRIVILEGE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(f"prctl(PR_CAPBSET_DROP) refused: errno {ctypes.get_errno()}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("flag", ["--weights-dir", "--logs-dir"])
def test_a_folder_without_write_permission_is_refused_before_training(tmp_path, tree, flag):
    # A real read-only folder, seen by a real process. Root ignores permissions, so
    # under root (CI, containers) the process first gives up that privilege.
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("untouched")
    locked.chmod(0o500)
    wrapper = (
        [sys.executable, "-c", WITHOUT_ROOT_PRIVILEGE] if os.geteuid() == 0 else [sys.executable]
    )
    command = [*wrapper, "ensemble.py", "--data-dir", str(tree), "--epochs", "1",
               "--weights-dir", str(tmp_path / "weights"), "--logs-dir", str(tmp_path / "logs"),
               flag, str(locked)]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
    finally:
        locked.chmod(0o700)
    if "PR_CAPBSET_DROP) refused" in result.stderr:
        pytest.skip(f"cannot drop root's file privilege here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "ensemble.py: error" in line]
    assert error_lines == [
        f"ensemble.py: error: {flag} {locked} is not writable; choose another folder"
    ]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in locked.iterdir()) == ["keep.txt"]
    assert (locked / "keep.txt").read_text() == "untouched"


@pytest.mark.parametrize(
    "backend, broken, message",
    [
        ("nosuch", None, "Keras cannot load KERAS_BACKEND=nosuch: Unable to import backend"),
        ("jax", "jax", "Keras cannot load KERAS_BACKEND=jax: import of jax halted"),
        # pip install keras jax, then python ensemble.py without KERAS_BACKEND=jax.
        (
            None,
            "tensorflow",
            "Keras cannot load its default backend (KERAS_BACKEND is unset: "
            "tensorflow, or what keras.json names): No module named",
        ),
    ],
    ids=["unknown backend", "backend not installed", "default backend not installed"],
)
def test_a_backend_keras_cannot_load_is_one_line_exit_2(tmp_path, backend, broken, message):
    # As the program, not a module: a test importing ensemble still gets Keras' error.
    code = (
        "import runpy, sys\n"
        f"sys.modules[{broken!r}] = None  # a backend package that is not installed\n"
        f"sys.argv = ['ensemble.py', '--epochs', '1']\n"
        f"runpy.run_path({str(Path(ensemble.__file__))!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "KERAS_BACKEND": backend or ""}
    if backend is None:  # unset, and no keras.json to name another: tensorflow
        del env["KERAS_BACKEND"]
        env["KERAS_HOME"] = str(tmp_path.parent / f"{tmp_path.name}-keras-home")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert shown.returncode == 2, shown.stderr[-500:]
    assert "Traceback" not in shown.stderr
    last = shown.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ensemble.py: error: {message}"), last
    assert last.endswith("set KERAS_BACKEND to tensorflow, jax or torch, one that is installed "
                         "(docs/gpu.md)")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no weights/ or logs/ made


def test_keras_numpy_backend_refuses_training_and_still_combines(tmp_path, tree):
    # Keras' numpy backend only predicts: its fit raises NotImplementedError.
    pytest.importorskip(
        "scipy",
        reason="Keras' numpy backend needs scipy, which JAX brings (requirements-test.txt); "
        "requirements.txt alone does not",
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    (tmp_path / "mine").mkdir()
    paths = [str(tmp_path / "mine" / f"{seed}.keras") for seed in (1, 2)]
    for path in paths:
        nin_cnn(keras.Input((32, 32, 3))).save(path)
    base = [sys.executable, str(Path(ensemble.__file__)), "--data-dir", str(tree)]
    logs = ["--logs-dir", str(tmp_path / "logs")]

    def run(*args):
        return subprocess.run([*args], capture_output=True, text=True, env=env, timeout=600)

    train = run(*base, "--weights-dir", str(tmp_path / "weights"), *logs, "--epochs", "1")
    assert train.returncode == 2, train.stderr[-500:]
    assert train.stderr.strip().splitlines()[-1] == (
        "ensemble.py: error: KERAS_BACKEND=numpy cannot train (Keras' numpy backend only "
        "predicts); set KERAS_BACKEND to tensorflow, jax or torch, or score trained "
        "checkpoints with --eval-only"
    )
    assert not (tmp_path / "weights").exists() and not (tmp_path / "logs").exists()
    combined = run(base[0], base[1], "combine", *paths, *base[2:], *logs)
    assert combined.returncode == 0, combined.stderr[-500:]
    saved = json.loads((tmp_path / "logs" / "combine.json").read_text())["environment"]
    assert saved["backend"] == "numpy" and saved["devices"] == ["cpu:0"]


def test_a_tilde_after_a_flags_equals_sign_means_home(tmp_path, monkeypatch, capsys):
    # The shell expands ~ only at a word's start: "--weights-dir=~/w" arrives as typed,
    # and would make a folder named ~ in the current one, which invites "rm -rf ~".
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    flags = ["data-dir", "weights-dir", "logs-dir", "export", "export-members"]
    settings = options.parse_args([f"--{flag}=~/{flag}" for flag in flags])
    for flag in flags:
        assert getattr(settings, flag.replace("-", "_")) == str(home / flag)
    args = combine.parse_args(["~/a.keras", "~/b.keras", "--data-dir=~/d", "--logs-dir=~/l",
                               "--export=~/e.keras"])  # fmt: skip
    assert args.models == [str(home / "a.keras"), str(home / "b.keras")]
    assert (args.data_dir, args.logs_dir, args.export) == tuple(
        str(home / name) for name in ("d", "l", "e.keras")
    )
    home.mkdir()
    nin_cnn(keras.Input((32, 32, 3))).save(home / "nin.keras")
    Image.new("RGB", (32, 32), (90, 20, 200)).save(home / "cat.png")
    assert predict.main(["--model=~/nin.keras", "~/cat.png"]) == 0
    assert capsys.readouterr().out.startswith(f"{home / 'cat.png'}: ")
    assert not (tmp_path / "~").exists()
