"""`--preset fast` and the training options it turns on: accuracy per minute.

The article trains each member for 20 epochs at batch 32 with a constant Adam
step, no augmentation and float32 throughout. The fast preset keeps the three
architectures and changes the recipe the way image classifiers are trained today:

- bfloat16 mixed precision on an accelerator (float32 weights and softmax);
- batches of 512, every member in one compiled step (`--joint`);
- random translations by up to 4 pixels and horizontal flips, drawn per image on
  the device inside the training step (`Augment`: pad, crop and flip with
  `keras.ops`; no interpolation, so it costs a gather per batch);
- label smoothing 0.1;
- a linear warm-up to the peak learning rate, then cosine decay to zero;
- optionally (`--ema`) checkpoints of the weights' exponential moving average,
  which Keras' optimizers keep (`use_ema`), and (`--weight-decay`) AdamW's
  decoupled weight decay, which the preset leaves off (0.05 gained nothing on a GPU),
  and (`--dropout`, `--input-dropout`, models.py) the All-CNN paper's dropout, not
  yet measured;
- flip test-time augmentation: each test image's softmax is averaged with its
  mirror image's.

Each option is also a flag of its own, so any of them can be added to the
article's recipe or removed from the preset; `ensemble.py` prints and saves
every value with the results.
"""

import keras
import numpy as np
from keras import ops

import data

PRESETS = {
    "article": {},
    # Measured on one H100 (bench/RESULTS.md): 150 epochs take 223 s end to end.
    "fast": {
        "epochs": 150,
        "batch_size": 512,
        "learning_rate": 2e-3,  # peak; Adam's 1e-3 suits batch 32, 512 takes a larger step
        "validation_split": 0.1,
        "joint": True,
        "precision": "auto",
        "augment": True,
        "label_smoothing": 0.1,
        "schedule": "cosine",
        "warmup_epochs": 2,
        "tta": True,
        "combine": ("average", "weighted"),  # the weak NIN gets a smaller say
    },
}
PRECISIONS = ("float32", "mixed_bfloat16", "auto")
SCHEDULES = ("constant", "cosine")


def devices():
    """The devices Keras' backend computes on, as "kind:index" strings.

    `keras.distribution.list_devices` has no PyTorch implementation in Keras 3.15
    (it raises AttributeError there), so on torch ask torch itself: its CUDA
    devices, which Keras' torch backend uses by default, else the CPU. Keras' other
    backends (numpy, openvino: inference only) have none either; numpy computes on
    the CPU, and the CPU is reported for them.
    """
    if keras.backend.backend() in ("jax", "tensorflow"):
        return keras.distribution.list_devices()
    if keras.backend.backend() != "torch":  # numpy, openvino: inference on the CPU only
        return ["cpu:0"]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu:0"]


def has_accelerator():
    """True when Keras' backend sees a GPU or TPU."""
    kinds = {device.split(":")[0].lower() for device in devices()}
    return bool(kinds & {"gpu", "cuda", "tpu"})


def resolve_precision(precision):
    """`auto` is bfloat16 mixed precision on an accelerator, float32 on a CPU.

    CPUs without native bfloat16 arithmetic emulate it, slower than float32.
    """
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if has_accelerator() else "float32"


def changes_recipe(settings):
    """True when `settings` train differently from the article (beyond epochs and sizes)."""
    return (
        settings.precision != "float32"
        or settings.augment
        or settings.label_smoothing > 0
        or settings.schedule != "constant"
        or settings.warmup_epochs > 0
        or settings.ema
        or settings.weight_decay > 0
    )


class DtypePolicy:
    """Context manager: Keras' global dtype policy for the models built inside it.

    Keras' float type (`floatx`) is float32 inside too: a keras.json that sets
    "float16" would otherwise make the metrics, and the logged losses the checkpoints
    are chosen by, float16 (2.30078125 for 2.3007...), whatever the layers compute in.
    """

    def __init__(self, policy):
        self.policy, self.previous = policy, None

    def __enter__(self):
        self.previous = keras.config.dtype_policy(), keras.config.floatx()
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy(self.policy)
        return self

    def __exit__(self, *exc):
        policy, floatx = self.previous
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


@keras.saving.register_keras_serializable(package="ensemble")
class Augment(keras.layers.Layer):
    """Random translation by up to `pad` pixels and random horizontal flips, per image.

    Pads with zeros (black, as the All-CNN paper's translations), crops a random
    32x32 window and mirrors half of the images; identity outside training. It uses
    `keras.ops` only (a gather, no interpolation), so it runs inside the compiled
    training step on every backend. Only training models hold it: members and
    exported ensembles never do.
    """

    def __init__(self, pad=4, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        pad = self.pad
        padded = ops.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = keras.random.randint(
            (batch, 2), 0, 2 * pad + 1, seed=self.seed_generator, dtype="int32"
        )
        flip = keras.random.uniform((batch, 1), seed=self.seed_generator) < 0.5
        rows = offsets[:, :1] + ops.arange(height, dtype="int32")[None, :]
        columns = ops.arange(width, dtype="int32")[None, :]
        # A mirrored image reads its window's columns right to left.
        columns = ops.where(flip, width - 1 - columns, columns) + offsets[:, 1:]
        out = ops.take_along_axis(padded, rows[:, :, None, None], axis=1)
        return ops.take_along_axis(out, columns[:, None, :, None], axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


def training_inputs(members, model_input, settings):
    """What each member sees while training: the shared input, or its own augmentation.

    Each member draws its own translations and flips (seeded from `settings.seed`),
    so that the members do not all see the same augmented batch.
    """
    if not settings.augment:
        return [model_input] * len(members)
    return [
        Augment(seed=settings.seed * 1000 + i, name=f"augment_{m.name}")(model_input)
        for i, m in enumerate(members)
    ]


def loss_function(settings):
    """The article's categorical cross-entropy, with label smoothing when asked."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)


def learning_rate(settings, steps_per_epoch):
    """The article's constant rate; with `warmup_epochs`, a linear warm-up to it first.

    After the warm-up the cosine schedule decays the rate to zero at the last step;
    the constant one keeps it (Keras' CosineDecay with alpha=1 decays to the rate
    itself, so both are the one schedule Keras ships).
    """
    rate = settings.learning_rate
    warmup = settings.warmup_epochs * steps_per_epoch
    if settings.schedule != "cosine" and not warmup:
        return rate
    total = settings.epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else rate,
        decay_steps=max(total - warmup, 1),
        alpha=0.0 if settings.schedule == "cosine" else 1.0,
        warmup_target=rate if warmup else None,
        warmup_steps=warmup,
    )


def optimizer(settings, steps_per_epoch):
    """Adam, as the article, at `learning_rate(...)`; keeping a moving average with `ema`.

    With `weight_decay`, Keras' AdamW: the decay is applied to the weights directly
    (decoupled), scaled by the current learning rate.
    """
    rate = learning_rate(settings, steps_per_epoch)
    if settings.weight_decay:
        return keras.optimizers.AdamW(
            learning_rate=rate, weight_decay=settings.weight_decay, use_ema=settings.ema
        )
    return keras.optimizers.Adam(learning_rate=rate, use_ema=settings.ema)


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
