"""`ensemble.py combine`: any saved classifiers scored and exported like the article's."""

import json
import re
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import SHAPES, write_grey_tree, write_tree

import data
import ensemble
from ensembling import combination, export, prediction, readers
from ensembling.cli import combine as combine_module
from ensembling.cli import predict
from models import nin_cnn


def small_classifier(classes=10, shape=(32, 32, 3), activation="softmax"):
    """Not one of the article's: combine takes any classifier of the right shapes."""
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(classes, activation=activation),
        ]
    )


@pytest.fixture
def saved(tmp_path):
    """Two saved classifiers, both named 'sequential'-like by Keras, and a data tree."""
    write_tree(tmp_path / "tree", train_per_class=8, test_per_class=3)
    (tmp_path / "mine").mkdir()
    paths = [tmp_path / "mine" / "nin.keras", tmp_path / "mine" / "small.keras"]
    nin_cnn(keras.Input(shape=(32, 32, 3))).save(paths[0])
    small_classifier().save(paths[1])
    return paths


def combine(tmp_path, *args):
    return ensemble.main(
        ["combine", *map(str, args), "--data-dir", str(tmp_path / "tree"),
         "--logs-dir", str(tmp_path / "logs")]
    )  # fmt: skip


def test_combine_scores_every_subset_of_saved_models_and_exports_one(tmp_path, saved, capsys):
    exported = tmp_path / "ensemble.keras"
    assert combine(tmp_path, *saved, "--combine", "weighted", "vote", "--export", exported) == 0
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    rows = {row["row"]: row for row in results["results"]}
    assert list(rows) == ["nin", "small", "nin+small", "nin+small (weighted)", "nin+small (vote)"]
    markdown = (tmp_path / "logs" / "combine.md").read_text().splitlines()
    assert len([line for line in markdown if line.startswith("| nin+small")]) == 3
    assert "nin+small (weighted)" in capsys.readouterr().out

    # The average row is the error of the mean of the two models' outputs, and the
    # exported file computes that mean.
    _, (x_test, y_test) = data.load_data(tmp_path / "tree")
    models = [keras.saving.load_model(path) for path in saved]
    mean = np.mean([m.predict(x_test, verbose=0) for m in models], axis=0)
    assert rows["nin+small"]["test_error"] == pytest.approx(
        np.mean(mean.argmax(axis=1) != y_test[:, 0])
    )
    reloaded = keras.saving.load_model(exported)
    np.testing.assert_allclose(reloaded.predict(x_test, verbose=0), mean, atol=1e-6)
    assert [layer.name for layer in reloaded.layers][1:3] == ["nin", "small"]
    # Each class's test error, of each model and of their average.
    per_class = results["per_class_errors"]
    assert list(per_class) == ["classes", "nin", "small", "nin+small"]
    expected = [np.mean(mean.argmax(1)[y_test[:, 0] == k] != k) for k in range(10)]
    assert per_class["nin+small"] == pytest.approx(expected)
    assert "| class | nin | small | nin+small |" in "\n".join(markdown)


def test_cost_measures_each_model_the_ensemble_of_all_and_the_exported_file(
    tmp_path, saved, capsys
):
    exported = tmp_path / "e.keras"
    assert combine(tmp_path, *saved, "--cost", "--export", exported) == 0
    out = capsys.readouterr().out
    costs = json.loads((tmp_path / "logs" / "combine.json").read_text())["costs"]
    assert list(costs) == ["nin", "small", "nin+small", "e.keras (average)"]
    models = [keras.saving.load_model(path) for path in saved]
    for name, path, model in zip(("nin", "small"), saved, models, strict=True):
        assert costs[name]["weight_bytes"] == path.stat().st_size
        assert costs[name]["parameters"] == model.count_params()
        assert costs[name]["latency_ms"] > 0 and costs[name]["images_per_second"] > 0
    both = sum(model.count_params() for model in models)
    assert costs["nin+small"]["parameters"] == costs["e.keras (average)"]["parameters"] == both
    assert costs["e.keras (average)"]["weight_bytes"] == exported.stat().st_size
    ratio = costs["nin+small"]["latency_ms"] / (
        costs["nin"]["latency_ms"] + costs["small"]["latency_ms"]
    )
    assert costs["nin+small"]["latency_vs_members"] == pytest.approx(ratio)
    assert "\ncost on " in out and "file MB" in out and "e.keras (average)" in out
    # Off by default: models of one's own may be large, and the table is the point.
    assert combine(tmp_path, *saved) == 0
    assert "costs" not in json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert "cost on" not in capsys.readouterr().out


