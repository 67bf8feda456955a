"""One-file export: round trip across backends, fitted rules, and the predict command."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import data
from ensembling import combination, export, prediction, rows
from ensembling.cli import exits, predict
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
    weights = combination.fit_weights(val_probs, val_labels)
    assert info["weights"] == pytest.approx(weights, abs=1e-6)
    exported = export.load(tmp_path / "w.keras").predict(images, verbose=0)
    np.testing.assert_allclose(exported, combination.average(test_probs, weights), atol=1e-5)

    export.export(tmp_path / "s.keras", members, "stack", val_probs, val_labels)
    stacker = combination.fit_stacking(val_probs, val_labels)
    exported = export.load(tmp_path / "s.keras").predict(images, verbose=0)
    np.testing.assert_allclose(exported, combination.apply_stacking(stacker, test_probs), atol=1e-5)


def test_a_selection_export_holds_only_the_members_picked(tmp_path, members, images):
    small = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
         keras.layers.Dense(10, activation="softmax")], name="small",
    )  # fmt: skip
    three = [*members, small]
    # Validation probabilities chosen so that selection keeps the first two (each
    # right where the other is not) and never the third, which knows nothing.
    labels = np.arange(40) % 10
    knows, guess = np.eye(10)[labels], np.full((40, 10), 0.1)
    first = np.where(np.arange(40)[:, None] < 20, knows, guess)
    val_probs = [first, np.where(np.arange(40)[:, None] >= 20, knows, guess), guess]
    weights = combination.fit_selection(val_probs, labels)
    assert weights[0] > 0 and weights[1] > 0 and weights[2] == 0
    info = export.export(tmp_path / "s.keras", three, "select", val_probs, labels)
    assert info["weights"] == pytest.approx(weights) and info["kept"] == [m.name for m in members]
    loaded = export.load(tmp_path / "s.keras")
    assert "small" not in [layer.name for layer in loaded.layers]
    test_probs = [m.predict(images, verbose=0) for m in three]
    expected = combination.average(test_probs, weights)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-5)

    # From Python, a fitted rule without validation data is one clear error.
    for rule in ("weighted", "select", "stack"):
        with pytest.raises(export.ExportError, match=f"the {rule} rule is fitted on validation"):
            export.export(tmp_path / "none.keras", three, rule)
    assert not (tmp_path / "none.keras").exists()

    # A selection of one member is that member alone.
    info = export.export(tmp_path / "one.keras", three, "select", [first, guess, guess], labels)
    assert info["kept"] == [members[0].name] and info["weights"] == [1.0, 0.0, 0.0]
    loaded = export.load(tmp_path / "one.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), test_probs[0], atol=1e-6)


def test_members_of_different_input_sizes_share_the_largest_through_a_resizing(tmp_path):
    """From Python as in combine: the file takes the largest size a member fixes, and
    a smaller member takes the images through a Resizing layer to its own."""
    small, large = (
        keras.Sequential([keras.Input((size, size, 3)), keras.layers.Conv2D(4, 3),
                          keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(10, activation="softmax")], name=name)
        for size, name in ((16, "small"), (24, "large"))
    )  # fmt: skip
    export.export(tmp_path / "e.keras", [small, large], "average")
    loaded = export.load(tmp_path / "e.keras")
    assert tuple(loaded.input_shape) == (None, 24, 24, 3)
    x = np.random.default_rng(1).random((4, 24, 24, 3), dtype=np.float32)
    resized = keras.layers.Resizing(16, 16, interpolation="bilinear")(x)
    expected = (small.predict(resized, verbose=0) + large.predict(x, verbose=0)) / 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)


def test_members_of_one_name_are_refused_with_the_fix(tmp_path):
    # Several seeds of one architecture: the builders name each the same.
    model_input = keras.Input(shape=(32, 32, 3))
    seeds = [nin_cnn(model_input), nin_cnn(model_input)]
    with pytest.raises(export.ExportError, match="both named 'nin_cnn'; give each its own"):
        export.export(tmp_path / "e.keras", seeds, "average")
    probs = {"nin_cnn": np.full((2, 10), 0.1, "float32")}  # the second overwrote the first
    with pytest.raises(ValueError, match="both named 'nin_cnn'; give each its own"):
        rows.table_rows(["nin_cnn", "nin_cnn"], [], probs, {}, None, np.zeros(2, int))
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
    # A folder stands for its image files, by name; others and hidden ones are not read.
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.JPG", "a.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    (photos / "._a.png").write_bytes(b"macOS metadata")
    args = ["--model", str(tmp_path / "e.keras"), str(big), str(grey), str(photos)]
    assert predict.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = [str(big), str(grey), str(photos / "a.png"), str(photos / "b.JPG")]
    assert [line.split(":")[0] for line in lines] == expected
    for line in lines:
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 3
        probabilities = [float(item.rsplit(" ", 1)[1]) for item in ranked]
        assert probabilities == sorted(probabilities, reverse=True)


def test_predict_csv_holds_every_probability_of_every_image(tmp_path, members, capsys):
    import csv

    export.export(tmp_path / "e.keras", members, "average")
    rng = np.random.default_rng(4)
    images = [tmp_path / f"{name}.png" for name in ("b", "a")]
    for image in images:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    table = tmp_path / "out.csv"
    table.write_text("an earlier table, replaced")
    argv = ["--model", str(tmp_path / "e.keras"), *map(str, images), "--csv", str(table)]
    assert predict.main(argv) == 0
    captured = capsys.readouterr()
    assert f"probabilities of 2 images written to {table}" in captured.err
    assert len(captured.out.splitlines()) == 2  # stdout: still one line per image
    with open(table, newline="") as file:
        header, *rows = list(csv.reader(file))
    assert header == ["image", "predicted", *data.CLASS_NAMES]
    assert [row[0] for row in rows] == list(map(str, images))
    x = data.scale(np.stack([predict.read_pixels(image) for image in images]))
    expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    for row, probs in zip(rows, expected, strict=True):
        np.testing.assert_allclose([float(v) for v in row[2:]], probs, atol=2e-6)
        assert row[1] == data.CLASS_NAMES[int(np.argmax(probs))]


def test_predict_temperature_calibrates_as_the_table_did_and_keeps_the_classes(
    tmp_path, members, capsys
):
    export.export(tmp_path / "e.keras", members, "average")
    rng = np.random.default_rng(6)
    images = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for image in images:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)

    def probabilities(*flags):
        table = tmp_path / "out.csv"
        argv = ["--model", str(tmp_path / "e.keras"), *map(str, images), "--csv", str(table)]
        assert predict.main([*argv, *flags]) == 0
        capsys.readouterr()
        rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
        return [row[1] for row in rows], np.array([[float(v) for v in row[2:]] for row in rows])

    classes, plain = probabilities()
    for temperature in ("2.5", "0.4"):
        scaled_classes, scaled = probabilities("--temperature", temperature)
        assert scaled_classes == classes
        expected = combination.with_temperature(plain, float(temperature))
        np.testing.assert_allclose(scaled, expected, atol=2e-5)
    assert probabilities("--temperature", "1")[1].tolist() == plain.tolist()


def test_the_temperature_rule_is_not_exported_and_says_why(tmp_path, members):
    rng = np.random.default_rng(1)
    val_images, val_labels = rng.random((20, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 20)
    val_probs = [m.predict(val_images, verbose=0) for m in members]
    with pytest.raises(export.ExportError, match="no built-in Keras layer takes the logarithm"):
        export.export(tmp_path / "t.keras", members, "temperature", val_probs, val_labels)
    assert list(tmp_path.iterdir()) == []


def test_predict_reads_a_large_folder_a_chunk_at_a_time(tmp_path, capsys, monkeypatch):
    """A folder of any size fits in memory: the images are read and predicted a chunk at
    a time, with the same lines and table as in one go; what the model outputs (logits
    here) is found on the first chunk and holds for the rest, --tta too."""

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])  # fmt: skip
    model.save(tmp_path / "logits.keras")
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(tmp_path / f"{i}.png")
    argv = ["--model", str(tmp_path / "logits.keras"), "--tta", "--batch-size", "1"]

    def run(name):
        code = predict.main([*argv, "--csv", str(tmp_path / name), str(tmp_path)])
        assert code == 0
        return capsys.readouterr().out, (tmp_path / name).read_text()

    whole = run("whole.csv")
    seen = []
    real_predict = prediction.predict
    monkeypatch.setattr(predict, "CHUNK", 2)
    monkeypatch.setattr(
        prediction, "predict", lambda m, x, *a: seen.append(len(x)) or real_predict(m, x, *a)
    )
    assert run("chunks.csv") == whole
    assert len(whole[0].splitlines()) == 5 and max(seen) == 2


def test_predict_into_a_pipe_its_reader_left_ends_quietly(tmp_path, members):
    # python ensemble.py predict ... | head -1: the reader is gone before the output.
    export.export(tmp_path / "e.keras", members, "average")
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    argv = [sys.executable, str(ROOT / "ensemble.py"), "predict", "--model", "e.keras", "cat.png"]
    run = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.close()  # long before the model is loaded: every write finds no reader
    err = run.stderr.read().decode()
    assert run.wait(timeout=300) == exits.BROKEN_PIPE == 141  # as the shell reports SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "nowhere.png does not exist"),
        ("not_an_image", "notes.png is not a readable image"),
        ("bad_model", "broken.keras is not a loadable Keras model"),
        ("checkpoint", "m.01-2.30.weights.h5 holds weights only, no model; python ensemble.py"),
        ("folder", "is a folder; give the .keras file"),
        ("saved model", "is a TensorFlow SavedModel folder, which Keras 3 cannot load"),
        ("image folder", "folder PHOTOS holds no image files (PNG, JPEG, BMP, GIF or WebP)"),
        ("class folders", "or WebP); they are only in its folders, such as cat/, which are not"),
        ("empty image", "an image path is empty (an unset shell variable?)"),
        ("empty", "--model is empty (an unset shell variable?)"),
        ("not_images", "maps 784 to 5; this needs one input of grey or RGB images"),
        ("sigmoids", "scores each class with a sigmoid of its own (a multi-label model)"),
        ("top", "--top must lie between 1 and 10, got 11"),
        ("batch size", "--batch-size must be at least 1, got 0"),
        ("temperature", "--temperature must be a positive number, got 0.0"),
        ("temperature nan", "--temperature must be a positive number, got nan"),
        ("classes", "--classes names 2 classes; --model MODEL scores 10"),
        ("csv folder", "is a folder; give a file name, such as"),
        ("csv nowhere", "nowhere/p.csv: folder"),
        ("csv onto model", "e.keras is a file this command reads, which it would replace"),
        ("csv onto image", "cat.png is a file this command reads, which it would replace"),
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
    elif problem == "checkpoint":  # what weights/ holds, a real one
        model = tmp_path / "m.01-2.30.weights.h5"
        members[0].save_weights(model)
    elif problem == "folder":
        model = tmp_path
    elif problem == "saved model":  # what tf.keras 2's model.save("folder") left
        model = tmp_path / "classifier"
        (model / "variables").mkdir(parents=True)
        (model / "saved_model.pb").write_bytes(b"\x08\x01")
    elif problem == "empty":
        model = ""
    elif problem in ("image folder", "class folders"):
        image = tmp_path / "photos"
        image.mkdir()
        (image / "notes.txt").write_text("not an image")
        message = message.replace("PHOTOS", str(image))
        if problem == "class folders":  # a tree's test/: images one level down
            (image / "empty").mkdir()
            (image / "cat").mkdir()
            Image.new("RGB", (32, 32)).save(image / "cat" / "1.png")
    elif problem == "empty image":
        image = ""
    elif problem == "not_images":  # flattened pixels: not a model of images
        model = tmp_path / "other.keras"
        keras.Sequential([keras.Input((784,)), keras.layers.Dense(5, "softmax")]).save(model)
    elif problem == "sigmoids":
        model = tmp_path / "sigmoids.keras"
        keras.Sequential(
            [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5, "sigmoid")]
        ).save(model)
    extra = {"top": ["--top", "11"], "classes": ["--classes", "cat,dog"],
             "batch size": ["--batch-size", "0"], "csv folder": ["--csv", str(tmp_path)],
             "temperature": ["--temperature", "0"],
             "temperature nan": ["--temperature", "nan"],
             "csv nowhere": ["--csv", str(tmp_path / "nowhere" / "p.csv")],
             "csv onto model": ["--csv", str(model)],
             "csv onto image": ["--csv", str(tmp_path / "." / "cat.png")],
             }.get(problem, [])  # fmt: skip
    before = {path: path.read_bytes() for path in (model, image) if Path(path).is_file()}
    message = message.replace("MODEL", str(model))
    assert predict.main(["--model", str(model), str(image), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble.py predict: error:") and err.count("\n") == 1
    assert message in err
    assert all(path.read_bytes() == content for path, content in before.items())


def printed(image, probs):
    """The line predict prints for `image` of a CIFAR-10 model's `probs`: its top 3."""
    top = np.argsort(probs)[::-1][:3]
    return f"{image}: " + ", ".join(f"{data.CLASS_NAMES[k]} {probs[k]:.3f}" for k in top) + "\n"


