"""Models that need more than Keras to load: custom layers and functions
(--custom-objects FILE.py) and Lambda layers (--no-safe-mode), in combine and predict."""

import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import write_tree
from PIL import Image

from ensembling import export
from ensembling.cli import combine, predict

# A user's layers file: one registered class, one class and one function found by
# name only, and the code that saved the models, kept from running on import by the
# usual guard. PACKAGE is unique per test: Keras' registry outlives a test.
LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="PACKAGE")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class Shift(keras.layers.Layer):
    def call(self, x):
        return x - 0.5


def squared_relu(x):
    return keras.ops.square(keras.ops.relu(x))


def build(name, first):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(first(inputs))
    x = keras.layers.Dense(16, activation=squared_relu)(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x), name=name)


if __name__ == "__main__":
    keras.utils.set_random_seed(0)
    build("scaled", Scale(3.0)).save("scaled.keras")
    build("shifted", Shift()).save("shifted.keras")
    build("lambda", keras.layers.Lambda(lambda x: x + 0.25)).save("lambda.keras")
    build("scaled", Scale(3.0)).save("scaled.h5")
    raise SystemExit("the guard kept this from running on import")
"""


@pytest.fixture
def saved(tmp_path):
    """The layers file and the models it saved, in a process of their own."""
    layers = tmp_path / "my_layers.py"
    layers.write_text(LAYERS.replace("PACKAGE", f"test_{uuid.uuid4().hex}"))
    result = subprocess.run(
        [sys.executable, layers.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert "the guard kept this" in result.stderr, result.stderr[-2000:]
    return layers


def test_combine_and_predict_load_custom_layers_and_lambdas_when_told(
    tmp_path, saved, capsys, monkeypatch
):
    tree = write_tree(tmp_path / "tree")
    models = [str(tmp_path / f"{name}.keras") for name in ("scaled", "shifted", "lambda")]
    ensemble_file = tmp_path / "ensemble.keras"
    common = ["--data-dir", str(tree), "--logs-dir", str(tmp_path / "logs")]

    def refused(argv, main=combine.main):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    # Before this process has imported the file: Keras knows none of it.
    err = refused([*models, *common])
    assert f"model {models[0]} uses the custom class Scale (registered as test_" in err
    assert "with --custom-objects FILE.py" in err
    err = refused([models[1], models[0], *common])
    assert f"model {models[1]} uses the custom class Shift, which is not defined here" in err
    flag = ["--custom-objects", str(saved)]
    err = refused([*models, *common, *flag])
    assert f"model {models[2]} holds Python code (a Lambda layer or a lambda)" in err
    assert "add --no-safe-mode" in err

    args = [*models, *common, *flag, "--no-safe-mode", "--export", str(ensemble_file)]
    assert combine.main(args) == 0
    out = capsys.readouterr().out
    assert f"give predict the same flags to load it: --custom-objects {saved} --no-safe-mode" in out

    # The file holds the three as loaded, averaged; it needs the same to load again.
    custom = export.custom_objects([str(saved)])
    assert {"Scale", "Shift", "squared_relu", "build"} <= set(custom)
    # A module's name finds the file of that name in the current folder, too.
    monkeypatch.chdir(tmp_path)
    assert set(export.custom_objects(["my_layers"])) == set(custom)
    members = [export.load(path, custom_objects=custom, safe_mode=False) for path in models]
    assert members[0].layers[1].factor == 3.0
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    expected = np.mean([member.predict(images, verbose=0) for member in members], axis=0)
    loaded = export.load(ensemble_file, custom_objects=custom, safe_mode=False)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)

    image = tmp_path / "cat.png"
    Image.fromarray((images[0] * 255).astype(np.uint8)).save(image)
    predict_args = [str(image), "--model", str(ensemble_file)]
    err = refused([*predict_args, *flag], predict.main)
    assert f"--model {ensemble_file} holds Python code" in err
    err = refused([*predict_args, "--no-safe-mode"], predict.main)
    assert "which is not defined here" in err  # Shift, or squared_relu, whichever comes first
    assert "uses the custom class Shift" in err or "uses the custom function squared_relu" in err
    assert predict.main([*predict_args, *flag, "--no-safe-mode"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_a_legacy_h5_of_a_custom_layer_names_it_and_loads_with_the_file(tmp_path, saved, capsys):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    predict_args = ["--model", str(tmp_path / "scaled.h5"), str(image)]
    assert predict.main(predict_args) == 2
    err = capsys.readouterr().err
    assert "scaled.h5 uses the custom layer test_" in err and ">Scale, which is not" in err
    assert predict.main([*predict_args, "--custom-objects", str(saved)]) == 0


@pytest.mark.parametrize(
    "source, text, message",
    [
        ("missing.py", None, "--custom-objects missing.py does not exist; give a Python file"),
        ("no_such_module_here", None, "--custom-objects no_such_module_here: no such module"),
        ("boom.py", "import os\n\nraise RuntimeError('no GPU')\n",
         "boom.py failed to import, line 3: RuntimeError: no GPU"),
        ("typo.py", "def f(:\n", "typo.py failed to import: SyntaxError: "),
        ("needs.py", "import not_installed_anywhere\n",
         "needs.py failed to import, line 1: ModuleNotFoundError: No module named "
         "'not_installed_anywhere'"),
    ],
)  # fmt: skip
def test_a_custom_objects_file_that_does_not_import_is_one_line_exit_2(
    tmp_path, capsys, monkeypatch, source, text, message
):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / source).write_text(text)
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    argv = ["--model", "any.keras", "cat.png", "--custom-objects", source]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble.py predict: error:") and err.count("\n") == 1, err
    assert message in err
    assert source.removesuffix(".py") not in sys.modules  # nothing half-imported is kept


@pytest.mark.parametrize(
    "module, message",
    [
        ("keras.layers", "uses keras.layers.FancyFlatten, which Keras "),
        ("keras_hub.src.layers.fancy", "uses FancyFlatten from keras_hub.src.layers.fancy, which "
         "cannot be imported here: install the package it comes from (pip install keras-hub)"),
    ],
    ids=["newer keras", "keras_hub"],
)  # fmt: skip
def test_a_class_of_a_newer_keras_or_a_missing_library_says_what_to_install(
    tmp_path, capsys, module, message
):
    """A file saved by a newer Keras (a layer this one lacks) or holding keras_hub's
    layers, which Keras imports by module name: what to install, not Keras' words."""
    import json
    import zipfile

    import keras

    path = tmp_path / "newer.keras"
    keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
    ).save(path)
    with zipfile.ZipFile(path) as archive:
        stored = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, content in stored:
            if info.filename == "config.json":
                config = json.loads(content)
                layer = config["config"]["layers"][1]
                assert layer["class_name"] == "Flatten"
                layer.update(module=module, class_name="FancyFlatten")
                content = json.dumps(config)
            archive.writestr(info, content)
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    assert predict.main(["--model", str(path), str(tmp_path / "cat.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