def test_save_probs_writes_what_the_table_is_scored_from(tmp_path, saved, capsys, monkeypatch):
    path = tmp_path / "logs" / "probs.npz"  # in --logs-dir, which combine creates
    assert combine(tmp_path, *saved, "--save-probs", path) == 0
    assert f"probabilities saved to {path}" in capsys.readouterr().out
    arrays = np.load(path)  # no pickle needed: strings are NumPy's own
    assert list(arrays["names"]) == ["nin", "small"]
    assert list(arrays["classes"]) == list(data.CLASS_NAMES)
    ((x_val, y_val), (x_test, y_test)), _, _ = data.load_labelled(tmp_path / "tree")
    models = [keras.saving.load_model(p) for p in saved]
    for split, images, labels in (("test", x_test, y_test[:, 0]), ("val", x_val, y_val.argmax(1))):
        expected = np.stack([m.predict(images, verbose=0) for m in models])
        np.testing.assert_allclose(arrays[f"{split}_probs"], expected, atol=1e-6)
        np.testing.assert_array_equal(arrays[f"{split}_labels"], labels)
    # docs/saved-models.md's example, run as written: the average row's error from the file.
    readme = (Path(__file__).resolve().parents[1] / "docs" / "saved-models.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme.split("--save-probs PATH.npz", 1)[1], re.S)
    monkeypatch.chdir(tmp_path)
    exec(textwrap.dedent(example.group(1)), {})
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert rows[2]["row"] == "nin+small"
    assert float(capsys.readouterr().out) == pytest.approx(rows[2]["test_error"])
    # Refused before any work, as --export is; nothing written.
    for bad, message in ((tmp_path / "probs.csv", "must end in .npz"),
                         (tmp_path / "no" / "p.npz", "does not exist")):  # fmt: skip
        assert combine(tmp_path, *saved, "--save-probs", bad) == 2
        assert message in capsys.readouterr().err and not bad.exists()
    # Nor onto the data it reads: an .npz of keras.datasets' arrays, as mnist.npz is.
    (x_train, y_train), (x_test, y_test) = data.load_data(tmp_path / "tree")
    npz = tmp_path / "cifar.npz"
    pixels = {"x_train": x_train, "x_test": x_test}
    np.savez(npz, **{k: np.round(v * 255).astype(np.uint8) for k, v in pixels.items()},
             y_train=y_train.argmax(1)[:, None], y_test=y_test)  # fmt: skip
    before = npz.read_bytes()
    argv = ["combine", *map(str, saved), "--data-dir", str(npz), "--save-probs", str(npz)]
    assert ensemble.main(argv) == 2
    assert "is the --data-dir this command reads, which it would replace" in (
        capsys.readouterr().err
    )
    assert npz.read_bytes() == before


def test_members_exported_by_runs_of_two_seeds_combine_into_a_seeds_ensemble(tmp_path, capsys):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    singles = {}
    for seed in ("1", "2"):
        run = tmp_path / f"seed{seed}"
        argv = ["--data-dir", str(tmp_path / "tree"), "--models", "nin_cnn", "all_cnn",
                "--epochs", "1", "--seed", seed, "--no-cost", "--weights-dir", str(run / "w"),
                "--logs-dir", str(run / "l"),
                "--export-members", str(tmp_path / "members" / f"seed{seed}")]  # fmt: skip
        assert ensemble.main(argv) == 0
        out = capsys.readouterr().out
        assert (
            f"members exported to {tmp_path / 'members' / f'seed{seed}' / 'nin_cnn.keras'}, " in out
        )
        results = json.loads((run / "l" / "results.json").read_text())
        singles.update({f"seed{seed}_{row['members'][0]}": row["nll"]
                        for row in results["results"] if len(row["members"]) == 1})  # fmt: skip
    files = sorted(tmp_path.glob("members/seed*/*.keras"))
    assert combine(tmp_path, *files) == 0
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    # Each file is the member its run scored: the same NLL, here and there (the
    # errors would agree anyway: one epoch on 40 images leaves them all at chance).
    assert {row["row"]: row["nll"] for row in rows[:4]} == pytest.approx(singles, abs=1e-6)
    assert len(set(singles.values())) == 4
    assert rows[-1]["row"] == "seed1_all_cnn+seed1_nin_cnn+seed2_all_cnn+seed2_nin_cnn"
    # The --export-members folders themselves stand for their model files, by name;
    # a checkpoint or a hidden file beside them is not a model.
    (tmp_path / "members" / "seed1" / "nin_cnn.01-2.30.weights.h5").write_bytes(b"weights")
    (tmp_path / "members" / "seed2" / ".nin_cnn.keras").write_bytes(b"macOS fork")
    assert combine(tmp_path, tmp_path / "members" / "seed1", tmp_path / "members" / "seed2") == 0
    again = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert [row["row"] for row in again] == [row["row"] for row in rows]
    # And the folder of those folders stands for all of them; a hidden folder (an
    # editor's or a file manager's) is not looked into.
    (tmp_path / "members" / ".trash").mkdir()
    (tmp_path / "members" / ".trash" / "old.keras").write_bytes(b"deleted")
    assert combine(tmp_path, tmp_path / "members") == 0
    again = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert [row["row"] for row in again] == [row["row"] for row in rows]


def test_models_of_one_file_name_are_told_apart_by_their_folders(tmp_path, saved, capsys):
    # Seeds of one model, each run saving model.keras in a folder of its own.
    for seed in ("seed1", "seed2"):
        (tmp_path / "runs" / seed).mkdir(parents=True)
        keras.saving.load_model(saved[1]).save(tmp_path / "runs" / seed / "small.keras")
    models = [*saved, *(tmp_path / "runs" / seed / "small.keras" for seed in ("seed1", "seed2"))]
    assert combine(tmp_path, *models, "--export", tmp_path / "all.keras") == 0
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert [row["row"] for row in rows[:4]] == ["nin", "mine_small", "seed1_small", "seed2_small"]
    nested = [layer.name for layer in keras.saving.load_model(tmp_path / "all.keras").layers]
    assert nested[1:5] == ["nin", "mine_small", "seed1_small", "seed2_small"]


def test_file_names_tensorflow_would_refuse_as_model_names_are_tidied(tmp_path, saved):
    # TensorFlow's name scopes refuse spaces and a leading "_"; files are named freely.
    paths = [tmp_path / "my model.keras", tmp_path / "run 1" / "_draft.keras"]
    paths[1].parent.mkdir()
    for source, path in zip(saved, paths, strict=True):
        keras.saving.load_model(source).save(path)
    assert combine(tmp_path, *paths, "--export", tmp_path / "out.keras") == 0
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert [row["row"] for row in rows] == ["my_model", "draft", "my_model+draft"]
    nested = [layer.name for layer in keras.saving.load_model(tmp_path / "out.keras").layers]
    assert nested[1:3] == ["my_model", "draft"]
    # Names that differ only in what is tidied are numbered.
    twins = [tmp_path / "a b.keras", tmp_path / "a_b.keras"]
    assert combine_module.model_names(twins) == ["a_b_1", "a_b_2"]


def test_a_mixed_precision_model_whose_softmax_is_bfloat16_is_taken(tmp_path, saved):
    # Its rows sum to one within 2^-8 or so, which the check for logits must allow.
    # Every weight is seeded: the precondition below must not depend on test order.
    glorot = keras.initializers.GlorotUniform(seed=0)
    bf16 = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(
                4, 3, activation="relu", dtype="mixed_bfloat16", kernel_initializer=glorot
            ),
            keras.layers.GlobalAveragePooling2D(dtype="mixed_bfloat16"),
            keras.layers.Dense(
                10,
                activation="softmax",
                dtype="mixed_bfloat16",
                kernel_initializer=glorot,
                # Confident rows: bfloat16's steps are widest near one.
                bias_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=1),
            ),
        ]
    )
    images = np.random.default_rng(0).random((64, 32, 32, 3), np.float32)
    outputs = bf16.predict(images, verbose=0)
    assert (
        outputs.dtype.itemsize == 2 and np.abs(outputs.astype(np.float32).sum(1) - 1).max() > 1e-3
    )
    bf16.save(tmp_path / "bf16.keras")
    assert combine(tmp_path, saved[0], tmp_path / "bf16.keras", "--combine", "weighted") == 0
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert [row["row"] for row in rows] == ["nin", "bf16", "nin+bf16", "nin+bf16 (weighted)"]
    assert all(np.isfinite(row["nll"]) for row in rows)


