"""--distribute: one member's batches split over two (virtual CPU) devices."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_tree

ROOT = Path(__file__).resolve().parents[1]
# Two CPU devices for a fresh process: XLA's flag for JAX, logical devices for TensorFlow.
# It runs each command line it is given in turn (JSON), the way the shell would.
DRIVER = """
import json, os, sys
sys.path.insert(0, os.getcwd())
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import ensemble
for argv in json.loads(sys.argv[1]):
    print("=== run", flush=True)
    code = ensemble.main(argv)
    if code:
        sys.exit(code)
"""
# The suite's own XLA flags too (conftest.py), to compile as quickly as the suite does.
TWO_DEVICES = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"


def train(tmp_path, tree, runs):
    """Trains ALL-CNN-C for 2 epochs in one two-device process for each (name, flags).

    Returns that process's output and each run's losses.
    """
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "XLA_FLAGS": TWO_DEVICES}
    argvs = [
        ["--data-dir", str(tree), "--models", "all_cnn", "--epochs", "2", "--no-cost",
         "--weights-dir", str(tmp_path / name / "weights"),
         "--logs-dir", str(tmp_path / name / "logs"), *flags]
        for name, flags in runs
    ]  # fmt: skip
    command = [sys.executable, "-c", DRIVER, json.dumps(argvs)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = []
    for name, _ in runs:
        with open(tmp_path / name / "logs" / "all_cnn.csv", newline="") as file:
            losses.append([float(row["loss"]) for row in csv.DictReader(file)])
    return result.stdout.split("=== run")[1:], losses


@pytest.mark.skipif(
    keras.backend.backend() not in ("jax", "tensorflow"), reason="--distribute: JAX or TensorFlow"
)
def test_distribute_splits_batches_over_two_devices_and_trains_as_one(tmp_path):
    # Both runs in one process, which has two devices; the second uses one of them.
    # 32 images to train on: one batch of 32 an epoch, 16 on each device.
    tree = write_tree(tmp_path / "tree", train_per_class=4)
    (out, one_device_out), (split_losses, one_device_losses) = train(
        tmp_path, tree, [("two", ["--distribute"]), ("one", [])]
    )
    expected = {
        "jax": "--distribute: DataParallel over 2 devices (cpu:0, cpu:1)",
        "tensorflow": "--distribute: MirroredStrategy over 2 devices",
    }[keras.backend.backend()]
    assert expected in out and "--distribute" not in one_device_out
    # Each device takes half of every batch and the gradients are averaged: the
    # same updates as one device on the whole batch, up to summation order.
    np.testing.assert_allclose(split_losses, one_device_losses, rtol=1e-4)
    assert split_losses[1] != split_losses[0]  # it trained


def test_distribute_refuses_the_joint_path(tmp_path, capsys):
    import ensemble

    code = ensemble.main(["--distribute", "--joint", "--weights-dir", str(tmp_path / "w"),
                          "--logs-dir", str(tmp_path / "l")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--distribute spreads the article's one-member fit" in err and err.count("\n") == 1


def test_distribute_on_pytorch_is_one_line_exit_2_before_any_data(tmp_path, capsys, monkeypatch):
    import ensemble

    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")  # on every backend
    folders = ["--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l")]
    code = ensemble.main(["--distribute", "--data-dir", str(tmp_path / "absent"), *folders])
    assert code == 2
    assert capsys.readouterr().err == (
        "ensemble.py: error: --distribute needs the jax or tensorflow backend, not torch; "
        "set KERAS_BACKEND=jax or drop --distribute\n"
    )
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="TensorFlow's MirroredStrategy splits uneven batches"
)
def test_a_batch_that_does_not_split_over_the_devices_is_one_line_exit_2(
    tmp_path, image_tree, monkeypatch, capsys
):
    # Refused before anything is built: two devices as Keras lists them suffice here,
    # in this process (the test above trains on two real ones, in a process of its own).
    import ensemble

    monkeypatch.setattr(keras.distribution, "list_devices", lambda: ["cpu:0", "cpu:1"])
    code = ensemble.main([
        "--data-dir", str(image_tree), "--models", "nin_cnn", "--batch-size", "7",
        "--distribute", "--weights-dir", str(tmp_path / "w"), "--logs-dir", str(tmp_path / "l"),
    ])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "ensemble.py: error: --distribute splits each batch over 2 devices: --batch-size 7 "
        "must be a multiple of 2"
    ]
    assert not list((tmp_path / "w").glob("*.weights.h5"))