def ending(units, activation=None, last=None):
    """A model of 4x4 grey images ending in Dense(units, activation), then `last`."""
    layers = [keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(units, activation)]
    return keras.Sequential(layers + ([last] if last else []))


def test_output_kind_reads_logits_and_one_unit_from_values_and_the_last_activation():
    rng = np.random.default_rng(0)
    soft = rng.dirichlet(np.ones(5), 8).astype("float32")
    inside = rng.random((8, 5), dtype=np.float32)  # in [0, 1], rows not summing to one
    spread = rng.normal(size=(8, 5)).astype("float32") * 4
    kind = prediction.output_kind
    assert kind(ending(5, "softmax"), soft, "m") == "softmax"
    assert kind(ending(5, last=keras.layers.Softmax()), soft, "m") == "softmax"
    # Rows summing to one are probabilities whatever the model's end (an Average, say).
    assert kind(ending(5, last=keras.layers.Identity()), soft, "m") == "softmax"
    assert kind(ending(5), spread, "m") == "logits"
    # A few images' logits may all lie in [0, 1]: a linear end still says logits.
    assert kind(ending(5), inside, "m") == "logits"
    for model in (ending(5, "sigmoid"), ending(5, last=keras.layers.Identity())):
        with pytest.raises(export.ExportError, match="m scores each class with a sigmoid"):
            kind(model, inside, "m")
    one_inside, one_outside = inside[:, :1], spread[:, :1]
    assert kind(ending(1, "sigmoid"), one_inside, "m") == "sigmoid"
    assert kind(ending(1), one_inside, "m") == "logit"
    assert kind(ending(1, last=keras.layers.Identity()), one_inside, "m") == "sigmoid"
    assert kind(ending(1, last=keras.layers.Identity()), one_outside, "m") == "logit"
    # A dead model's NaNs: its last activation says what they are.
    nan = np.full((2, 5), np.nan, "float32")
    assert kind(ending(5, "softmax"), nan, "m") == "softmax"
    assert kind(ending(1, "sigmoid"), nan[:, :1], "m") == "sigmoid"
    assert kind(ending(1), nan[:, :1], "m") == "logit"
    # A nested model ends where its own last layer does.
    inputs = keras.Input((4, 4, 1))
    nested = keras.Model(inputs, ending(5)(inputs))
    assert kind(nested, inside, "m") == "logits"