def pixel_reader(rescales=False, activation="softmax"):
    """Reads the class from pixel (0, 0)'s red value, 25 * class (conftest): no error.

    With `rescales`, it divides its input by 255 first, as Keras' examples do, and so
    wants pixels in 0..255; given the article's [0, 1], it is at chance. With
    `activation=None` it ends in logits, as the TensorFlow tutorials' models do.
    """
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs) if rescales else inputs
    x = keras.layers.Flatten()(keras.layers.Cropping2D(((0, 31), (0, 31)))(x))
    dense = keras.layers.Dense(10, activation=activation)
    model = keras.Model(inputs, dense(x), name="rescales" if rescales else "reads")
    # logit k = 625 (c^2 - (k - c)^2) for red = 25 c / 255: largest at k = c.
    k = np.arange(10)
    kernel = np.stack([12750.0 * k, 0 * k, 0 * k]).astype("float32")
    dense.set_weights([kernel, (-625.0 * k**2).astype("float32")])
    return model


def test_a_model_that_rescales_its_input_itself_is_given_0_to_255(tmp_path, capsys):
    """Keras' examples train on 0..255 pixels behind a Rescaling(1/255): on [0, 1] such a
    model is at chance. Found so on the validation images, it is given 0..255, in the
    table and in the export; a model at chance on both scales gets a note instead."""
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    paths = [tmp_path / "reads.keras", tmp_path / "rescales.keras", tmp_path / "blind.keras"]
    pixel_reader().save(paths[0])
    pixel_reader(rescales=True).save(paths[1])
    blind = small_classifier()
    blind.layers[-1].set_weights([np.zeros((4, 10), "float32"), np.zeros(10, "float32")])
    blind.save(paths[2])  # the same answer for every image, whatever its scale
    exported = tmp_path / "e.keras"
    assert combine(tmp_path, *paths, "--export", exported) == 0
    out = capsys.readouterr().out
    assert "note: model rescales is at chance on pixels in [0, 1] but not on 0..255" in out
    assert "note: model blind is at chance level (test error 0.90), on pixels in [0, 1]" in out
    assert "note: model reads" not in out
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["raw_pixels"] == ["rescales"] and results["at_chance"] == ["blind"]
    rows = {row["row"]: row for row in results["results"]}
    assert rows["reads"]["test_error"] == rows["rescales"]["test_error"] == 0.0

    # The exported file takes [0, 1] images and gives the rescaling model 0..255.
    _, (x_test, _) = data.load_data(tmp_path / "tree")
    models = [keras.saving.load_model(path) for path in paths]
    scales = (1, 255, 1)
    outputs = [m.predict(x_test * k, verbose=0) for m, k in zip(models, scales, strict=True)]
    mean = np.mean(outputs, axis=0)
    np.testing.assert_allclose(
        keras.saving.load_model(exported).predict(x_test, verbose=0), mean, atol=1e-6
    )


def test_combine_takes_fully_convolutional_and_legacy_h5_models(tmp_path, saved):
    """Any size of image (None x None x 3) fits 32x32x3; Keras 2's .h5 format loads too."""
    any_size = tmp_path / "any_size.keras"
    small_classifier(shape=(None, None, 3)).save(any_size)
    legacy = tmp_path / "legacy.h5"
    keras.saving.load_model(saved[0]).save(legacy)
    exported = tmp_path / "ensemble.keras"
    assert combine(tmp_path, any_size, legacy, "--export", exported) == 0

    # The fully convolutional member comes first, yet the file takes 32x32x3 images,
    # as its other member needs, and computes the mean of the two.
    reloaded = keras.saving.load_model(exported)
    assert tuple(reloaded.input_shape) == (None, 32, 32, 3)
    _, (x_test, _) = data.load_data(tmp_path / "tree")
    models = [keras.saving.load_model(path) for path in (any_size, legacy)]
    mean = np.mean([m.predict(x_test, verbose=0) for m in models], axis=0)
    np.testing.assert_allclose(reloaded.predict(x_test, verbose=0), mean, atol=1e-6)


