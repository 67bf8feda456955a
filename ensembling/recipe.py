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
from keras import ops


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
