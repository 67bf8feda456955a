"""The three builders: shapes, parameter counts and the article's layers, no training."""

import keras
import numpy as np
import pytest

import ensemble
from models import MODELS, all_cnn, conv_pool_cnn, nin_cnn

PARAMETERS = {"conv_pool_cnn": 1_369_738, "all_cnn": 1_369_738, "nin_cnn": 109_674}


def conv(filters, kernel, strides=1, padding="same", activation="relu"):
    return ("Conv2D", filters, (kernel, kernel), (strides, strides), padding, activation)


POOL_3_2 = ("MaxPooling2D", (3, 3), (2, 2), "valid")
POOL_2 = ("MaxPooling2D", (2, 2), (2, 2), "valid")
HEAD = [
    conv(192, 3),
    conv(192, 1, padding="valid"),
    conv(10, 1, padding="valid", activation="linear"),  # no ReLU before the pooling
    ("GlobalAveragePooling2D",),
    ("Activation", "softmax"),
]
# Transcribed from the article's listings.
LAYERS = {
    "conv_pool_cnn": [conv(96, 3)] * 3 + [POOL_3_2] + [conv(192, 3)] * 3 + [POOL_3_2] + HEAD,
    "all_cnn": [conv(96, 3)] * 2
    + [conv(96, 3, strides=2)]
    + [conv(192, 3)] * 2
    + [conv(192, 3, strides=2)]
    + HEAD,
    "nin_cnn": [
        conv(32, 5, padding="valid"),
        conv(32, 1, padding="valid"),
        conv(32, 1, padding="valid"),
        POOL_2,
        ("Dropout", 0.5),
        conv(64, 3, padding="valid"),
        conv(64, 1, padding="valid"),
        conv(64, 1, padding="valid"),
        POOL_2,
        ("Dropout", 0.5),
        conv(128, 3, padding="valid"),
        conv(32, 1, padding="valid"),
        *HEAD[2:],
    ],
}


def layer_spec(layer):
    kind = type(layer).__name__
    if kind == "Conv2D":
        activation = layer.activation.__name__
        return (kind, layer.filters, layer.kernel_size, layer.strides, layer.padding, activation)
    if kind == "MaxPooling2D":
        return (kind, layer.pool_size, layer.strides, layer.padding)
    if kind == "Dropout":
        return (kind, layer.rate)
    if kind == "Activation":
        return (kind, layer.activation.__name__)
    return (kind,)


@pytest.fixture
def model_input():
    return keras.Input(shape=(32, 32, 3))


@pytest.mark.parametrize("name", list(MODELS))
def test_builder_output_name_and_parameters(name, model_input):
    model = MODELS[name](model_input)
    assert isinstance(model, keras.Model)
    assert model.name == name
    assert model.output.shape == (None, 10)
    assert model.count_params() == PARAMETERS[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_builder_layers_match_the_article(name, model_input):
    model = MODELS[name](model_input)
    specs = [layer_spec(layer) for layer in model.layers[1:]]  # after the InputLayer
    assert specs == LAYERS[name]


def test_dropout_follows_each_downsampling_stage_and_adds_no_weights(model_input):
    # The All-CNN paper's dropout, which the article left out, at the places it used:
    # after each max pooling, or after the stride-2 convolution that replaces it.
    # NIN has its dropout layers there already, at the article's 0.5.
    for name, stages in [("conv_pool_cnn", (3, 7)), ("all_cnn", (2, 5)), ("nin_cnn", ())]:
        model = MODELS[name](keras.Input(shape=(32, 32, 3)), dropout=0.3)
        expected = [("Dropout", 0.3) if spec[0] == "Dropout" else spec for spec in LAYERS[name]]
        for inserted, index in enumerate(stages):  # after LAYERS[name][index]
            expected.insert(index + 1 + inserted, ("Dropout", 0.3))
        assert [layer_spec(layer) for layer in model.layers[1:]] == expected, name
        assert model.count_params() == PARAMETERS[name]
    # The paper's input dropout: the first layer of every member, no weights either.
    for name in MODELS:
        model = MODELS[name](keras.Input(shape=(32, 32, 3)), input_dropout=0.2)
        specs = [layer_spec(layer) for layer in model.layers[1:]]
        assert specs == [("Dropout", 0.2), *LAYERS[name]], name
        assert model.count_params() == PARAMETERS[name]
    without = nin_cnn(model_input, dropout=0)
    assert "Dropout" not in [type(layer).__name__ for layer in without.layers]
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1.5"):
        all_cnn(model_input, dropout=1.5)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got -0.1"):
        conv_pool_cnn(model_input, input_dropout=-0.1)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_are_probabilities(name, model_input):
    model = MODELS[name](model_input)
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_builders_take_other_class_counts_and_image_shapes(name):
    # NIN's smallest image is 20x20 (its unpadded convolutions and poolings).
    grey = keras.Input(shape=(20, 20, 1))
    model = MODELS[name](grey, num_classes=100)
    images = np.random.default_rng(2).random((3, 20, 20, 1), dtype=np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, 100)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="num_classes must be at least 2 for a softmax, got 1"):
        MODELS[name](grey, num_classes=1)
    if name == "nin_cnn":  # the README's "NIN needs 20x20 or more"
        with pytest.raises(ValueError, match="output size would be zero or negative"):
            nin_cnn(keras.Input(shape=(19, 19, 1)))


