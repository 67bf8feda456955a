"""The article's pipeline end to end on tiny synthetic data, and the CLI's promises."""

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_tree

import data
import ensemble
from ensembling import backend, checkpoints, report, training
from ensembling.cli import options
from ensembling.rows import ARTICLE_ROWS
from models import MODELS, all_cnn, nin_cnn

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = re.compile(r"^(conv_pool_cnn|all_cnn|nin_cnn)\.\d\d-\d+\.\d\d\.weights\.h5$")


def cli(tmp_path, *flags):
    """Runs main() in-process on the synthetic tree with private folders."""
    base = [
        "--data-dir",
        str(tmp_path / "tree"),
        "--weights-dir",
        str(tmp_path / "weights"),
        "--logs-dir",
        str(tmp_path / "logs"),
    ]
    return ensemble.main([*base, *flags])


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)


RULES = ["weighted", "select", "vote", "stack", "temperature"]


@pytest.fixture(scope="module")
def article_run(tmp_path_factory):
    """One run of the article's recipe for 1 epoch with every rule and an export: its
    folder and what it printed. The tests below read it; none of them changes it."""
    root = tmp_path_factory.mktemp("article")
    write_tree(root / "tree", train_per_class=4, test_per_class=3)
    flags = ["--epochs", "1", "--combine", *RULES, "--export", str(root / "ensemble.keras"),
             "--export-rule", "stack"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli(root, *flags) == 0
    return root, out.getvalue()


@pytest.mark.xdist_group("article_run")  # one worker: it trains once
def test_full_pipeline_on_tiny_data(article_run, tmp_path):
    root, out = article_run
    tree = root / "tree"
    assert f"on {keras.backend.backend()}, devices: " in out.splitlines()[1]
    assert ("no GPU found: training runs on the CPU" in out) != backend.has_accelerator()

    weights = sorted(p.name for p in (root / "weights").glob("*.weights.h5"))
    assert len(weights) == 3 and all(CHECKPOINT_NAME.match(name) for name in weights)
    logs = root / "logs"
    assert all((logs / f"{name}.csv").is_file() for name in MODELS)
    if training.tensorboard_available():
        assert all(list((logs / name).rglob("events.out.tfevents.*")) for name in MODELS)
    else:
        assert "TensorBoard needs tensorflow and tensorboard" in out

    results = json.loads((logs / "results.json").read_text())
    assert results["settings"]["epochs"] == 1 and results["settings"]["batch_size"] == 32
    rows = [row for row in results["results"] if row["rule"] == "average"]
    assert [row["row"] for row in rows] == [row for row, _ in ARTICLE_ROWS]
    assert all(0.0 <= row["test_error"] <= 1.0 for row in rows)
    assert results["attempts"] == {name: 1 for name in MODELS}

    table = out[out.index("model or ensemble") :].splitlines()
    assert len(table) >= 2 + 7
    body = table[2:9]
    assert [line.split("  ")[0].strip() for line in body] == [r["row"] for r in rows]
    assert len({len(line) for line in table[:9]}) == 1  # aligned columns

    # The full table in Markdown, the plots, and the cost of members and ensembles.
    markdown = (logs / "results.md").read_text()
    assert "| ensemble of three |" in markdown
    # Each class's test error for each member and the ensemble of three, which the
    # overall errors weigh by the class's images.
    per_class = results["per_class_errors"]
    assert per_class["classes"] == list(data.CLASS_NAMES)
    assert list(per_class)[1:] == ["ConvPool-CNN-C", "ALL-CNN-C", "NIN", "ensemble of three"]
    _, (_, y_test) = data.load_data(tree)
    counts = np.bincount(y_test[:, 0], minlength=10)
    for row in rows[:4]:
        overall = np.dot(per_class[row["row"]], counts) / counts.sum()
        assert overall == pytest.approx(row["test_error"])
    assert "| class | ConvPool-CNN-C | ALL-CNN-C | NIN | ensemble of three |" in markdown
    assert "| airplane | " in markdown
    for png in [logs / f"{name}_curves.png" for name in MODELS] + [logs / "test_errors.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    costs = results["costs"]
    assert costs["nin_cnn"]["parameters"] == 109_674
    assert costs["conv_pool_cnn+all_cnn+nin_cnn"]["parameters"] == 2 * 1_369_738 + 109_674
    assert all(c["latency_ms"] > 0 and c["images_per_second"] > 0 for c in costs.values())
    assert "every combination" in out and "ms/image @1" in out

    # --eval-only reloads the same best checkpoints and reproduces the table; it trains
    # nothing, so a batch larger than the training split only sets the predict batch.
    # (Its own logs folder: the run's stays as the other tests read it.)
    folders = ["--weights-dir", str(root / "weights"), "--logs-dir", str(tmp_path / "logs")]
    flags = ["--eval-only", "--no-cost", "--batch-size", "5000"]
    assert ensemble.main(["--data-dir", str(tree), *folders, *flags]) == 0
    again = json.loads((tmp_path / "logs" / "results.json").read_text())["results"]
    assert [r["test_error"] for r in again] == [r["test_error"] for r in rows]


def test_reloaded_best_weights_reproduce_the_trained_model(tmp_path, tree):
    (x_train, y_train), (x_test, _) = data.load_data(tree)
    settings = ensemble.Settings(
        weights_dir=str(tmp_path / "weights"), logs_dir=str(tmp_path / "logs")
    )
    for folder in (settings.weights_dir, settings.logs_dir):
        Path(folder).mkdir()
    model_input = keras.Input(shape=(32, 32, 3))
    trained = nin_cnn(model_input)
    history = ensemble.compile_and_train(trained, 1, x_train, y_train, settings)
    record = json.loads((tmp_path / "weights" / "nin_cnn.best.json").read_text())
    assert record["loss"] == pytest.approx(history.history["loss"][0])

    path = checkpoints.best_checkpoint(settings.weights_dir, "nin_cnn")
    reloaded = nin_cnn(keras.Input(shape=(32, 32, 3)))
    reloaded.load_weights(str(path))
    np.testing.assert_allclose(
        reloaded.predict(x_test, verbose=0), trained.predict(x_test, verbose=0), atol=1e-6
    )


def kill(model):
    """Silences the last ReLU layer, as dying ReLUs do: one output for every image."""
    last_relu = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-2]
    last_relu.kernel.assign(np.zeros(last_relu.kernel.shape, "float32"))
    last_relu.bias.assign(-np.ones(last_relu.bias.shape, "float32"))


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_dead_member_is_restarted_from_fresh_weights(tmp_path, tree, capsys, restarts):
    (x_train, y_train), _ = data.load_data(tree)
    settings = ensemble.Settings(
        weights_dir=str(tmp_path / "weights"), logs_dir=str(tmp_path / "logs"), restarts=restarts
    )
    for folder in (settings.weights_dir, settings.logs_dir):
        Path(folder).mkdir()
    model = nin_cnn(keras.Input(shape=(32, 32, 3)))
    kill(model)
    history = ensemble.compile_and_train(model, 2, x_train, y_train, settings)
    out = capsys.readouterr().out
    assert "nin_cnn died in epoch 1" in out
    record = json.loads((tmp_path / "weights" / "nin_cnn.best.json").read_text())
    outputs = model.predict(x_train, verbose=0)
    if restarts:
        assert history.attempts == record["attempts"] == 2
        assert len(history.history["loss"]) == 2  # the full epochs, after the restart
        assert np.std(outputs, axis=0).max() > training.DEAD_OUTPUT_STD  # alive again
    else:
        assert history.attempts == 1 and "no restarts left" in out
        assert len(history.history["loss"]) == 1  # stopped: a dead network cannot recover
        assert np.std(outputs, axis=0).max() < training.DEAD_OUTPUT_STD


def test_reinitialize_draws_new_weights_from_the_same_distribution():
    model = nin_cnn(keras.Input(shape=(32, 32, 3)))
    first = [w.copy() for w in model.get_weights()]
    training.reinitialize(model, seed=[0, 1])
    second = model.get_weights()
    training.reinitialize(model, seed=[0, 2])
    third = model.get_weights()
    kernel = 0  # the first convolution's kernel; biases start at zero every time
    assert not np.allclose(first[kernel], second[kernel])
    assert not np.allclose(second[kernel], third[kernel])
    assert np.std(second[kernel]) == pytest.approx(np.std(first[kernel]), rel=0.1)
    np.testing.assert_array_equal(second[1], 0.0)


def test_a_live_member_is_trained_once(tmp_path, tree):
    (x_train, y_train), _ = data.load_data(tree)
    settings = ensemble.Settings(weights_dir=str(tmp_path), logs_dir=str(tmp_path))
    history = ensemble.compile_and_train(
        nin_cnn(keras.Input(shape=(32, 32, 3))), 2, x_train, y_train, settings
    )
    assert history.attempts == 1 and len(history.history["loss"]) == 2


def test_best_checkpoint_uses_the_recorded_loss_not_the_file_names(tmp_path):
    for name in ("nin_cnn.03-0.90.weights.h5", "nin_cnn.10-0.12.weights.h5"):
        (tmp_path / name).write_bytes(b"")
    # Without a record, the lowest loss in the names wins (not the last in sort order).
    (tmp_path / "nin_cnn.09-0.50.weights.h5").write_bytes(b"")
    assert checkpoints.best_checkpoint(tmp_path, "nin_cnn").name == "nin_cnn.10-0.12.weights.h5"
    # Equal rounded losses: the later epoch was written because it improved.
    (tmp_path / "nin_cnn.11-0.12.weights.h5").write_bytes(b"")
    assert checkpoints.best_checkpoint(tmp_path, "nin_cnn").name == "nin_cnn.11-0.12.weights.h5"
    # The record written after training decides when present.
    record = {"file": "nin_cnn.03-0.90.weights.h5", "epoch": 3, "loss": 0.9}
    (tmp_path / "nin_cnn.best.json").write_text(json.dumps(record))
    assert checkpoints.best_checkpoint(tmp_path, "nin_cnn").name == "nin_cnn.03-0.90.weights.h5"
    assert checkpoints.best_checkpoint(tmp_path, "all_cnn") is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--models", "resnet"], "unknown model 'resnet'"),
        (["--models", "NIN"], "unknown model 'NIN' (nin_cnn is NIN); choose from conv_pool_cnn,"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--validation-split", "1.5"], "--validation-split must lie strictly between 0 and 1"),
        (["--validation-split", "0"], "--validation-split must lie strictly between 0 and 1"),
        (["--batch-size", "5000"], "--batch-size 5000 exceeds the 32 training images"),
        # No image left to train on: a smaller batch would not help.
        (["--validation-split", "0.99", "--limit", "30"], "0.99 of 30 images leaves none to"),
        (["--eval-only"], "does not exist; train first"),
        (["--limit", "0"], "--limit must be a positive number"),
        (["--restarts", "-1"], "--restarts must be 0 or more"),
        (["--seed", "-1"], "--seed must lie between 0 and 4294967295"),
        (["--seed", str(2**32)], "--seed must lie between 0 and 4294967295"),
        (["--learning-rate", "0"], "--learning-rate must be a positive finite number"),
        (["--learning-rate", "inf"], "--learning-rate must be a positive finite number"),
        (["--learning-rate", "nan"], "--learning-rate must be a positive finite number"),
        (["--export", "ensemble.h5"], "must end in .keras"),
        # Flags that would otherwise be ignored without a word.
        (["--export-rule", "stack"], "add --export PATH.keras"),
        (["--eval-only", "--retrain"], "pick one"),
        (["--parallel", "--joint"], "--joint trains them in one step; pick one"),
        (["--parallel", "--distribute"], "--distribute spreads one member"),
        (["--parallel", "--eval-only"], "--parallel is about training and --eval-only"),
        (["--train-only", "--eval-only"], "--train-only is about training and --eval-only"),
        (["--train-only", "--export", "e.keras"], "--train-only evaluates none"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, tree, capsys, flags, message):
    assert cli(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list((tmp_path).glob("weights/*.h5"))


@pytest.mark.parametrize("flag", ["--data-dir", "--weights-dir", "--logs-dir", "--export"])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    tmp_path, tree, capsys, monkeypatch, flag
):
    # `--weights-dir "$WEIGHTS"` with the variable unset: Path("") is ".", where the
    # run would otherwise have read its data or written checkpoints and results.
    monkeypatch.chdir(tmp_path)
    assert cli(tmp_path, "--epochs", "1", "--no-cost", flag, "") == 2
    err = capsys.readouterr().err
    assert f"{flag} is empty (an unset shell variable?)" in err and err.count("\n") == 1
    assert [path.name for path in tmp_path.iterdir()] == ["tree"]  # nothing made or read


def test_an_export_onto_an_exported_member_is_refused_before_training(tmp_path, tree, capsys):
    # Two outputs in one file: the one written last would replace the other.
    out = tmp_path / "out"
    flags = ["--export", str(out / ".." / "out" / "nin_cnn.keras"), "--export-members", str(out)]
    assert cli(tmp_path, "--epochs", "1", *flags) == 2
    err = capsys.readouterr().err
    assert "nin_cnn.keras is where --export-members writes nin_cnn; give the ensemble" in err
    assert err.count("\n") == 1 and not list(tmp_path.glob("weights/*.h5"))


def test_an_export_path_that_is_a_folder_is_refused_before_training(tmp_path, tree, capsys):
    (tmp_path / "ensemble.keras").mkdir()
    assert cli(tmp_path, "--epochs", "1", "--export", str(tmp_path / "ensemble.keras")) == 2
    err = capsys.readouterr().err
    assert "ensemble.keras is a folder; give a file name ending in .keras" in err
    assert err.count("\n") == 1 and not list(tmp_path.glob("weights/*.h5"))


def test_eval_only_without_checkpoints_names_the_member(tmp_path, tree, capsys):
    (tmp_path / "weights").mkdir()
    assert cli(tmp_path, "--eval-only", "--models", "nin_cnn", "--no-cost") == 2
    assert "no checkpoint for nin_cnn" in capsys.readouterr().err


def test_missing_data_dir_from_the_shell_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "ensemble.py"), "--data-dir", str(tmp_path / "nope")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ensemble.py: error: --data-dir")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "abc"], "ensemble.py: error: argument --epochs: invalid int value: 'abc'"),
        (["--combine", "mean"], "ensemble.py: error: argument --combine: invalid choice: 'mean'"),
        # Scored, not exported: no built-in layer takes its logarithm (README).
        (
            ["--export", "e.keras", "--export-rule", "temperature"],
            "ensemble.py: error: argument --export-rule: invalid choice: 'temperature'",
        ),
        (["--nope"], "ensemble.py: error: unrecognized arguments: --nope"),
        (["predict"], "ensemble.py predict: error: the following arguments are required"),
        (["combine", "a.keras", "--top", "3"], "ensemble.py combine: error: unrecognized"),
        # A mistyped command is named, not "unrecognized arguments: combien a.keras".
        (
            ["combien", "a.keras"],
            "ensemble.py: error: unknown command 'combien' (did you mean combine?)",
        ),
        (
            ["Predict", "x.png"],
            "ensemble.py: error: unknown command 'Predict' (did you mean predict?)",
        ),
        (["trian"], "ensemble.py: error: unknown command 'trian' (did you mean train?); the"),
        (
            ["--limit", "9", "combine", "a.keras"],
            "ensemble.py: error: combine is a command and comes first, its flags after "
            "it: python ensemble.py combine A.keras B.keras ...",
        ),
    ],
)
def test_a_usage_error_is_one_line_not_the_whole_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help lists every flag")


