"""One-file export: round trip across backends, fitted rules, and the predict command."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import data
import ensemble
import evaluation
import export
from models import all_cnn, nin_cnn

ROOT = Path(__file__).resolve().parents[1]
OTHER_BACKEND = "tensorflow" if keras.backend.backend() == "jax" else "jax"

ROUND_TRIP = """
import sys, numpy as np, keras
x, expected = np.load(sys.argv[1]), np.load(sys.argv[2])
model = keras.saving.load_model(sys.argv[3], safe_mode=True)
assert keras.backend.backend() == sys.argv[5], keras.backend.backend()
difference = np.abs(model.predict(x, verbose=0) - expected).max()
assert difference <= 1e-5, difference
model.save(sys.argv[4])
"""


@pytest.fixture
def members():
    model_input = keras.Input(shape=(32, 32, 3))
    return [nin_cnn(model_input), all_cnn(model_input)]


@pytest.fixture
def images():
    return np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)


def test_export_reloads_in_safe_mode_under_the_other_backend_and_back(tmp_path, members, images):
    path = tmp_path / "ensemble.keras"
    info = export.export(path, members, "average")
    assert info["bytes"] == path.stat().st_size > 0
    expected = np.mean([m.predict(images, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(export.load(path).predict(images, verbose=0), expected, atol=1e-5)

    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "expected.npy", expected)
    env = {**os.environ, "KERAS_BACKEND": OTHER_BACKEND, "PYTHONPATH": str(ROOT)}
    args = ["x.npy", "expected.npy", "ensemble.keras", "back.keras", OTHER_BACKEND]
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode and f"No module named '{OTHER_BACKEND}'" in result.stderr:
        pytest.skip(f"{OTHER_BACKEND} is not installed: pip install -r requirements-test.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    back = keras.saving.load_model(tmp_path / "back.keras", safe_mode=True)
    np.testing.assert_allclose(back.predict(images, verbose=0), expected, atol=1e-5)


def test_weighted_and_stacked_exports_match_the_table(tmp_path, members, images):
    rng = np.random.default_rng(1)
    val_images, val_labels = rng.random((40, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 40)
    val_probs = [m.predict(val_images, verbose=0) for m in members]
    test_probs = [m.predict(images, verbose=0) for m in members]

    info = export.export(tmp_path / "w.keras", members, "weighted", val_probs, val_labels)
    weights = evaluation.fit_weights(val_probs, val_labels)
    assert info["weights"] == pytest.approx(weights, abs=1e-6)
    exported = export.load(tmp_path / "w.keras").predict(images, verbose=0)
    np.testing.assert_allclose(exported, evaluation.average(test_probs, weights), atol=1e-5)

    export.export(tmp_path / "s.keras", members, "stack", val_probs, val_labels)
    stacker = evaluation.fit_stacking(val_probs, val_labels)
    exported = export.load(tmp_path / "s.keras").predict(images, verbose=0)
    np.testing.assert_allclose(exported, evaluation.apply_stacking(stacker, test_probs), atol=1e-5)


def test_members_of_one_name_are_refused_with_the_fix(tmp_path):
    # Several seeds of one architecture: the builders name each the same.
    model_input = keras.Input(shape=(32, 32, 3))
    seeds = [nin_cnn(model_input), nin_cnn(model_input)]
    with pytest.raises(export.ExportError, match="both named 'nin_cnn'; give each its own"):
        export.export(tmp_path / "e.keras", seeds, "average")
    probs = {"nin_cnn": np.full((2, 10), 0.1, "float32")}  # the second overwrote the first
    with pytest.raises(ValueError, match="both named 'nin_cnn'; give each its own"):
        ensemble.table_rows(["nin_cnn", "nin_cnn"], [], probs, {}, None, np.zeros(2, int))
    assert not list(tmp_path.iterdir())
    seeds[1].name = "nin_cnn_2"  # the fix the message gives
    export.export(tmp_path / "e.keras", seeds, "average")
    assert [layer.name for layer in export.load(tmp_path / "e.keras").layers][1:3] == [
        "nin_cnn",
        "nin_cnn_2",
    ]


def test_an_export_cut_short_leaves_no_file_behind(tmp_path, members, monkeypatch):
    def save_half_then_fill_the_disk(model, path, *args, **kwargs):
        Path(path).write_bytes(b"PK half a zip")
        raise OSError(28, "No space left on device", str(path))

    (tmp_path / "e.keras").write_bytes(b"the previous export")
    monkeypatch.setattr(keras.Model, "save", save_half_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        export.export(tmp_path / "e.keras", members, "average")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.keras"]  # no hidden .partial
    assert (tmp_path / "e.keras").read_bytes() == b"the previous export"


def test_predict_command_prints_top_classes_for_images_of_any_size(tmp_path, members, capsys):
    export.export(tmp_path / "e.keras", members, "average")
    assert export.class_names(tmp_path / "e.keras", 10) == list(data.CLASS_NAMES)
    rng = np.random.default_rng(2)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(big)
    grey = tmp_path / "grey.jpg"
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(grey)
    # A folder stands for its PNG and JPEG files, by name; others and hidden ones are not read.
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.JPG", "a.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    (photos / "._a.png").write_bytes(b"macOS metadata")
    args = ["--model", str(tmp_path / "e.keras"), str(big), str(grey), str(photos)]
    assert export.predict_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = [str(big), str(grey), str(photos / "a.png"), str(photos / "b.JPG")]
    assert [line.split(":")[0] for line in lines] == expected
    for line in lines:
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 3
        probabilities = [float(item.rsplit(" ", 1)[1]) for item in ranked]
        assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "nowhere.png does not exist"),
        ("not_an_image", "notes.png is not a readable PNG or JPEG"),
        ("bad_model", "broken.keras is not a loadable Keras model"),
        ("folder", "is a folder; give the .keras file"),
        ("image folder", "folder PHOTOS holds no PNG or JPEG files"),
        ("empty image", "an image path is empty (an unset shell variable?)"),
        ("empty", "--model is empty (an unset shell variable?)"),
        ("not_images", "maps 784 to 5; this needs one input of grey or RGB images"),
        ("logits", "does not output probabilities (its rows sum to"),
        ("top", "--top must lie between 1 and 10, got 11"),
        ("classes", "--classes names 2 classes; --model MODEL scores 10"),
    ],
)
def test_predict_command_bad_input_is_one_line_exit_2(tmp_path, members, capsys, problem, message):
    export.export(tmp_path / "e.keras", members, "average")
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    model = tmp_path / "e.keras"
    if problem == "missing":
        image = tmp_path / "nowhere.png"
    elif problem == "not_an_image":
        image = tmp_path / "notes.png"
        image.write_text("not an image")
    elif problem == "bad_model":
        model = tmp_path / "broken.keras"
        model.write_bytes(b"PK\x03\x04 truncated")
    elif problem == "folder":
        model = tmp_path
    elif problem == "empty":
        model = ""
    elif problem == "image folder":
        image = tmp_path / "photos"
        image.mkdir()
        (image / "notes.txt").write_text("not an image")
        message = message.replace("PHOTOS", str(image))
    elif problem == "empty image":
        image = ""
    elif problem == "not_images":  # flattened pixels: not a model of images
        model = tmp_path / "other.keras"
        keras.Sequential([keras.Input((784,)), keras.layers.Dense(5, "softmax")]).save(model)
    elif problem == "logits":
        model = tmp_path / "logits.keras"
        keras.Sequential(
            [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5)]
        ).save(model)
    extra = {"top": ["--top", "11"], "classes": ["--classes", "cat,dog"]}.get(problem, [])
    message = message.replace("MODEL", str(model))
    assert export.predict_main(["--model", str(model), str(image), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble.py predict: error:") and err.count("\n") == 1
    assert message in err
