"""Distillation (`python ensemble.py distill`, ensembling/distillation.py): the loss
is the formula, training moves the student towards the teacher and leaves the
teacher alone, the student's file stands alone, a stopped run resumes, and bad
input gets one line and exit code 2."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_tree

import ensemble
from ensembling import distillation, training
from ensembling.cli import distill as distill_command
from models import MODELS

ROOT = Path(__file__).resolve().parents[1]
# The module's fixtures train once per worker: its tests run on one (pyproject.toml).
pytestmark = pytest.mark.xdist_group("distill")


def small_classifier(name, seed, softmax_layer=True, num_classes=10):
    """A few thousand weights on 32x32x3 images: quick to train on the CPU."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(
        4, 3, strides=4, kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if softmax_layer:
        x = keras.layers.Dense(num_classes)(x)
        x = keras.layers.Activation("softmax")(x)
    else:  # the softmax as the Dense layer's own activation, as many models end
        x = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, x, name=name)


def images_and_labels(count=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((count, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, count), 10)
    return x, y


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


@pytest.mark.parametrize("softmax_layer", [True, False], ids=["Activation", "Dense"])
def test_the_loss_is_the_weighted_cross_entropy_plus_t2_kl(softmax_layer):
    x, y = images_and_labels(8)
    teacher = distillation.teacher_model([small_classifier("a", 1), small_classifier("b", 2)])
    student, scores = distillation.student_logits(small_classifier("s", 3, softmax_layer))
    trainer = distillation.distiller(teacher, scores, temperature=4.0, label_weight=0.3)

    loss = trainer.compute_loss(x=x, y=y, y_pred=trainer(x), training=False)

    z = keras.ops.convert_to_numpy(scores(x))
    t = keras.ops.convert_to_numpy(teacher(x))
    expected_ce = -np.mean(np.sum(y * np.log(softmax(z)), axis=1))
    expected = 0.3 * expected_ce + 0.7 * 16 * kl(softmax(t / 4), softmax(z / 4))
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-4)
    # The teacher's logits are the log of the members' average; the student ends in
    # the softmax of its scores.
    members = teacher.layers[1].layers  # the ensemble inside: input, members, average
    average = np.mean([m.predict(x, verbose=0) for m in members[1:-1]], axis=0)
    assert np.allclose(softmax(t), average, atol=1e-6)
    assert np.allclose(student.predict(x, verbose=0), softmax(z), atol=1e-6)


def test_a_few_epochs_bring_the_student_to_the_teacher_and_leave_the_teacher_as_it_was():
    keras.utils.set_random_seed(0)
    x, y = images_and_labels(128)
    members = [small_classifier("a", 1), small_classifier("b", 2)]
    before = [w.copy() for m in members for w in m.get_weights()]
    student = small_classifier("s", 3)
    teacher_probs = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    start = kl(teacher_probs, student.predict(x, verbose=0))

    trained = distillation.distill(
        members, student, x, y, epochs=8, batch_size=32, label_weight=0.0, verbose=0
    )

    assert kl(teacher_probs, trained.predict(x, verbose=0)) < start / 2
    after = [w for m in members for w in m.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_batches_show_teacher_and_student_one_translated_or_mirrored_image():
    x = np.arange(2 * 32 * 32 * 3, dtype=np.float32).reshape(2, 32, 32, 3) + 1
    batches = distillation.Batches(x, np.eye(2), 2, augment=True, seed=1)
    images, labels = batches[0]
    again, _ = batches[0]
    assert np.array_equal(images, again)  # drawn per batch, the same whoever asks
    for image, label in zip(images, labels, strict=True):
        source = x[int(np.argmax(label))]
        padded = np.pad(source, [(4, 4), (4, 4), (0, 0)])
        windows = [
            view[r : r + 32, c : c + 32]
            for view in (padded, padded[:, ::-1])
            for r in range(9)
            for c in range(9)
        ]
        assert any(np.array_equal(image, w) for w in windows)
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][0], images) or batches.order.tolist() != [0, 1]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """Three members' checkpoints (untrained: what a teacher is made of does not
    matter here) and a class-folder tree of 40 training and 20 test images."""
    root = tmp_path_factory.mktemp("distill")
    tree = write_tree(root / "tree", train_per_class=4, test_per_class=2)
    weights = root / "weights"
    weights.mkdir()
    for i, (name, builder) in enumerate(MODELS.items()):
        keras.utils.set_random_seed(i)
        builder(keras.Input((32, 32, 3))).save_weights(weights / f"{name}.01-2.30.weights.h5")
    return root, tree


def command(root, tree, *flags):
    return [
        "distill",
        "--data-dir",
        str(tree),
        "--weights-dir",
        str(root / "weights"),
        "--logs-dir",
        str(root / "logs"),
        "--batch-size",
        "16",
        "--no-cost",
        *flags,
    ]