def test_help_documents_every_flag_with_the_article_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--epochs",
        "--batch-size",
        "--validation-split",
        "--models",
        "--data-dir",
        "--limit",
        "--seed",
        "--weights-dir",
        "--logs-dir",
        "--eval-only",
        "--preset",
        "--augment",
        "--tta",
    ):
        assert flag in text
    assert "(article: 20)" in text and "(article: 32)" in text and "(article: 0.2)" in text
    # The commands beside training are found from the main help.
    assert "python ensemble.py combine" in text and "python ensemble.py predict" in text


def test_format_table_aligns_columns():
    rows = [
        {"row": "NIN", "members": ["nin_cnn"], "test_error": 0.3, "article_error": 0.3164},
        {
            "row": "pair C",
            "members": ["all_cnn", "nin_cnn"],
            "test_error": 0.25,
            "article_error": 0.2447,
        },
    ]
    lines = report.format_table(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[2].endswith("0.3000   0.3164")


@pytest.mark.xdist_group("article_run")
def test_every_rule_and_an_export_from_the_cli(article_run):
    tmp_path, out = article_run
    results = json.loads((tmp_path / "logs" / "results.json").read_text())
    rules = [row["rule"] for row in results["results"]]
    fitted = ["weighted"] * 4 + ["select"] * 4 + ["vote"] * 4 + ["stack"] * 4
    assert rules == ["average"] * 7 + fitted + ["temperature"] * 7  # members alone too
    assert results["export"]["rule"] == "stack"
    model = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    assert model.output.shape == (None, 10)
    assert "ensemble exported to" in out
    # Which members selection kept, of all three: their weights as in results.json.
    selected = next(r for r in results["results"] if r["row"] == "ensemble of three (select)")
    pairs = zip(selected["members"], selected["weights"], strict=True)
    kept = [f"{name} {weight:.2f}" for name, weight in pairs if weight > 0]
    assert f"ensemble of three (select) kept {', '.join(kept)} (their weights)" in out
    # The temperature of each calibrated row, as in results.json, in the table's order.
    calibrated = [r for r in results["results"] if r["rule"] == "temperature"]
    each = ", ".join(f"{r['row'].removesuffix(' (temperature)')} {r['temperature']:.2f}"
                     for r in calibrated)  # fmt: skip
    assert (
        f"temperatures fitted on the validation images (above 1: overconfident before): {each}\n"
        in out
    )
    assert each in (tmp_path / "logs" / "results.md").read_text()


# Keras warns for every layer it cannot match before it gives up on the file.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
@pytest.mark.parametrize("content", ["garbage", "other_architecture"])
def test_unusable_checkpoint_is_one_line_exit_2(tmp_path, tree, capsys, content):
    weights = tmp_path / "weights"
    weights.mkdir()
    path = weights / "nin_cnn.01-2.30.weights.h5"
    if content == "garbage":
        path.write_bytes(b"\x89HDF\r\n not really")
    else:
        all_cnn(keras.Input(shape=(32, 32, 3))).save_weights(path)
    assert cli(tmp_path, "--eval-only", "--models", "nin_cnn", "--no-cost") == 2
    err = capsys.readouterr().err
    assert "does not hold nin_cnn weights" in err and err.count("\n") == 1
    assert path.is_file()  # nothing deleted or overwritten


def test_the_same_seed_repeats_a_cpu_run(tmp_path, tree):
    # --seed fixes the shuffling, the initial weights and the dropout masks (NIN's).
    def run(folder):
        folders = ["--weights-dir", str(tmp_path / folder / "w"), "--logs-dir",
                   str(tmp_path / folder / "l")]  # fmt: skip
        flags = ["--data-dir", str(tree), "--models", "nin_cnn", "--epochs", "2"]
        assert ensemble.main([*flags, "--no-cost", *folders]) == 0
        logs = tmp_path / folder / "l"
        curves = [
            float(row[key])
            for row in csv.DictReader((logs / "nin_cnn.csv").read_text().splitlines())
            for key in ("loss", "val_loss")
        ]
        errors = [
            r["test_error"] for r in json.loads((logs / "results.json").read_text())["results"]
        ]
        return curves, errors

    (curves, errors), (curves_again, errors_again) = run("first"), run("second")
    assert len(curves) == 4
    if keras.backend.backend() == "torch":  # its CPU kernels round differently each run
        assert curves_again == pytest.approx(curves, rel=1e-5)
    else:
        assert curves_again == curves and errors_again == errors