@pytest.mark.parametrize(
    "kind, units", [("softmax", 3), ("logits", 3), ("sigmoid", 1), ("logit", 1)]
)
def test_with_probabilities_computes_what_to_probabilities_does(tmp_path, kind, units):
    """The wrapper's layers (the export's) and the NumPy conversion (predict's) agree,
    and the wrapped model keeps its name and reloads in safe mode."""
    activation = {"softmax": "softmax", "sigmoid": "sigmoid"}.get(kind)
    model = ending(units, activation)
    model.name = "mine"
    x = np.random.default_rng(1).random((6, 4, 4, 1), dtype=np.float32) * 3
    outputs = model.predict(x, verbose=0)
    wrapped = prediction.with_probabilities(model, kind)
    assert wrapped.name == "mine" and (wrapped is model) == (kind == "softmax")
    wrapped.save(tmp_path / "w.keras")
    probs = keras.saving.load_model(tmp_path / "w.keras", safe_mode=True).predict(x, verbose=0)
    np.testing.assert_allclose(probs, prediction.to_probabilities(outputs, kind), atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert probs.shape == (6, max(units, 2))
    if kind == "sigmoid":
        np.testing.assert_allclose(probs[:, 1], outputs[:, 0], atol=1e-6)


def test_read_pixels_scales_a_16_bit_grey_png_to_8_bits(tmp_path):
    """Pillow's convert() clips 16-bit grey to 255, which would make it all white."""
    grey = np.random.default_rng(3).integers(0, 256, (20, 24), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(grey * 257).save(tmp_path / "16.png")  # 255 -> 65535
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    for shape in ((32, 32, 3), (20, 24, 1)):
        eight = predict.read_pixels(tmp_path / "8.png", shape)
        np.testing.assert_array_equal(predict.read_pixels(tmp_path / "16.png", shape), eight)
    assert eight[..., 0].tolist() == grey.tolist()  # no resize: the very pixels


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_read_pixels_turns_a_photo_upright_by_its_exif_orientation(tmp_path, suffix):
    """A phone's portrait photo: landscape pixels and Orientation 6 (turn 90 degrees
    clockwise to view). The model must see what the viewer shows, not a sideways cat."""
    upright = np.zeros((40, 20, 3), np.uint8)  # 20 wide, 40 high
    upright[:20] = (250, 0, 0)  # red on top, blue below: wrong if seen sideways
    upright[20:] = (0, 0, 250)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    stored.save(tmp_path / f"phone{suffix}", exif=exif.tobytes())
    seen = predict.read_pixels(tmp_path / f"phone{suffix}", (40, 20, 3)).astype(int)
    away_from_the_edge = np.r_[0:16, 24:40]  # JPEG blurs colours across it
    assert np.abs(seen - upright)[away_from_the_edge].max() < 8
    plain = tmp_path / f"plain{suffix}"  # no tag: read as stored, red on the left
    stored.save(plain)
    seen = predict.read_pixels(plain, (20, 40, 3)).astype(int)
    assert np.abs(seen[:, :16] - (250, 0, 0)).max() < 8
    assert np.abs(seen[:, 24:] - (0, 0, 250)).max() < 8


def test_predict_takes_a_model_that_ends_in_logits(tmp_path, capsys):
    """As a TensorFlow tutorial saves it: the top classes of softmax(logits)."""
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.save(tmp_path / "logits.keras")
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)).save(image)
    x = data.scale(predict.read_pixels(image))[None]

    def softmax(logits):
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    assert predict.main(["--model", str(tmp_path / "logits.keras"), str(image)]) == 0
    assert capsys.readouterr().out == printed(image, softmax(model.predict(x, verbose=0)[0]))
    # --tta averages the original's and the mirror's probabilities, as combine --tta.
    assert predict.main(["--model", str(tmp_path / "logits.keras"), "--tta", str(image)]) == 0
    both = [softmax(model.predict(images, verbose=0)[0]) for images in (x, x[:, :, ::-1])]
    assert capsys.readouterr().out == printed(image, np.mean(both, axis=0))