@pytest.fixture(scope="module")
def distilled(run_folder):
    root, tree = run_folder
    before = digest(root / "weights")
    code = ensemble.main(command(root, tree, "--epochs", "2", "--student", "nin_cnn"))
    assert code == 0
    return root, tree, before


def test_distill_writes_the_table_the_checkpoint_the_log_and_a_standalone_student(
    distilled, capsys
):
    root, _, before = distilled
    results = json.loads((root / "logs" / "distill.json").read_text())
    rows = [row["row"] for row in results["results"]]
    assert rows == [
        "teacher (average of conv_pool_cnn+all_cnn+nin_cnn)",
        "nin_cnn alone (labels only)",
        "nin_cnn_student (distilled)",
    ]
    assert results["settings"]["distillation"]["temperature"] == 4.0
    assert results["settings"]["distillation"]["label_weight"] == 0.1
    assert results["results"][0]["agreement"] == 1.0
    assert "| nin_cnn_student (distilled) |" in (root / "logs" / "distill.md").read_text()
    weights = root / "weights"
    assert re.fullmatch(
        r"nin_cnn_student\.\d\d-[\d.]+\.weights\.h5", Path(results["checkpoint"]).name
    )
    assert len((root / "logs" / "nin_cnn_student.csv").read_text().splitlines()) == 3
    # The teacher's checkpoints are read, never written.
    assert {k: v for k, v in digest(weights).items() if k in before} == before

    student = keras.saving.load_model(weights / "student.keras", safe_mode=True)
    checkpointed = MODELS["nin_cnn"](keras.Input((32, 32, 3)))
    checkpointed.load_weights(results["checkpoint"])
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    np.save(root / "probe.npy", x)
    np.save(root / "expected.npy", student.predict(x, verbose=0))
    assert np.allclose(student.predict(x, verbose=0), checkpointed.predict(x, verbose=0), atol=1e-5)


def test_the_student_file_reloads_in_safe_mode_under_another_backend(distilled):
    root, _, _ = distilled
    other = "jax" if keras.backend.backend() != "jax" else "torch"
    script = (
        "import keras, numpy as np, sys; r = sys.argv[1]; "
        "m = keras.saving.load_model(r + '/weights/student.keras', safe_mode=True); "
        "p = m.predict(np.load(r + '/probe.npy'), verbose=0); "
        "e = np.load(r + '/expected.npy'); "
        "assert np.allclose(p, e, atol=1e-4), abs(p - e).max(); "
        "print(keras.backend.backend(), 'ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(root)],
        env={**os.environ, "KERAS_BACKEND": other},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"{other} ok")


def test_predict_takes_the_student_file(distilled, capsys):
    root, tree, _ = distilled
    image = next((tree / "test").rglob("*.png"))
    assert (
        ensemble.main(["predict", "--model", str(root / "weights" / "student.keras"), str(image)])
        == 0
    )
    assert image.name in capsys.readouterr().out


