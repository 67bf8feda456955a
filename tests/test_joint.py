"""--joint trains every member in one step: same losses, same updates, same files."""

import json

import keras
import numpy as np
import pytest
from conftest import nin_without_dropout, write_tree

import data
import ensemble
from ensembling import joint, train, training
from models import MODELS, all_cnn, nin_cnn


@pytest.fixture
def settings(tmp_path):
    for folder in ("weights", "logs"):
        (tmp_path / folder).mkdir()
    return ensemble.Settings(weights_dir=str(tmp_path / "weights"), logs_dir=str(tmp_path / "logs"))


def test_one_joint_step_equals_separate_steps_on_the_same_batch(settings):
    # 40 images, 20% held out: exactly one batch of 32 per epoch, so both paths see
    # the same batch. NIN without its dropout, whose masks would differ between them.
    rng = np.random.default_rng(0)
    x = rng.random((40, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 40), 10).astype("float32")
    builders = (all_cnn, nin_without_dropout)
    alone = [build(keras.Input(shape=(32, 32, 3))) for build in builders]
    shared_input = keras.Input(shape=(32, 32, 3))
    together = [build(shared_input) for build in builders]
    for a, b in zip(alone, together, strict=True):
        b.set_weights(a.get_weights())
    initial = [member.get_weights() for member in together]

    histories = joint.train_jointly(together, 1, x, y, settings, lambda member: []).histories

    for a, b, start in zip(alone, together, initial, strict=True):
        a.compile(
            loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(), metrics=["acc"]
        )
        loss_alone = a.train_on_batch(x[:32], y[:32], return_dict=True)["loss"]
        assert histories[b.name]["loss"][0] == pytest.approx(loss_alone, rel=1e-5)
        # Adam's first step moves a weight by lr * g / (|g| + epsilon): where a gradient
        # is near epsilon (1e-7), the last bits of g, which a CPU's summation order
        # changes from run to run, moved one bias by 1.2e-6 once in a busy suite. 1e-5 is
        # a hundredth of a step.
        for w_alone, w_together in zip(a.get_weights(), b.get_weights(), strict=True):
            np.testing.assert_allclose(w_together, w_alone, rtol=1e-4, atol=1e-5)
        # The step moved the weights: the comparison is not of two untouched copies.
        assert not np.allclose(b.get_weights()[0], start[0])


def test_joint_cli_run_writes_the_article_files(tmp_path, capsys):
    write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    code = ensemble.main(
        ["--data-dir", str(tmp_path / "tree"), "--joint", "--epochs", "2", "--no-cost",
         "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l")]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "l" / "results.json").read_text())
    assert results["settings"]["joint"] is True
    assert len(results["results"]) == 7
    assert results["attempts"] == {name: 1 for name in MODELS}
    for name in MODELS:
        record = json.loads((tmp_path / "w" / f"{name}.best.json").read_text())
        assert (tmp_path / "w" / record["file"]).is_file()
        csv_rows = (tmp_path / "l" / f"{name}.csv").read_text().splitlines()
        assert csv_rows[0] == "epoch,acc,loss,val_acc,val_loss" and len(csv_rows) == 3
        if training.tensorboard_available():  # the article's TensorBoard log, per member
            events = b"".join(p.read_bytes() for p in (tmp_path / "l" / name).rglob("events.*"))
            assert b"epoch_loss" in events and b"epoch_acc" in events
    assert "training conv_pool_cnn, all_cnn, nin_cnn jointly" in capsys.readouterr().out


