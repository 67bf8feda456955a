"""The backend's devices and the dtype policy models are built under."""

import keras


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