@pytest.mark.parametrize("name", list(MODELS))
def test_builders_read_channels_last_whatever_keras_json_says(name):
    # A keras.json of Theano's day says "channels_first": (32, 32, 3) would then be
    # 32 channels of 32x3 pixels, and NIN's 5x5 convolution would not even fit.
    keras.config.set_image_data_format("channels_first")
    try:
        model = MODELS[name](keras.Input(shape=(32, 32, 3)))
        with pytest.raises(ValueError, match="num_classes must be at least 2"):
            MODELS[name](keras.Input(shape=(32, 32, 3)), num_classes=1)
        assert keras.config.image_data_format() == "channels_first"  # restored, even then
    finally:
        keras.config.set_image_data_format("channels_last")
    formats = {layer.data_format for layer in model.layers if hasattr(layer, "data_format")}
    assert formats == {"channels_last"}
    images = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    assert model.predict(images, verbose=0).shape == (2, 10)


def test_members_share_one_input_and_the_ensemble_averages_them(model_input):
    members = [conv_pool_cnn(model_input), all_cnn(model_input), nin_cnn(model_input)]
    assert all(member.inputs[0] is model_input for member in members)
    combined = ensemble.ensemble(members, model_input)
    assert combined.inputs[0] is model_input
    images = np.random.default_rng(1).random((5, 32, 32, 3), dtype=np.float32)
    expected = np.mean([member.predict(images, verbose=0) for member in members], axis=0)
    np.testing.assert_allclose(combined.predict(images, verbose=0), expected, atol=1e-6)
    # The ensemble adds no weights of its own.
    assert combined.count_params() == sum(member.count_params() for member in members)


def test_importing_the_modules_does_nothing_and_needs_no_sighup(tmp_path):
    # One fresh interpreter for both: importing writes nothing (no weights/, logs/ or
    # downloads), and it works where there is no SIGHUP (Windows has SIGINT and SIGTERM).
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import signal; del signal.SIGHUP; import data, models, ensemble; "
        "from ensembling import training; print(training.STOP_SIGNALS)"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    shown = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0, shown.stderr[-500:]
    assert shown.stdout.splitlines()[-1] == "(<Signals.SIGINT: 2>, <Signals.SIGTERM: 15>)"
    assert list(tmp_path.iterdir()) == []


def test_evaluate_error_is_the_fraction_of_wrong_top_classes(model_input):
    model = nin_cnn(model_input)
    images = np.random.default_rng(2).random((12, 32, 32, 3), dtype=np.float32)
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    labels = predicted.copy()
    labels[:3] = (labels[:3] + 1) % 10  # exactly 3 of 12 wrong
    assert ensemble.evaluate_error(model, images, labels[:, None]) == 0.25