def test_the_same_command_again_reuses_the_student_and_other_flags_are_refused(distilled, capsys):
    root, tree, _ = distilled
    assert ensemble.main(command(root, tree, "--epochs", "2", "--student", "nin_cnn")) == 0
    assert "nin_cnn_student is already distilled" in capsys.readouterr().out
    code = ensemble.main(
        command(root, tree, "--epochs", "2", "--student", "nin_cnn", "--temperature", "2")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "temperature 4.0" in err[0] and "--retrain" in err[0]
    # A retrained member is another teacher: its student is not passed off as this one's.
    newer = root / "weights" / "nin_cnn.02-1.00.weights.h5"
    newer.write_bytes((root / "weights" / "nin_cnn.01-2.30.weights.h5").read_bytes())
    try:
        code = ensemble.main(command(root, tree, "--epochs", "2", "--student", "nin_cnn"))
    finally:
        newer.unlink()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "nin_cnn.01-2.30.weights.h5" in err[0] and "--retrain" in err[0]


def test_a_stopped_distillation_resumes_after_its_last_epoch(run_folder, monkeypatch, capsys):
    root, tree = run_folder
    flags = command(root, tree, "--epochs", "2", "--student", "all_cnn", "--export")
    flags.append(str(root / "resumed.keras"))

    def stop_in_the_second_epoch(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt  # as RaiseInterrupt raises a Ctrl-C at a batch's end

    with monkeypatch.context() as patch:
        patch.setattr(training.RaiseInterrupt, "on_epoch_begin", stop_in_the_second_epoch)
        assert ensemble.main(flags) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not (root / "resumed.keras").exists()

    assert ensemble.main(flags) == 0
    assert "resuming all_cnn_student after epoch 1" in capsys.readouterr().out
    log = (root / "logs" / "all_cnn_student.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["0", "1"]
    assert (root / "resumed.keras").is_file()


def one_line_error(capsys, argv):
    code = ensemble.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_gets_one_line_exit_2_and_nothing_overwritten(run_folder, tmp_path, capsys):
    root, tree = run_folder
    kept = tmp_path / "student.keras"
    kept.write_bytes(b"an earlier student")
    base = command(root, tree, "--epochs", "1", "--export", str(kept))
    empty = ["--weights-dir", str(tmp_path / "empty")]

    assert "no checkpoint for conv_pool_cnn" in one_line_error(capsys, [*base, *empty])
    assert "--temperature must be a positive" in one_line_error(
        capsys, [*base, "--temperature", "0"]
    )
    assert "--label-weight must lie between 0 and 1" in one_line_error(
        capsys, [*base, "--label-weight", "1.5"]
    )
    assert "unknown student 'resnet'" in one_line_error(capsys, [*base, "--student", "resnet"])

    grey = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    grey.save(tmp_path / "grey.keras")
    error = one_line_error(capsys, [*base, "--student", str(tmp_path / "grey.keras")])
    assert "28x28" in error or "(None, 28, 28, 1)" in error

    logits = small_classifier("logits", 0)
    logits = keras.Model(logits.inputs, logits.layers[-2].output)
    logits.save(tmp_path / "logits.keras")
    error = one_line_error(capsys, [*base, "--student", str(tmp_path / "logits.keras")])
    assert "does not end in a softmax" in error

    five = small_classifier("five", 0, num_classes=5)
    five.save(tmp_path / "five.keras")
    error = one_line_error(capsys, [*base, "--teacher", str(tmp_path / "five.keras")])
    assert "10-class output" in error

    assert kept.read_bytes() == b"an earlier student"


def test_the_docs_python_example_distils_one_model_from_two(tmp_path, monkeypatch):
    section = (ROOT / "docs" / "distill.md").read_text().split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = 'source = "../shared/data/cifar10-jpeg.tar.gz"'
    assert source in code
    tree = write_tree(tmp_path / "tree", train_per_class=4, test_per_class=1)
    code = code.replace(source, f"source = {str(tree)!r}")
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate("ab"):
        small_classifier(name, i).save(f"{name}.keras")
    scope = {"__name__": "docs"}
    exec(compile(code, "docs/distill.md", "exec"), scope)
    assert scope["student"].name == "nin_cnn" and scope["student"].output_shape == (None, 10)
    reloaded = keras.saving.load_model("student.keras", safe_mode=True)
    assert reloaded.count_params() == scope["student"].count_params()


def test_a_student_file_of_ones_own_trains_from_fresh_or_its_own_weights(
    run_folder, tmp_path, capsys
):
    root, tree = run_folder
    mine = small_classifier("mine", 5, softmax_layer=False)
    mine.save(tmp_path / "mine.keras")
    flags = [*command(root, tree, "--epochs", "1", "--student", str(tmp_path / "mine.keras"))]
    flags += ["--student-weights", "current", "--export", str(tmp_path / "out.keras")]
    assert ensemble.main(flags) == 0
    out = capsys.readouterr().out
    assert "mine alone (labels only)" in out and "mine_student (distilled)" in out
    student = keras.saving.load_model(tmp_path / "out.keras", safe_mode=True)
    assert isinstance(student.layers[-1], keras.layers.Softmax)
    assert distill_command.DEFAULT_STUDENT in MODELS


def test_a_student_whose_loss_becomes_nan_stops_with_one_line_and_exit_1(
    run_folder, tmp_path, monkeypatch, capsys
):
    root, tree = run_folder
    weights = tmp_path / "weights"
    weights.mkdir()
    MODELS["conv_pool_cnn"](keras.Input((32, 32, 3))).save_weights(
        weights / "conv_pool_cnn.01-2.30.weights.h5"
    )
    real = MODELS["nin_cnn"]

    def poisoned_nin(model_input, **rates):
        model = real(model_input, **rates)
        # The 10-class map has no ReLU after it (a ReLU would turn NaN into 0).
        scores = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-1]
        scores.bias.assign(np.full(scores.bias.shape, np.nan, "float32"))
        return model

    monkeypatch.setitem(MODELS, "nin_cnn", poisoned_nin)
    flags = ["--data-dir", str(tree), "--weights-dir", str(weights), "--logs-dir"]
    flags += [str(tmp_path / "logs"), "--models", "conv_pool_cnn", "--student", "nin_cnn"]
    code = ensemble.main(["distill", *flags, "--epochs", "2", "--batch-size", "16", "--no-cost"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "nin_cnn_student stopped: its loss became NaN in epoch 1" in err[0]
    assert not (weights / "student.keras").exists()
