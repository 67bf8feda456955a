"""The article's three CIFAR-10 ConvNets, layer for layer, as Keras 3 builders.

Each builder takes the shared input tensor and returns a named `keras.Model`; none
compiles, trains or touches files. `MODELS` is the one list of them: the CLI, the
tests and the ensembles all iterate it.

    from models import MODELS, conv_pool_cnn
    model_input = keras.Input(shape=(32, 32, 3))
    model = conv_pool_cnn(model_input)   # 1,369,738 parameters

`dropout` is the rate of the dropout after each of a model's two downsampling
stages, `input_dropout` the rate on its input images. Their defaults are the
article's: no dropout in the two All-CNN models (their paper used 0.5 after each
stage and 0.2 on the input), 0.5 after each stage in NIN. Dropout has no weights,
so a model built with any rates loads the others' checkpoints.

`num_classes` (default: CIFAR-10's 10) sizes the softmax output, and the input may
be any image shape the layers fit (NIN needs at least 20x20), for other data:

    grey = keras.Input(shape=(28, 28, 1))
    model = nin_cnn(grey, num_classes=100)   # (None, 100) probabilities
"""

import functools

import keras
from keras import layers


def _channels_last(builder):
    """Builds with channels-last layers whatever `image_data_format` Keras' config sets.

    The article's models take (32, 32, 3) images, and a keras.json left with
    "channels_first" (Theano's order, common in 2017) would have read them as 32
    channels of 32x3 pixels. Layers fix their data format when made, and save it.
    """

    @functools.wraps(builder)
    def build(*args, **kwargs):
        chosen = keras.config.image_data_format()
        keras.config.set_image_data_format("channels_last")
        try:
            return builder(*args, **kwargs)
        finally:
            keras.config.set_image_data_format(chosen)

    return build


@_channels_last
def conv_pool_cnn(model_input, dropout=0.0, input_dropout=0.0, num_classes=10):
    """ConvPool-CNN-C: stacked 3x3 convolutions with max pooling and a global-average head.

    Reference:
    - [Striving for Simplicity: The All Convolutional Net](https://arxiv.org/abs/1412.6806)
      (Springenberg et al., 2014), model C with max pooling kept.

    Args:
        model_input: a `keras.Input` of shape (32, 32, 3), possibly shared with other models.
        dropout: rate after each max pooling; the article's 0 adds no layer.
        input_dropout: rate on the input images; the article's 0 adds no layer.
        num_classes: classes of the softmax output; the article's CIFAR-10 has 10.

    Returns:
        A `keras.Model` named `conv_pool_cnn` with `num_classes` softmax outputs.
    """
    x = _dropout(model_input, input_dropout)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same")(x)
    x = _dropout(layers.MaxPooling2D(pool_size=(3, 3), strides=2)(x), dropout)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = _dropout(layers.MaxPooling2D(pool_size=(3, 3), strides=2)(x), dropout)
    return _class_head(model_input, x, "conv_pool_cnn", num_classes)


@_channels_last
def all_cnn(model_input, dropout=0.0, input_dropout=0.0, num_classes=10):
    """ALL-CNN-C: ConvPool-CNN-C with each max pooling replaced by a stride-2 convolution.

    Reference:
    - [Striving for Simplicity: The All Convolutional Net](https://arxiv.org/abs/1412.6806)
      (Springenberg et al., 2014), model C.

    Args:
        model_input: a `keras.Input` of shape (32, 32, 3), possibly shared with other models.
        dropout: rate after each stride-2 convolution; the article's 0 adds no layer.
        input_dropout: rate on the input images; the article's 0 adds no layer.
        num_classes: classes of the softmax output; the article's CIFAR-10 has 10.

    Returns:
        A `keras.Model` named `all_cnn` with `num_classes` softmax outputs.
    """
    x = _dropout(model_input, input_dropout)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(96, (3, 3), activation="relu", padding="same", strides=2)(x)
    x = _dropout(x, dropout)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same", strides=2)(x)
    x = _dropout(x, dropout)
    return _class_head(model_input, x, "all_cnn", num_classes)


@_channels_last
def nin_cnn(model_input, dropout=0.5, input_dropout=0.0, num_classes=10):
    """Network in Network: three mlpconv blocks (a convolution, then two 1x1) with dropout.

    Reference:
    - [Network In Network](https://arxiv.org/abs/1312.4400) (Lin et al., 2013).

    Args:
        model_input: a `keras.Input` of shape (32, 32, 3), possibly shared with other models.
        dropout: rate after each max pooling (the article's 0.5); 0 adds no layer.
        input_dropout: rate on the input images; the article's 0 adds no layer.
        num_classes: classes of the softmax output; the article's CIFAR-10 has 10.

    Returns:
        A `keras.Model` named `nin_cnn` with `num_classes` softmax outputs.
    """
    # mlpconv block 1
    x = _dropout(model_input, input_dropout)
    x = layers.Conv2D(32, (5, 5), activation="relu", padding="valid")(x)
    x = layers.Conv2D(32, (1, 1), activation="relu")(x)
    x = layers.Conv2D(32, (1, 1), activation="relu")(x)
    x = _dropout(layers.MaxPooling2D((2, 2))(x), dropout)
    # mlpconv block 2
    x = layers.Conv2D(64, (3, 3), activation="relu", padding="valid")(x)
    x = layers.Conv2D(64, (1, 1), activation="relu")(x)
    x = layers.Conv2D(64, (1, 1), activation="relu")(x)
    x = _dropout(layers.MaxPooling2D((2, 2))(x), dropout)
    # mlpconv block 3: its last 1x1 convolution is the class map of the head
    x = layers.Conv2D(128, (3, 3), activation="relu", padding="valid")(x)
    x = layers.Conv2D(32, (1, 1), activation="relu")(x)
    return _softmax_head(model_input, x, "nin_cnn", num_classes)


def _dropout(x, rate):
    """`Dropout(rate)` on `x`, or `x` itself at rate 0 (the article's layer lists)."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {rate}")
    return layers.Dropout(rate)(x) if rate else x


def _class_head(model_input, x, name, num_classes):
    """The All-CNN top: 3x3 and 1x1 convolutions with ReLU, then the class map."""
    x = layers.Conv2D(192, (3, 3), activation="relu", padding="same")(x)
    x = layers.Conv2D(192, (1, 1), activation="relu")(x)
    return _softmax_head(model_input, x, name, num_classes)


def _softmax_head(model_input, x, name, num_classes):
    # No ReLU on the class map (10 channels in the article): it would clip negative
    # class scores to zero before averaging, and the article notes the model then
    # fails to train.
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 for a softmax, got {num_classes}")
    x = layers.Conv2D(num_classes, (1, 1))(x)
    x = layers.GlobalAveragePooling2D()(x)
    # float32 whatever the global policy: under mixed precision a bfloat16 softmax
    # would round confident probabilities to 1 and its log-loss to 0.
    x = layers.Activation("softmax", dtype="float32")(x)
    return keras.Model(model_input, x, name=name)


# The one place that lists the members, in the article's order.
MODELS = {
    "conv_pool_cnn": conv_pool_cnn,
    "all_cnn": all_cnn,
    "nin_cnn": nin_cnn,
}

# The article's names for them, for tables.
PAPER_NAMES = {
    "conv_pool_cnn": "ConvPool-CNN-C",
    "all_cnn": "ALL-CNN-C",
    "nin_cnn": "NIN",
}