@pytest.mark.parametrize("every", [False, True], ids=["default", "--every-subset"])
def test_many_models_score_each_all_but_each_and_all_unless_asked_for_every_subset(
    tmp_path, capsys, every
):
    # Seven seeds of one model, say: 127 subsets would be minutes under the fitted rules.
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=2)
    paths = []
    for seed in range(7):
        keras.utils.set_random_seed(seed)
        paths.append(tmp_path / f"seed{seed}.keras")
        small_classifier().save(paths[-1])
    flags = ["--every-subset"] if every else []
    assert combine(tmp_path, *paths, "--combine", "weighted", *flags) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    averaged = [row["members"] for row in rows if row["rule"] == "average"]
    if every:
        assert len(averaged) == 127 and "too many" not in out
    else:
        assert "7 models make 127 subsets, too many to score in good time" in out
        assert "(--every-subset scores every one; --combine select picks one)" in out
        assert [len(m) for m in averaged] == [1] * 7 + [6] * 7 + [7]
    weighted = [row for row in rows if row["rule"] == "weighted"]
    assert len(weighted) == len(averaged) - 7  # every ensemble, not the single models
    # Rows of many members are named for what they hold, or leave out; the members
    # themselves are listed under "members".
    assert weighted[-1]["row"] == "all 7 (weighted)"
    assert weighted[-1]["members"] == [f"seed{i}" for i in range(7)]
    if not every:
        assert [row["row"] for row in weighted[:2]] == ["all but seed6 (weighted)",
                                                        "all but seed5 (weighted)"]  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("one model", "combine needs at least two models"),
        ("same file twice", "is given twice; give each model once"),
        ("grey, any size", "nin.keras takes 3-channel images and model GREY takes 1-channel"),
        ("other classes", "nin.keras scores 10 classes and model FIVE scores 5 classes"),
        ("not images", "maps 784 to 10; this needs one input of grey or RGB images"),
        ("missing", "model MISSING does not exist"),
        ("saved model folder", "resnet is a TensorFlow SavedModel folder, which Keras 3 cannot"),
        ("empty folder", "folder EMPTY holds no model files (.keras or .h5); give the models"),
        ("sigmoids", "sigmoids.keras scores each class with a sigmoid of its own"),
        ("not .keras", "--export ensemble.h5 must end in .keras"),
        ("negative seed", "--seed must lie between 0 and 4294967295"),
        ("logs-dir is a file", "logs is a file, not a folder"),
        ("export to a folder", "out.keras is a folder; give a file name ending in .keras"),
        ("export onto a model", "nin.keras is one of the models to combine, which it would"),
        ("empty data-dir", "--data-dir is empty (an unset shell variable?)"),
    ],
)
def test_combine_bad_input_is_one_line_exit_2(tmp_path, saved, capsys, case, message):
    args = list(saved)
    if case == "one model":
        args = saved[:1]
    elif case == "same file twice":
        args.append(tmp_path / "mine" / ".." / "mine" / "nin.keras")
    elif case == "grey, any size":
        args.append(tmp_path / "grey.keras")
        small_classifier(shape=(None, None, 1)).save(args[-1])
        message = message.replace("GREY", str(args[-1]))
    elif case == "other classes":
        args.append(tmp_path / "five.keras")
        small_classifier(5).save(args[-1])
        message = message.replace("FIVE", str(args[-1]))
    elif case == "not images":
        args.append(tmp_path / "flat.keras")
        keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, "softmax")]).save(args[-1])
    elif case == "sigmoids":  # a multi-label model: no one class per image
        args.append(tmp_path / "sigmoids.keras")
        small_classifier(activation="sigmoid").save(args[-1])
    elif case == "saved model folder":  # tf.keras 2's model.save("resnet")
        args.append(tmp_path / "resnet")
        (args[-1] / "variables").mkdir(parents=True)
        (args[-1] / "saved_model.pb").write_bytes(b"\x08\x01")
    elif case == "empty folder":  # a checkpoint is not a model file
        args.append(tmp_path / "weights")
        args[-1].mkdir()
        (args[-1] / "nin.01-2.30.weights.h5").write_bytes(b"weights")
        message = message.replace("EMPTY", str(args[-1]))
    elif case == "missing":
        args.append(tmp_path / "gone.keras")
        message = message.replace("MISSING", str(args[-1]))
    elif case == "not .keras":
        args += ["--export", "ensemble.h5"]
    elif case == "negative seed":
        args += ["--seed", "-1"]
    elif case == "export to a folder":
        (tmp_path / "out.keras").mkdir()
        args += ["--export", tmp_path / "out.keras"]
    elif case == "export onto a model":  # the user's model, lost before this check
        before = saved[0].read_bytes()
        args += ["--export", tmp_path / "mine" / ".." / "mine" / "nin.keras"]
    elif case != "empty data-dir":
        (tmp_path / "logs").write_text("a file where the folder should be")
    if case == "empty data-dir":  # --data-dir "$DATA" with DATA unset, after combine()'s own
        logs = ["--logs-dir", str(tmp_path / "logs")]
        code = ensemble.main(["combine", *map(str, args), *logs, "--data-dir", ""])
    else:
        code = combine(tmp_path, *args)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble.py combine: error:") and message in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "logs" / "combine.json").exists()
    assert case != "logs-dir is a file" or (tmp_path / "logs").is_file()  # left as it was
    assert case != "export onto a model" or saved[0].read_bytes() == before


