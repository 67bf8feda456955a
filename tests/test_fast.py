"""--preset fast and its options: augmentation, schedule, label smoothing, EMA, TTA."""

import json
import re

import keras
import numpy as np
import pytest
from conftest import nin_without_dropout, write_tree

import ensemble
from ensembling import backend, joint, prediction, recipe
from ensembling.cli import options
from ensembling.settings import changes_recipe
from models import MODELS, nin_cnn


@pytest.fixture
def settings(tmp_path):
    for folder in ("weights", "logs"):
        (tmp_path / folder).mkdir()
    return ensemble.Settings(weights_dir=str(tmp_path / "weights"), logs_dir=str(tmp_path / "logs"))


def test_devices_are_named_kind_and_index_on_every_backend():
    # Keras' own list has no PyTorch implementation; results.json and the cost table
    # name the devices on every backend all the same.
    devices = backend.devices()
    assert devices and all(re.fullmatch(r"[a-z]+:\d+", d.lower()) for d in devices), devices
    kinds = {d.split(":")[0].lower() for d in devices}
    assert backend.has_accelerator() == bool(kinds - {"cpu"})


def test_augment_crops_a_shifted_window_and_mirrors_about_half():
    # Pixel values encode their own (row, column), so each output image tells where
    # its window came from: any shift in -4..4 each way, mirrored or not.
    rows, columns = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows + 1, columns + 1, np.ones_like(rows)], axis=-1).astype("float32")
    images = np.repeat(image[None], 256, axis=0)
    layer = recipe.Augment(pad=4, seed=3)
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    assert out.shape == images.shape
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    windows = {
        (dy, dx, flipped): window[:, ::-1] if flipped else window
        for dy in range(9)
        for dx in range(9)
        for flipped in (False, True)
        for window in [padded[dy : dy + 32, dx : dx + 32]]
    }
    shifts, mirrored = set(), 0
    for picture in out:
        matches = [key for key, window in windows.items() if np.array_equal(picture, window)]
        assert matches, "an output image is not a shifted window of the input"
        dy, dx, flipped = matches[0]
        shifts.add((dy, dx))
        mirrored += flipped
    assert len(shifts) > 40  # of 81: offsets are drawn per image
    assert 90 < mirrored < 166  # about half of 256
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images)), images)