def test_a_member_dying_in_joint_training_is_retrained_from_fresh_weights(
    tmp_path, settings, monkeypatch, capsys
):
    def dead_nin(model_input):
        model = nin_cnn(model_input)
        last_relu = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-2]
        last_relu.kernel.assign(np.zeros(last_relu.kernel.shape, "float32"))
        last_relu.bias.assign(-np.ones(last_relu.bias.shape, "float32"))
        return model

    monkeypatch.setitem(ensemble.MODELS, "nin_cnn", dead_nin)
    (x_train, y_train), _ = data.load_data(write_tree(tmp_path / "tree"))
    settings = ensemble.Settings(**{**settings.__dict__, "epochs": 1})
    attempts, failed, _ = train.train_jointly(
        ("all_cnn", "nin_cnn"), keras.Input(shape=(32, 32, 3)), x_train, y_train, settings
    )
    assert failed == {}
    assert attempts == {"all_cnn": 1, "nin_cnn": 2}
    assert "nin_cnn died in epoch 1" in capsys.readouterr().out
    record = json.loads((tmp_path / "weights" / "nin_cnn.best.json").read_text())
    assert record["attempts"] == 2


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the scanned epoch is JAX-only")
def test_scanned_epochs_equal_step_by_step_epochs(settings, monkeypatch):
    # NIN: fast under XLA's CPU loop, and its dropout draws from the carried seed
    # state, so both ways must give the same masks and the same weights.
    rng = np.random.default_rng(1)
    x = rng.random((80, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 80), 10).astype("float32")
    weights, losses = {}, {}
    for scan in (True, False):
        monkeypatch.setattr(joint, "SCAN_EPOCHS", scan)
        keras.utils.set_random_seed(0)
        member = nin_cnn(keras.Input(shape=(32, 32, 3)))
        start = member.get_weights()  # the same both times: seed 0
        trained = joint.train_jointly([member], 2, x, y, settings, lambda member: [])
        weights[scan], losses[scan] = member.get_weights(), trained.histories["nin_cnn"]["loss"]
    # Other masks (another --seed) move the losses by 1e-3 and the weights by more than
    # training moved them; XLA's fusions in the loop, by 2e-7 and, through Adam (see
    # test_joint_epochs_equal_keras_fit_on_the_same_batch_order), under 1.5% of it.
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    for before, scanned, stepped in zip(start, weights[True], weights[False], strict=True):
        moved = np.linalg.norm(stepped - before)
        assert moved > 0
        assert np.linalg.norm(scanned - stepped) < 0.05 * moved


def test_joint_epochs_equal_keras_fit_on_the_same_batch_order(settings, monkeypatch):
    # Three epochs of three steps each (the last one smaller), batches in file order
    # on both sides: the joint path's losses and weights follow Keras' own fit step
    # for step, epoch for epoch, so its only difference is the shared batch order.
    monkeypatch.setattr(joint, "epoch_order", lambda rng, n: np.arange(n))  # JAX
    monkeypatch.setattr(joint, "FIT_SHUFFLE", False)  # the other backends
    rng = np.random.default_rng(3)
    x = rng.random((100, 32, 32, 3), dtype=np.float32)  # 80 to train: 32 + 32 + 16
    y = keras.utils.to_categorical(rng.integers(0, 10, 100), 10).astype("float32")
    alone = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    together = nin_without_dropout(keras.Input(shape=(32, 32, 3)))
    together.set_weights(alone.get_weights())
    start = alone.get_weights()

    trained = joint.train_jointly([together], 3, x, y, settings, lambda member: [])

    alone.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adam())
    history = alone.fit(x, y, batch_size=32, epochs=3, validation_split=0.2, shuffle=False,
                        verbose=0)  # fmt: skip
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(trained.histories["nin_cnn"][key], history.history[key],
                                   rtol=1e-4)  # fmt: skip
    # Adam divides each gradient by its own scale, so over nine steps a weight whose
    # gradient is near zero turns summation-order rounding into a visible difference:
    # each layer must agree to within 2% of how far training moved it (in norm).
    for before, w_alone, w_together in zip(
        start, alone.get_weights(), together.get_weights(), strict=True
    ):
        moved = np.linalg.norm(w_alone - before)
        assert moved > 0
        assert np.linalg.norm(w_together - w_alone) < 0.02 * moved