def test_a_model_that_ends_in_logits_is_scored_and_exported_behind_a_softmax(tmp_path, capsys):
    """The TensorFlow tutorials end their models in Dense(10), trained from_logits=True.
    Such a model is scored on softmax(logits), with --tta on the mean of the original's
    and the mirror's probabilities, not of their logits; the export computes the same."""
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    paths = [tmp_path / "reads.keras", tmp_path / "logits.keras"]
    pixel_reader().save(paths[0])
    pixel_reader(activation=None).save(paths[1])
    exported = tmp_path / "e.keras"
    assert combine(tmp_path, *paths, "--tta", "--export", exported) == 0
    assert "note: model logits outputs logits: it is scored, and exported, behind a softmax" in (
        capsys.readouterr().out
    )
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["outputs"] == {"reads": "softmax", "logits": "logits"}
    assert results["at_chance"] == results["raw_pixels"] == []
    rows = {row["row"]: row for row in results["results"]}

    _, (x_test, y_test) = data.load_data(tmp_path / "tree")
    logits = keras.saving.load_model(paths[1])
    probs = [keras.ops.convert_to_numpy(keras.ops.softmax(logits.predict(x, verbose=0)))
             for x in (x_test, prediction.flip(x_test))]  # fmt: skip
    mean = np.mean(probs, axis=0)
    labels = y_test[:, 0]
    assert rows["logits"]["test_error"] == pytest.approx(np.mean(mean.argmax(1) != labels))
    nll = -np.mean(np.log(mean[np.arange(len(labels)), labels]))
    assert rows["logits"]["nll"] == pytest.approx(nll, rel=1e-3)
    # The exported file (no TTA in it) averages the reader with softmax(logits).
    reads = keras.saving.load_model(paths[0]).predict(x_test, verbose=0)
    np.testing.assert_allclose(
        keras.saving.load_model(exported).predict(x_test, verbose=0),
        (reads + probs[0]) / 2,
        atol=1e-5,
    )


def binary_reader(activation, rescales=False):
    """Reads write_grey_tree's two classes (pixel (0, 0) = 0 or 100) with one unit, as
    Keras' binary examples end: z = 51 x - 10, -10 for class 0 and +10 for class 1."""
    inputs = keras.Input((12, 10, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs) if rescales else inputs
    x = keras.layers.Flatten()(keras.layers.Cropping2D(((0, 11), (0, 9)))(x))
    dense = keras.layers.Dense(1, activation=activation)
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.array([[51.0]], "float32"), np.array([-10.0], "float32")])
    return model