def test_cosine_schedule_warms_up_then_decays_to_zero(settings):
    settings = ensemble.Settings(**{**settings.__dict__, "epochs": 10, "schedule": "cosine",
                                    "warmup_epochs": 2, "learning_rate": 4e-3})  # fmt: skip
    schedule = recipe.learning_rate(settings, steps_per_epoch=100)
    values = [float(schedule(step)) for step in (0, 100, 200, 600, 1000)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(2e-3)  # half-way through the warm-up
    assert values[2] == pytest.approx(4e-3)  # the peak
    assert values[3] == pytest.approx(2e-3)  # half-way down the cosine
    assert values[4] == pytest.approx(0.0, abs=1e-9)
    assert recipe.learning_rate(ensemble.Settings(), steps_per_epoch=100) == 1e-3


def test_warm_up_also_leads_into_the_constant_rate(settings):
    # --warmup-epochs without --schedule cosine: once silently ignored, now a warm-up.
    settings = ensemble.Settings(**{**settings.__dict__, "epochs": 10, "warmup_epochs": 2,
                                    "learning_rate": 4e-3})  # fmt: skip
    schedule = recipe.learning_rate(settings, steps_per_epoch=100)
    values = [float(schedule(step)) for step in (0, 100, 200, 600, 999)]
    assert values == pytest.approx([0.0, 2e-3, 4e-3, 4e-3, 4e-3])
    assert changes_recipe(settings)  # so it trains through the path that applies it


def test_preset_sets_the_recipe_and_flags_still_override_it():
    article = options.parse_args([])
    assert article == ensemble.Settings()  # no flags: the article, exactly
    preset = options.parse_args(["--preset", "fast"])
    assert (preset.batch_size, preset.epochs, preset.joint) == (512, 150, True)
    assert preset.combine == ("average", "weighted")
    assert (preset.augment, preset.label_smoothing, preset.schedule, preset.tta) == (
        True, 0.1, "cosine", True,
    )  # fmt: skip
    # "auto" is resolved before it is printed and saved: bfloat16 only on an accelerator.
    assert preset.precision == ("mixed_bfloat16" if backend.has_accelerator() else "float32")
    mixed = options.parse_args(["--preset", "fast", "--epochs", "3", "--no-augment", "--ema"])
    assert (mixed.epochs, mixed.augment, mixed.ema, mixed.batch_size) == (3, False, True, 512)
    assert options.parse_args(["--label-smoothing", "0.2"]).label_smoothing == 0.2
    # A short run keeps a warm-up shorter than itself, unless the flag says otherwise.
    assert options.parse_args(["--preset", "fast", "--epochs", "2"]).warmup_epochs == 1
    explicit = options.parse_args(["--preset", "fast", "--epochs", "2", "--warmup-epochs", "2"])
    assert explicit.warmup_epochs == 2  # and check_settings refuses it


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label-smoothing", "1"], "--label-smoothing must lie in [0, 1)"),
        (["--schedule", "cosine", "--warmup-epochs", "20"], "--warmup-epochs must be"),
        (["--warmup-epochs", "20"], "--warmup-epochs must be"),
        (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
        (["--weight-decay", "nan"], "--weight-decay must be 0 or more and finite"),
        (["--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),
        (["--dropout", "nan"], "--dropout must lie in [0, 1)"),
        (["--input-dropout", "1"], "--input-dropout must lie in [0, 1), got 1.0"),
    ],
)
def test_bad_recipe_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    code = ensemble.main(
        [*flags, "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_one_joint_step_with_smoothing_and_schedule_equals_keras_fit(settings):
    # The recipe options inside the compiled step compute what Keras computes for a
    # model compiled with the same loss and optimizer, on the same batch.
    settings = ensemble.Settings(
        **{
            **settings.__dict__,
            "epochs": 2,
            "label_smoothing": 0.1,
            "schedule": "cosine",
            "warmup_epochs": 1,
            "learning_rate": 3e-3,
        }
    )
    rng = np.random.default_rng(0)
    x = rng.random((10, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 10), 10).astype("float32")
    alone = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    together = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    together.set_weights(alone.get_weights())

    trained = joint.train_jointly([together], 2, x, y, settings, lambda member: [])

    alone.compile(loss=recipe.loss_function(settings), optimizer=recipe.optimizer(settings, 1))
    losses = [alone.train_on_batch(x[:8], y[:8]) for _ in range(2)]  # one batch an epoch
    np.testing.assert_allclose(trained.histories["nin_cnn"]["loss"], losses, rtol=1e-5)
    # Adam divides by the gradient's own scale, so a weight whose gradient is near
    # zero turns rounding differences into visible ones: the tolerance is 1% of the
    # 3e-3 step every weight took.
    for w_alone, w_together in zip(alone.get_weights(), together.get_weights(), strict=True):
        np.testing.assert_allclose(w_together, w_alone, rtol=1e-4, atol=3e-5)


def test_ema_checkpoints_hold_the_moving_average(settings):
    # One step an epoch. Keras' EMA copies the weights after the first step, then
    # keeps 0.99 of the average: after two steps it is 0.99 w1 + 0.01 w2.
    rng = np.random.default_rng(0)
    x = rng.random((10, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 10), 10).astype("float32")
    start = nin_without_dropout(keras.Input(shape=(32, 32, 3))).get_weights()
    raw = []

    def keep(member):
        class Keep(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raw.append(member.get_weights())

        return [Keep()]

    plain = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    plain.set_weights(start)
    joint.train_jointly([plain], 2, x, y, settings, keep)
    w1, w2 = raw
    averaged = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    averaged.set_weights(start)
    seen = []
    ema = ensemble.Settings(**{**settings.__dict__, "ema": True})
    joint.train_jointly(
        [averaged], 2, x, y, ema, lambda m: [keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: seen.append(m.get_weights()))]
    )  # fmt: skip
    # Two trainings, the same on JAX and TensorFlow. PyTorch's CPU kernels round
    # differently from run to run (even on one thread), and Adam turns that into up
    # to a step (1e-3) on a weight whose gradient is near zero: 0.01 of it is under
    # 3e-5. No average at all misses by ~1e-3; a momentum of 0.98, by ~1e-5.
    atol = 3e-5 if keras.backend.backend() == "torch" else 1e-6
    for a, b, seen_1, seen_2 in zip(w1, w2, *seen, strict=True):
        np.testing.assert_allclose(seen_1, a, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(seen_2, 0.99 * a + 0.01 * b, rtol=1e-4, atol=atol)
    assert not np.allclose(w1[0], w2[0])  # the average differs from the last weights


def test_tta_averages_an_image_and_its_mirror():
    member = nin_cnn(keras.Input(shape=(32, 32, 3)))
    x = np.random.default_rng(2).random((6, 32, 32, 3), dtype=np.float32)
    plain = prediction.predict(member, x, 4)
    mirrored = prediction.predict(member, x[:, :, ::-1], 4)
    np.testing.assert_allclose(prediction.predict(member, x, 4, tta=True), (plain + mirrored) / 2,
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    assert not np.allclose(plain, mirrored)


def test_mixed_precision_trains_in_bfloat16_and_keeps_float32_weights(settings):
    with backend.DtypePolicy("mixed_bfloat16"):
        member = nin_cnn(keras.Input(shape=(32, 32, 3)))
    assert member.layers[1].compute_dtype == "bfloat16"
    assert {w.dtype for w in member.get_weights()} == {np.dtype("float32")}
    assert member.outputs[0].dtype == "float32"  # the softmax stays float32
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    rng = np.random.default_rng(0)
    x = rng.random((10, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 10), 10).astype("float32")
    before = member.get_weights()[0].copy()
    trained = joint.train_jointly([member], 1, x, y, settings, lambda m: [])
    assert np.isfinite(trained.histories["nin_cnn"]["loss"][0])
    assert not np.allclose(member.get_weights()[0], before)


def test_a_float16_floatx_from_keras_json_is_float32_while_a_run_builds_and_trains():
    # keras.json's "floatx": "float16" would make the metrics, and the logged losses
    # checkpoints are chosen by, float16 (2.30078125 for 2.3007839).
    keras.config.set_floatx("float16")
    try:
        with backend.DtypePolicy("float32"):
            assert keras.config.floatx() == "float32"
            assert keras.metrics.Mean().variables[0].dtype == "float32"
        assert keras.config.floatx() == "float16"  # the user's, restored
    finally:
        keras.config.set_floatx("float32")


def test_fast_preset_cli_trains_evaluates_and_saves_every_choice(tmp_path, capsys):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    code = ensemble.main(
        ["--data-dir", str(tmp_path / "tree"), "--preset", "fast", "--epochs", "2",
         "--batch-size", "16", "--warmup-epochs", "1", "--no-cost",
         "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l")]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "l" / "results.json").read_text())
    saved = results["settings"]
    assert saved["preset"] == "fast" and saved["augment"] and saved["tta"]
    assert (saved["schedule"], saved["label_smoothing"], saved["batch_size"]) == ("cosine", 0.1, 16)
    assert results["attempts"] == {name: 1 for name in MODELS}
    assert len(results["epoch_seconds"]["conv_pool_cnn+all_cnn+nin_cnn"]["epochs"]) == 2
    for name in MODELS:
        assert (tmp_path / "l" / f"{name}.csv").read_text().count("\n") == 3
    out = capsys.readouterr().out
    assert '"preset": "fast"' in out  # the settings line


def test_recipe_options_without_joint_train_each_member_on_its_own(tmp_path, capsys):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    code = ensemble.main(
        ["--data-dir", str(tmp_path / "tree"), "--models", "nin_cnn", "all_cnn", "--augment",
         "--epochs", "1", "--no-cost", "--weights-dir", str(tmp_path / "w"),
         "--logs-dir", str(tmp_path / "l")]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "training nin_cnn for 1 epochs" in out and "training all_cnn for 1 epochs" in out
    results = json.loads((tmp_path / "l" / "results.json").read_text())
    assert set(results["train_seconds"]) == {"nin_cnn", "all_cnn"}


@pytest.mark.parametrize("path", ["plain", "joint"])
def test_dropout_flags_train_every_member_with_those_rates(tmp_path, monkeypatch, path):
    # Dropout has no weights, so only the training graph can show that it was there.
    seen = []
    original = keras.layers.Dropout.call

    def call(layer, inputs, training=False):
        seen.append((layer.rate, bool(training)))
        return original(layer, inputs, training=training)

    monkeypatch.setattr(keras.layers.Dropout, "call", call)
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    flags = ["--joint"] if path == "joint" else []
    code = ensemble.main(
        ["--data-dir", str(tmp_path / "tree"), "--models", "nin_cnn", "--dropout", "0.3",
         "--input-dropout", "0.2", "--epochs", "1", "--batch-size", "16", "--no-cost", *flags,
         "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l")]
    )  # fmt: skip
    assert code == 0
    assert (0.3, True) in seen and (0.2, True) in seen
    # NIN's own 0.5 is replaced in training (the reloaded copy that predicts has it,
    # where dropout does nothing).
    assert {rate for rate, training in seen if training} == {0.3, 0.2}
    record = json.loads((tmp_path / "w" / "nin_cnn.best.json").read_text())
    assert record["recipe"]["dropout"] == 0.3 and record["recipe"]["input_dropout"] == 0.2


def test_weight_decay_uses_adamw_and_shrinks_weights_that_get_no_gradient(settings):
    # A decay strong enough to dominate two steps: the first kernel's norm shrinks by
    # the decay's factor, far more than Adam's own steps of 1e-3 can move it.
    decayed = ensemble.Settings(**{**settings.__dict__, "weight_decay": 50.0, "epochs": 2})
    assert isinstance(recipe.optimizer(decayed, 1), keras.optimizers.AdamW)
    # Plain Adam without the flag (PyTorch's backend hands out a subclass of Adam).
    plain = recipe.optimizer(settings, 1)
    assert isinstance(plain, keras.optimizers.Adam)
    assert not isinstance(plain, keras.optimizers.AdamW)
    rng = np.random.default_rng(0)
    x = rng.random((10, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 10), 10).astype("float32")
    norms = {}
    for case in (settings, decayed):
        keras.utils.set_random_seed(0)
        member = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
        joint.train_jointly([member], 2, x, y, case, lambda m: [])
        norms[case.weight_decay] = np.linalg.norm(member.get_weights()[0])
    # Two steps of decay at lr 1e-3 x 50 shrink every weight by about 10%.
    assert norms[50.0] < 0.93 * norms[0.0]