def test_rescales_itself_finds_a_first_rescaling_or_normalization_to_0_255():
    """What predict's --pixels auto goes by: the first layer that changes values, past
    augmentation (off when predicting) and cropping, in nested models too."""

    def starts_with(*layers):
        return keras.Sequential([keras.Input((8, 8, 3)), *layers, keras.layers.Conv2D(2, 3)])

    augment = keras.Sequential([keras.layers.RandomFlip(), keras.layers.RandomRotation(0.1)])
    assert export.rescales_itself(starts_with(keras.layers.Rescaling(1 / 255)))
    assert export.rescales_itself(  # as Keras' fine-tuning example: augment, then rescale
        starts_with(augment, keras.layers.CenterCrop(6, 6), keras.layers.Rescaling(1 / 127.5, -1))
    )
    assert not export.rescales_itself(starts_with(keras.layers.Rescaling(255.0)))  # combine's
    assert not export.rescales_itself(starts_with(augment))
    assert not export.rescales_itself(nin_cnn(keras.Input((32, 32, 3))))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3)).astype("float32")
    for images, expected in ((pixels, True), (pixels / 255, False)):
        normalize = keras.layers.Normalization()
        normalize.adapt(images)
        assert export.rescales_itself(starts_with(normalize)) is expected


def test_predict_gives_an_exported_file_pixels_in_0_1_whatever_its_members_start_with(
    tmp_path, capsys
):
    """Every exported file takes [0, 1] images: --pixels auto does not look inside it."""
    inputs = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(10, "softmax")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    member = keras.Model(inputs, dense(pooled), name="rescaler")
    dense.set_weights([np.arange(-15, 15, dtype="float32").reshape(3, 10), np.zeros(10, "float32")])
    assert export.rescales_itself(member)
    export.export(tmp_path / "e.keras", [member, nin_cnn(inputs)], "average")
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    assert predict.main(["--model", str(tmp_path / "e.keras"), str(image)]) == 0
    out, err = capsys.readouterr()
    model = keras.saving.load_model(tmp_path / "e.keras")
    pixels = predict.read_pixels(image)
    images = {False: data.scale(pixels), True: pixels.astype("float32")}
    expected = {raw: printed(image, model.predict(images[raw][None], verbose=0)[0])
                for raw in (False, True)}  # fmt: skip
    assert out == expected[False] and err == ""
    assert expected[False] != expected[True]  # the scale shows in what is printed