def test_a_binary_classifier_of_one_unit_scores_two_classes(tmp_path, capsys):
    """One sigmoid unit is p for class 1 and 1 - p for class 0; one logit unit is that
    after a sigmoid (Keras' image classification example, behind its own Rescaling(1/255),
    so given 0..255). Beside a two-unit softmax model, scored, exported and predicted."""
    tree = write_grey_tree(
        tmp_path / "tree", splits=("train", "test", "val"), classes=("square", "circle")
    )
    paths = [tmp_path / f"{name}.keras" for name in ("sigmoid", "logit", "rescales", "softmax")]
    binary_reader("sigmoid").save(paths[0])
    binary_reader(None).save(paths[1])
    binary_reader(None, rescales=True).save(paths[2])
    small_classifier(2, (12, 10, 1)).save(paths[3])
    exported = tmp_path / "e.keras"
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--combine", "stack",
            "--logs-dir", str(tmp_path / "logs"), "--export", str(exported)]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    assert "note: model sigmoid outputs one sigmoid unit: its p scores class 1" in out
    assert "note: model logit outputs one logit unit: its sigmoid p scores class 1" in out
    assert "note: model rescales is at chance on pixels in [0, 1] but not on 0..255" in out
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["classes"] == ["circle", "square"]
    assert results["outputs"] == {
        "sigmoid": "sigmoid", "logit": "logit", "rescales": "logit", "softmax": "softmax"
    }  # fmt: skip
    assert results["raw_pixels"] == ["rescales"]
    rows = {row["row"]: row for row in results["results"]}
    assert rows["sigmoid"]["test_error"] == rows["logit"]["test_error"] == 0.0
    assert rows["rescales"]["test_error"] == rows["sigmoid+logit+rescales"]["test_error"] == 0.0

    # The file averages [1 - p, p] of each unit (on 0..255 for rescales) with the softmax.
    ((_, _), (x_test, _)), _, _ = data.load_labelled(tree, channels=1)
    models = [keras.saving.load_model(path) for path in paths]

    def sigmoid(model, x):
        return 1 / (1 + np.exp(-model.predict(x, verbose=0)))

    p = [models[0].predict(x_test, verbose=0), sigmoid(models[1], x_test)]
    p.append(sigmoid(models[2], x_test * 255))
    two = [np.concatenate([1 - q, q], axis=1) for q in p]
    expected = np.mean([*two, models[3].predict(x_test, verbose=0)], axis=0)
    np.testing.assert_allclose(
        keras.saving.load_model(exported).predict(x_test, verbose=0), expected, atol=1e-5
    )
    image = tree / "test" / "square" / "0001.png"
    assert predict.main(["--model", str(exported), str(image), "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: square ")
    # predict takes a one-unit file of its own too: two classes.
    assert predict.main(["--model", str(paths[1]), str(image)]) == 0
    assert capsys.readouterr().out == f"{image}: class 1 1.000, class 0 0.000\n"
    # One that rescales its input itself is given 0..255, unless --pixels says otherwise.
    assert predict.main(["--model", str(paths[2]), str(image)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{image}: class 1 1.000, class 0 0.000\n"
    assert "rescales.keras rescales its input itself: it is given pixels in 0..255" in err
    assert predict.main(["--model", str(paths[2]), "--pixels", "0-1", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{image}: class 0 1.000, class 1 0.000\n" and err == ""


def grey_reader():
    """Reads the class of write_grey_tree's images from pixel (0, 0), 100 * class: no error."""
    inputs = keras.Input((12, 10, 1))
    x = keras.layers.Flatten()(keras.layers.Cropping2D(((0, 11), (0, 9)))(inputs))
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, dense(x), name="reader")
    # logit k = 625 (c^2 - (k - c)^2) for the pixel 100 c / 255: largest at k = c.
    k = np.arange(3)
    dense.set_weights([(3187.5 * k)[None].astype("float32"), (-625.0 * k**2).astype("float32")])
    return model


def test_combine_ensembles_classifiers_of_any_labelled_images(tmp_path, capsys):
    """Not CIFAR-10: three classes of 12x10 grey images, the classes named by their folders,
    the weights fitted on the tree's own val/ folder, all the way to an exported file
    whose predictions `predict` prints by those names."""
    tree = write_grey_tree(tmp_path / "tree", per_class=4, splits=("train", "test", "val"))
    paths = [tmp_path / "reader.keras", tmp_path / "small.keras"]
    grey_reader().save(paths[0])
    small_classifier(3, (12, 10, 1)).save(paths[1])
    exported = tmp_path / "shapes.keras"
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--combine", "weighted",
            "--logs-dir", str(tmp_path / "logs"), "--export", str(exported),
            "--export-rule", "weighted"]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 models, 3 classes, 12 test images, 12 validation images (val/)" in out
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["classes"] == sorted(SHAPES) and results["validation_images"] == "val/"
    rows = {row["row"]: row for row in results["results"]}
    assert rows["reader"]["test_error"] == 0.0
    assert "reader" not in results["at_chance"]  # 0 against chance's 2/3

    ((x_val, y_val), (x_test, y_test)), _, _ = data.load_labelled(tree, channels=1)
    models = [keras.saving.load_model(path) for path in paths]
    mean = np.mean([m.predict(x_test, verbose=0) for m in models], axis=0)
    assert rows["reader+small"]["test_error"] == pytest.approx(
        np.mean(mean.argmax(1) != y_test[:, 0])
    )
    val_probs = [m.predict(x_val, verbose=0) for m in models]
    weights = combination.fit_weights(val_probs, y_val.argmax(1))
    np.testing.assert_allclose(results["export"]["weights"], weights, atol=1e-5)
    reloaded = keras.saving.load_model(exported)
    assert tuple(reloaded.input_shape) == (None, 12, 10, 1)
    assert export.class_names(exported, 3) == sorted(SHAPES)

    # The exported file names its classes: predict prints them, not CIFAR-10's.
    image = tree / "test" / "triangle" / "0002.png"
    assert predict.main(["--model", str(exported), str(image), "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: triangle ")
    # By default the top 3, or every class of fewer: both of two.
    small_classifier(2, (12, 10, 1)).save(tmp_path / "two.keras")
    assert predict.main(["--model", str(tmp_path / "two.keras"), str(image)]) == 0
    ranked = capsys.readouterr().out.split(": ", 1)[1].split(", ")
    assert sorted(item.rsplit(" ", 1)[0] for item in ranked) == ["class 0", "class 1"]
    # A file that names none: CIFAR-10's classes for ten, numbers otherwise, or --classes.
    assert predict.main(["--model", str(paths[0]), str(image), "--top", "1"]) == 0
    assert capsys.readouterr().out == f"{image}: class 2 1.000\n"
    named = ["--classes", "o,[],^", "--top", "1"]  # before the images too
    assert predict.main(["--model", str(paths[0]), *named, str(image)]) == 0
    assert capsys.readouterr().out == f"{image}: ^ 1.000\n"


def test_ensemble_selection_keeps_what_helps_and_exports_only_that(tmp_path, capsys):
    """`select` leaves out the models that do not lower the validation NLL: here all
    but a perfect reader. The note names what it kept, and the file holds only that."""
    tree = write_grey_tree(tmp_path / "tree", per_class=4, splits=("train", "test", "val"))
    paths = [tmp_path / f"{name}.keras" for name in ("reader", "small", "uniform")]
    grey_reader().save(paths[0])
    small_classifier(3, (12, 10, 1)).save(paths[1])
    flat = [keras.Input((12, 10, 1)), keras.layers.Flatten()]
    uniform = keras.Sequential(
        [*flat, keras.layers.Dense(3, "softmax", kernel_initializer="zeros")]
    )
    uniform.save(paths[2])
    exported = tmp_path / "selected.keras"
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--combine", "select",
            "--logs-dir", str(tmp_path / "logs"), "--export", str(exported),
            "--export-rule", "select", "--cost"]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    assert ("reader+small+uniform (select) kept reader 1.00 (their weights); left out "
            "small, uniform\n") in out  # fmt: skip
    assert f"ensemble exported to {exported} (select: reader)" in out
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    rows = {row["row"]: row for row in results["results"]}
    assert rows["reader+small+uniform (select)"]["weights"] == [1.0, 0.0, 0.0]
    assert rows["reader+small+uniform (select)"]["test_error"] == 0.0
    assert results["export"]["kept"] == ["reader"]
    # The file costs what the one model it holds does, not what all three do.
    costs = results["costs"]
    assert costs["selected.keras (select)"]["parameters"] == costs["reader"]["parameters"]
    assert costs["reader+small+uniform"]["parameters"] > costs["reader"]["parameters"]
    latency = costs["selected.keras (select)"]["latency_ms"] / costs["reader"]["latency_ms"]
    assert costs["selected.keras (select)"]["latency_vs_members"] == pytest.approx(latency)
    reloaded = keras.saving.load_model(exported)
    assert [layer.name for layer in reloaded.layers if isinstance(layer, keras.Model)] == ["reader"]
    _, (x_test, _) = data.load_labelled(tree, channels=1)[0]
    expected = keras.saving.load_model(paths[0]).predict(x_test, verbose=0)
    np.testing.assert_allclose(reloaded.predict(x_test, verbose=0), expected, atol=1e-6)


def test_combine_temperature_calibrates_every_row_on_the_validation_images(tmp_path, capsys):
    tree = write_grey_tree(tmp_path / "tree", per_class=4, splits=("train", "test", "val"))
    paths = [tmp_path / f"{name}.keras" for name in ("reader", "small")]
    grey_reader().save(paths[0])
    small_classifier(3, (12, 10, 1)).save(paths[1])
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--combine", "temperature",
            "--logs-dir", str(tmp_path / "logs")]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    plain = [row for row in rows if row["rule"] == "average"]
    calibrated = [row for row in rows if row["rule"] == "temperature"]
    assert [r["row"] for r in calibrated] == [f"{r['row']} (temperature)" for r in plain]
    for before, after in zip(plain, calibrated, strict=True):
        assert after["test_error"] == before["test_error"]  # the same classes
        assert after["temperature"] > 0
    each = ", ".join(f"{r['row'].removesuffix(' (temperature)')} {r['temperature']:.2f}"
                     for r in calibrated)  # fmt: skip
    assert f"(above 1: overconfident before): {each}\n" in out
    # It is scored, not exported: refused before any model is read.
    refused = ["combine", *map(str, paths), "--data-dir", str(tree), "--export",
               str(tmp_path / "t.keras"), "--export-rule", "temperature"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        ensemble.main(refused)
    assert stopped.value.code == 2
    assert "invalid choice: 'temperature'" in capsys.readouterr().err
    assert not (tmp_path / "t.keras").exists()


def write_photos(root):
    """val/ and test/ of red cats and blue dogs, photos of eight sizes: a tree of models
    trained elsewhere (no train/ needed)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for split in ("val", "test"):
        for label, colour in (("cat", (200, 60, 40)), ("dog", (40, 60, 200))):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                noise = rng.integers(-30, 30, (20 + 7 * i, 31 - 3 * i, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def colour_reader(size, name="reader"):
    """Mean red minus mean blue, of images of `size`: cat (class 0) when red, dog when blue."""
    inputs = keras.Input((*size, 3))
    dense = keras.layers.Dense(2, activation="softmax")
    reader = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)), name=name)
    dense.set_weights([np.array([[9, -9], [0, 0], [-9, 9]], "float32"), np.zeros(2, "float32")])
    return reader


def test_combine_resizes_a_trees_photos_to_the_models_input_as_keras_does(tmp_path, capsys):
    """Photos of many sizes, as the TensorFlow tutorials' cats and dogs, for models that
    trained on them through image_dataset_from_directory(image_size=(16, 16))."""
    from PIL import Image

    write_photos(tmp_path / "tree")
    paths = [tmp_path / "reader.keras", tmp_path / "small.keras"]
    colour_reader((16, 16)).save(paths[0])
    small_classifier(2, (16, 16, 3)).save(paths[1])
    argv = ["combine", *map(str, paths), "--data-dir", str(tmp_path / "tree"),
            "--logs-dir", str(tmp_path / "logs")]  # fmt: skip
    assert ensemble.main(argv) == 0
    assert "2 models, 2 classes, 8 test images, 8 validation images (val/)" in (
        capsys.readouterr().out
    )
    rows = json.loads((tmp_path / "logs" / "combine.json").read_text())["results"]
    assert rows[0]["row"] == "reader" and rows[0]["test_error"] == 0.0
    # The pixels are Keras' bilinear resize, to the nearest value: what the models saw.
    (_, (x_test, y_test)), _, _ = data.load_labelled(tmp_path / "tree", size=(16, 16))
    assert x_test.shape == (8, 16, 16, 3)
    first = np.asarray(Image.open(tmp_path / "tree" / "test" / "cat" / "0.png"), "float32")
    keras_resized = keras.ops.image.resize(first[None], (16, 16), interpolation="bilinear")
    np.testing.assert_allclose(x_test[0] * 255, keras.ops.convert_to_numpy(keras_resized)[0],
                               atol=0.5 + 1e-3)  # fmt: skip
    # Without a size, as for fully convolutional models, the sizes must agree.
    with pytest.raises(data.DataError, match="the images must share one size"):
        data.load_labelled(tmp_path / "tree")


def test_models_of_different_input_sizes_are_given_the_largest_through_a_resizing(tmp_path, capsys):
    """A 24x24 model beside a 16x16 one (and one of any size): the tree is read at 24x24,
    and the smaller one takes it through a Resizing layer, in the table and the file."""
    tree = write_photos(tmp_path / "tree")
    paths = [tmp_path / "small.keras", tmp_path / "large.keras", tmp_path / "any.keras"]
    colour_reader((16, 16)).save(paths[0])
    colour_reader((24, 24)).save(paths[1])
    small_classifier(2, (None, None, 3)).save(paths[2])
    exported = tmp_path / "e.keras"
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--export", str(exported),
            "--logs-dir", str(tmp_path / "logs")]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    assert "note: model small takes 16x16 images: it is given the 24x24 images through a " in out
    assert "model large takes" not in out and "model any takes" not in out
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["resized_inputs"] == {"small": [16, 16]}
    rows = {row["row"]: row for row in results["results"]}
    assert rows["small"]["test_error"] == rows["large"]["test_error"] == 0.0

    (_, (x_test, _)), _, _ = data.load_labelled(tree, size=(24, 24))
    resized = keras.layers.Resizing(16, 16, interpolation="bilinear")(x_test)
    models = [keras.saving.load_model(path) for path in paths]
    outputs = [models[0].predict(resized, verbose=0)]
    outputs += [model.predict(x_test, verbose=0) for model in models[1:]]
    reloaded = keras.saving.load_model(exported)
    assert tuple(reloaded.input_shape) == (None, 24, 24, 3)
    np.testing.assert_allclose(
        reloaded.predict(x_test, verbose=0), np.mean(outputs, axis=0), atol=1e-6
    )


@pytest.mark.parametrize(
    "sizes, read", [((16, 48), 32), ((16, 24), 24)], ids=["own size", "larger than all"]
)
def test_a_tree_of_one_size_is_read_at_it_for_models_of_several_sizes(
    tmp_path, capsys, sizes, read
):
    """CIFAR-10's 32x32 images for a 16x16 and a 48x48 model: read at 32x32, each model
    resizes them in its graph, exactly as Keras' loader resized them for it. Images
    larger than every model's input are read at the largest, as photos are."""
    tree = write_tree(tmp_path / "tree", train_per_class=2, test_per_class=2)
    paths = [tmp_path / f"m{size}.keras" for size in sizes]
    for size, path in zip(sizes, paths, strict=True):
        small_classifier(shape=(size, size, 3)).save(path)
    exported = tmp_path / "e.keras"
    argv = ["combine", *map(str, paths), "--data-dir", str(tree), "--export", str(exported),
            "--logs-dir", str(tmp_path / "logs")]  # fmt: skip
    assert ensemble.main(argv) == 0
    out = capsys.readouterr().out
    wrapped = [size for size in sizes if size != read]
    for size in wrapped:
        assert (
            f"note: model m{size} takes {size}x{size} images: it is given the {read}x{read}" in out
        )
    results = json.loads((tmp_path / "logs" / "combine.json").read_text())
    assert results["resized_inputs"] == {f"m{size}": [size, size] for size in wrapped}

    (_, (x_test, _)), _, _ = data.load_labelled(tree, size=(read, read))
    assert x_test.shape[1:3] == (read, read)
    reloaded = keras.saving.load_model(exported)
    assert tuple(reloaded.input_shape) == (None, read, read, 3)
    outputs = [
        keras.saving.load_model(path).predict(
            keras.layers.Resizing(size, size, interpolation="bilinear")(x_test), verbose=0
        )
        for size, path in zip(sizes, paths, strict=True)
    ]
    np.testing.assert_allclose(
        reloaded.predict(x_test, verbose=0), np.mean(outputs, axis=0), atol=1e-6
    )


def test_resized_trees_match_image_dataset_from_directory(tmp_path):
    """The README's claim, against Keras' own loader (which needs TensorFlow)."""
    pytest.importorskip("tensorflow", reason="image_dataset_from_directory needs TensorFlow")
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("val", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20 + 7 * i, 31 - 3 * i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    images = keras.utils.image_dataset_from_directory(
        tmp_path / "test", image_size=(16, 16), shuffle=False, batch_size=None, verbose=False
    )
    theirs = np.stack([np.asarray(image) for image, _ in images])
    (_, (x_test, _)), _, _ = data.load_labelled(tmp_path, size=(16, 16))
    np.testing.assert_allclose(x_test * 255, theirs, atol=0.5 + 1e-3)  # ours: rounded


def test_tree_resize_is_keras_resize_on_this_backend():
    """readers.resized does keras.ops.image.resize's bilinear arithmetic in NumPy (the op
    compiles per input shape on JAX): down, up, one pixel wide, grey and RGB."""
    rng = np.random.default_rng(3)
    cases = [((37, 52, 3), (16, 16)), ((9, 7, 1), (32, 30)), ((1, 40, 3), (5, 3)),
             ((64, 64, 3), (64, 21)), ((5, 5, 3), (1, 1))]  # fmt: skip
    cases += [((*rng.integers(1, 70, 2), 3), tuple(rng.integers(1, 70, 2))) for _ in range(20)]
    for shape, size in cases:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        theirs = keras.ops.image.resize(
            pixels[None].astype("float32"), size, interpolation="bilinear", antialias=False
        )
        ours = readers.resized(pixels, size)
        assert ours.dtype == np.uint8 and ours.shape == (*size, shape[2])
        # Ours is rounded; the backends' own floats differ among themselves by ~0.002.
        np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(theirs)[0], atol=0.5 + 1e-2)


def test_combine_keeps_images_as_pixels_until_a_batch_is_predicted(tmp_path):
    """uint8 pixels, a quarter of float32's memory, scaled a batch at a time: the same
    predictions as from load_data's float32 images, also mirrored and on 0..255."""
    tree = write_grey_tree(tmp_path / "tree", per_class=4)
    ((_, _), (pixels, _)), _, _ = data.load_labelled(tree, channels=1, pixels=True)
    ((_, _), (images, _)), _, _ = data.load_labelled(tree, channels=1)
    assert pixels.dtype == np.uint8 and images.dtype == np.float32
    np.testing.assert_array_equal(data.scale(pixels), images)
    model = small_classifier(3, (12, 10, 1))
    for tta in (False, True):  # 12 images in batches of 5: the last one short
        np.testing.assert_allclose(
            prediction.predict(model, pixels, 5, tta),
            prediction.predict(model, images, 5, tta),
            atol=1e-6,
        )
    raw = model.predict(pixels.astype("float32"), verbose=0)
    np.testing.assert_allclose(prediction.predict(model, pixels, 5, raw=True), raw, atol=1e-6)
