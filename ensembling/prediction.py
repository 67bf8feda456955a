"""Calling a model to predict: batches of pixels, float32 outputs, flip TTA."""

import keras
import numpy as np

import data


def flip(images):
    """Mirror images (N, H, W, C) left to right."""
    return images[:, :, ::-1, :]


def predict(model, images, batch_size, tta=False, raw=False):
    """`model`'s outputs in float32; with `tta`, averaged with the mirrored images'.

    uint8 `images` are pixels, given to the model as `data.scale` makes them (or, with
    `raw`, as 0..255 in float32), one batch at a time (`Pixels`).
    """

    def batches(mirror):
        if images.dtype == np.uint8:
            return {"x": Pixels(images, batch_size, mirror, raw)}
        return {"x": flip(images) if mirror else images, "batch_size": batch_size}

    probs = model.predict(**batches(False), verbose=0)
    if tta:
        probs = (probs + model.predict(**batches(True), verbose=0)) / 2
    return np.asarray(probs, dtype=np.float32)


class Pixels(keras.utils.PyDataset):
    """uint8 pixels as float32 images, a batch at a time: a test set of large images
    never sits in memory in float32 whole (10,000 at 224x224 would take 6 GB)."""

    def __init__(self, pixels, batch_size, mirror=False, raw=False):
        super().__init__()
        self.pixels, self.batch_size, self.mirror, self.raw = pixels, batch_size, mirror, raw

    def __len__(self):
        return -(-len(self.pixels) // self.batch_size)

    def __getitem__(self, index):
        batch = self.pixels[index * self.batch_size : (index + 1) * self.batch_size]
        batch = flip(batch) if self.mirror else batch
        return batch.astype(np.float32) if self.raw else data.scale(batch)


def predict_members(members, images, settings):
    """{name: softmax outputs} for the loaded `members` ({name: (model, path)}).

    With `settings.tta` each output is the mean over the image and its mirror image.
    """
    return {
        n: predict(m, images, settings.batch_size, settings.tta) for n, (m, _) in members.items()
    }


def ensemble(models, model_input):
    """One model on the shared input whose output is the mean of the members' softmax."""
    outputs = [model.outputs[0] for model in models]
    y = keras.layers.Average(dtype="float32")(outputs)  # float32 under mixed precision too
    return keras.Model(model_input, y, name="ensemble")


def evaluate_error(model, x_test, y_test, batch_size=32):
    """Fraction of test images whose most probable class is wrong."""
    pred = model.predict(x_test, batch_size=batch_size, verbose=0)
    pred = np.argmax(pred, axis=1)
    pred = np.expand_dims(pred, axis=1)  # same shape as y_test: (N, 1)
    return float(np.sum(np.not_equal(pred, y_test)) / y_test.shape[0])