@pytest.mark.parametrize("name", ["MobileNetV3Small", "EfficientNetB0", "ConvNeXtTiny", "ResNet50"])
def test_rescales_itself_knows_the_keras_applications_that_take_0_255(name):
    """The README's claim: MobileNetV3 and EfficientNet start with a Rescaling, ConvNeXt
    with a Normalization of 0..255 pixels; ResNet50 takes its caffe-style input from
    outside, so it is not found to rescale (predict's --pixels then decides)."""
    build = getattr(keras.applications, name)
    model = layers_only(lambda: build(weights=None, input_shape=(32, 32, 3), classes=10))
    assert export.rescales_itself(model) == (name != "ResNet50")


def layers_only(build):
    """`build()`'s model with its weights left undrawn, for tests of its layers alone: on
    JAX drawing them compiles an initializer for each weight shape (12 s for
    EfficientNetB0). Keras lists undrawn weights in its thread's state, to draw them at
    the next scope's end; built in a thread of its own, the list ends with the thread."""

    def undrawn():
        with keras.StatelessScope(initialize_variables=False):
            return build()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(undrawn).result()


def test_to_probabilities_of_extreme_scores_is_exact_and_raises_no_overflow():
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is right
        one = np.array([[-1000.0], [1000.0], [0.0]], "float32")
        np.testing.assert_allclose(
            prediction.to_probabilities(one, "logit"), [[1, 0], [0, 1], [0.5, 0.5]], atol=1e-7
        )
        many = np.array([[1000.0, -1000.0, 0.0], [5.0, 5.0, 5.0]], "float32")
        np.testing.assert_allclose(
            prediction.to_probabilities(many, "logits"), [[1, 0, 0], [1 / 3] * 3], atol=1e-7
        )
