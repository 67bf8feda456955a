"""Calling a model to predict: batches of pixels, float32 outputs, flip TTA, and the
class probabilities of any classifier (softmax, logits or sigmoid outputs)."""

import keras
import numpy as np

import data
from ensembling import combination
from ensembling.errors import ExportError


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
    y = average([model.outputs[0] for model in models])
    return keras.Model(model_input, y, name="ensemble")


def average(outputs, name=None):
    """The article's combination: the mean of the members' softmax outputs, in float32
    under mixed precision too; `ensemble` and the exported file's average both use it."""
    return keras.layers.Average(name=name, dtype="float32")(outputs)


def evaluate_error(model, x_test, y_test, batch_size=32):
    """Fraction of test images whose most probable class is wrong."""
    pred = model.predict(x_test, batch_size=batch_size, verbose=0)
    pred = np.argmax(pred, axis=1)
    pred = np.expand_dims(pred, axis=1)  # same shape as y_test: (N, 1)
    return float(np.sum(np.not_equal(pred, y_test)) / y_test.shape[0])


def predict_probabilities(model, images, batch_size, tta=False, raw=False, label="model"):
    """`model`'s class probabilities for `images` (`predict`), whatever it outputs:
    (model, kind, probabilities), the model being one that outputs them
    (`with_probabilities`) and kind what `output_kind` found. `label` names it in errors.
    """
    outputs = predict(model, images, batch_size, tta, raw)
    kind = output_kind(model, outputs, label)
    if kind != "softmax":
        model = with_probabilities(model, kind)
        # --tta averages probabilities, not logits: the wrapped model predicts again.
        outputs = (
            predict(model, images, batch_size, tta, raw) if tta else to_probabilities(outputs, kind)
        )
    return model, kind, probabilities(label, outputs)


def probabilities(label, probs):
    """A model's float32 outputs with each row divided by its sum, or an ExportError
    where they are no probabilities (`output_kind` took them for a softmax's), which
    would make every metric but the error wrong. `label` names the model in it.

    A mixed-precision model's softmax may come out in bfloat16, whose rows sum to one
    within a few thousandths only (8 bits of mantissa); logits, or one sigmoid per
    class, do not come within 2% of one on every row.
    """
    sums = probs.sum(axis=1)
    if not _sum_to_one(probs):
        raise ExportError(
            f"{label} does not output probabilities (its rows sum to "
            f"{sums.min():.3g}..{sums.max():.3g}); end it with a softmax"
        )
    return probs / sums[:, None]


def _sum_to_one(probs):
    return probs.min() >= -1e-6 and np.abs(probs.sum(axis=1) - 1).max() <= 2e-2


def output_kind(model, outputs, label):
    """What `model`'s outputs are: "softmax" (class probabilities), "logits" (before a
    softmax, as the TensorFlow tutorials' `Dense(10)` trained `from_logits=True`), or
    for one unit, which scores two classes, "sigmoid" (the probability of class 1) or
    "logit" (before that sigmoid, as Keras' binary examples end). An ExportError for
    one sigmoid per class: a multi-label model, not a classifier of one class each.

    A last softmax or sigmoid says so (also of a dead model's NaNs). Otherwise the
    `outputs` (float32, a batch of them) decide where they can, as no logits' rows sum
    to one and only a logit leaves [0, 1]; and a linear end means logits, as a few
    images' logits may all lie in [0, 1].
    """
    activation = _last_activation(model)
    inside = outputs.min() >= 0 and outputs.max() <= 1
    if outputs.shape[1] == 1:
        sigmoid = activation == "sigmoid" or (inside and activation != "linear")
        return "sigmoid" if sigmoid else "logit"
    if activation == "softmax" or _sum_to_one(outputs):  # `probabilities` checks the sums
        return "softmax"
    if activation == "sigmoid" or (inside and activation != "linear"):
        raise ExportError(
            f"{label} scores each class with a sigmoid of its own (a multi-label model); "
            "this needs a classifier of one class per image, ending in a softmax or logits"
        )
    return "logits"


def _last_activation(model):
    """The name of the activation that ends `model` ("softmax", "linear", ...), or None."""
    layer = model
    while isinstance(layer, keras.Model) and layer.layers:  # nested models: the inner end
        layer = layer.layers[-1]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", None)


def to_probabilities(outputs, kind):
    """float32 `outputs` of `kind` (`output_kind`) as class probabilities, as
    `with_probabilities`' layers compute them."""
    if kind == "logits":
        return combination.softmax(outputs)
    if kind == "softmax":
        return outputs
    # The sigmoid as tanh: 1 / (1 + exp(-x)) overflows for a logit below -88 in float32.
    p = 0.5 * (1 + np.tanh(outputs / 2)) if kind == "logit" else outputs
    return np.concatenate([1 - p, p], axis=1)


def with_probabilities(model, kind):
    """`model` ending in class probabilities: a softmax after logits, [1 - p, p] after
    one sigmoid unit. Built-in layers in float32, so the file loads in safe mode; the
    wrapper keeps the model's name, which names its rows and its part of an export."""
    if kind == "softmax":
        return model
    inputs = keras.Input(model.input_shape[1:], name=f"{model.name}_input")
    outputs = model(inputs)
    if kind == "logits":
        probs = keras.layers.Softmax(name=f"{model.name}_softmax", dtype="float32")(outputs)
    else:
        if kind == "logit":
            outputs = keras.layers.Activation(
                "sigmoid", name=f"{model.name}_sigmoid", dtype="float32"
            )(outputs)
        # 1 - p as a built-in layer: Rescaling computes x * scale + offset.
        other = keras.layers.Rescaling(
            -1.0, offset=1.0, name=f"{model.name}_class_0", dtype="float32"
        )(outputs)
        probs = keras.layers.Concatenate(name=f"{model.name}_two_classes", dtype="float32")(
            [other, outputs]
        )
    return keras.Model(inputs, probs, name=model.name)
