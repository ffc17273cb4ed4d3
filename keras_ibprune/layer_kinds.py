"""How each kind of layer (or `keras.ops` node) treats the channel axis.

The taxonomy behind `graph`: which layers produce channels, pass them through, couple
them or mix them, plus the checks that decide it for operations that are not
`keras.layers` classes: elementwise `keras.ops` calls on symbolic tensors (``x + 3``,
``x * (1 / 6)``, ``ops.relu6(x)``) and per-channel custom layers.

A custom layer opts in as per-channel by setting the class attribute
``channelwise = True``: its output has the input's shape, output channel ``c`` depends
only on input channel ``c`` at the same position, and every weight whose last axis has
the channel count is per channel (sliced by `shrink`). A layer whose weights all have
shape ``(C,)`` (``LayerScale``) is recognised without the attribute when a numerical
probe confirms that it does not mix channels.
"""

from __future__ import annotations

import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat

L = keras.layers
CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
CONV_T = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
SEP = (L.SeparableConv1D, L.SeparableConv2D)
DW = (L.DepthwiseConv1D, L.DepthwiseConv2D)
PRODUCERS = (L.Dense, *CONV, *CONV_T, *SEP)
POOLING = tuple(getattr(L, f"{kind}Pooling{d}D") for kind in ("Max", "Average") for d in (1, 2, 3))
GLOBAL_POOLING = tuple(
    getattr(L, f"Global{kind}Pooling{d}D") for kind in ("Average", "Max") for d in (1, 2, 3)
)
IDENTITY = (
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    *POOLING,
    *GLOBAL_POOLING,
    L.RepeatVector,
)
PADDING = (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)
ACTIVATIONS = (L.ReLU, L.LeakyReLU, L.ELU, L.Activation)
MERGES = {
    L.Add: np.add,
    L.Subtract: np.subtract,
    L.Multiply: np.multiply,
    L.Average: None,
    L.Maximum: np.maximum,
    L.Minimum: np.minimum,
}
RESHAPES = (L.Flatten, L.Reshape)
# Normalizations whose statistics run over the channel axis: removing a channel (even an
# all-zero one) changes every other channel's output, so their inputs are kept.
CHANNEL_NORMS = tuple(
    getattr(L, n)
    for n in ("LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization")
    if hasattr(L, n)
)
ELEMENTWISE = {
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "tanh",
    "softplus",
    "softsign",
    "exponential",
    "mish",
    "celu",
    "log_sigmoid",
    "hard_tanh",
    "tanh_shrink",
    "squareplus",
    "sparse_plus",
    "soft_shrink",
    "hard_shrink",
}
# `keras.ops` operations (class names) that act position by position: with one tensor
# and constants they keep channels, with several same-width tensors they couple them.
ELEMENTWISE_OPS = {
    "Add",
    "Subtract",
    "Multiply",
    "Divide",
    "TrueDivide",
    "Power",
    "Maximum",
    "Minimum",
    "Negative",
    "Abs",
    "Absolute",
    "Square",
    "Sqrt",
    "Exp",
    "Expm1",
    "Log",
    "Log1p",
    "Reciprocal",
    "Clip",
    "Cast",
    "Tanh",
    "Sigmoid",
    "HardSigmoid",
    "HardSilu",
    "Silu",
    "Relu",
    "Relu6",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "LeakyRelu",
    "LogSigmoid",
    "HardTanh",
    "SoftShrink",
    "HardShrink",
    "TanhShrink",
    "Squareplus",
    "SparsePlus",
    "Threshold",
}


def is_wrapper(layer):
    """True for a keras_ibprune `PruneWrapper` (checked by class name, no import)."""
    return type(layer).__name__ == "PruneWrapper" and hasattr(layer, "layer")


def is_channel_wrapper(layer):
    return (
        is_wrapper(layer)
        and getattr(layer, "granularity", None) == "channel"
        and getattr(layer, "unit_mask", None) is not None
    )


def functional_of(model):
    """The Functional graph behind `model` (Sequential models included)."""
    if isinstance(model, keras.Sequential):
        func = getattr(model, "_functional", None)
        if func is None:
            raise ValueError(
                "The Sequential model has no known input shape; start it with "
                f"`keras.Input(...)` or build it first. Received: model={model.name!r}"
            )
        return func
    if not isinstance(model, keras.Model) or not _keras_compat.has_graph(model):
        raise ValueError(
            "Expected a Functional or Sequential keras.Model (subclassed models have no "
            f"graph to analyse). Received: model={model!r}"
        )
    return model


def act_is_zero_at_zero(layer):
    act = getattr(layer, "activation", None)
    if act is None:
        return True
    with warnings.catch_warnings():  # softmax over a 1-element probe warns; expected here
        warnings.simplefilter("ignore", UserWarning)
        return float(ops.convert_to_numpy(act(ops.zeros((1,))))[0]) == 0.0


def no_padding(layer):
    """True when a convolution never reads padded positions."""
    return layer.padding == "valid" or all(int(k) == 1 for k in layer.kernel_size)


def is_grouped(layer):
    """A Conv1D/2D/3D with `groups > 1` (ConvNeXt's depthwise, ResNeXt's grouped conv)."""
    return isinstance(layer, CONV) and int(getattr(layer, "groups", 1)) > 1


def group_sizes(layer):
    """(input channels, output channels) per group of a grouped or depthwise conv."""
    if isinstance(layer, DW):
        return 1, int(layer.depth_multiplier)
    return int(layer.kernel.shape[-2]), int(layer.filters) // int(layer.groups)


def num_units(layer):
    if isinstance(layer, L.Dense):
        return int(layer.units)
    if isinstance(layer, DW):
        return int(layer.kernel.shape[-2] * layer.kernel.shape[-1])
    return int(layer.filters)


# ------------------------------------------------------------ keras.ops nodes
def is_elementwise_op(op):
    """A `keras.ops` operation node (not a layer) that acts position by position."""
    cls = type(op)
    return (
        isinstance(op, keras.Operation)
        and not isinstance(op, keras.layers.Layer)
        and cls.__module__.startswith("keras.")
        and cls.__name__ in ELEMENTWISE_OPS
    )


def node_constants(node):
    """The non-tensor arguments of a node (scalars, arrays, concrete tensors)."""
    args = keras.tree.flatten((node.arguments.args, node.arguments.kwargs))
    return [a for a in args if not isinstance(a, keras.KerasTensor) and a is not None]


def const_width(value):
    """Last-axis size of a constant argument (1 for scalars, None if not array-like)."""
    if isinstance(value, (bool, int, float, np.number)):
        return 1
    if isinstance(value, str) or not hasattr(value, "shape"):
        return None
    shape = tuple(value.shape)
    return 1 if not shape else shape[-1]


# ------------------------------------------------------------ per-channel layers
_CHANNELWISE = weakref.WeakKeyDictionary()


def is_channelwise(layer, rank, width):
    """Whether a custom single-input layer keeps channels apart (hook or probe).

    Args:
        layer: the layer (not a known Keras class).
        rank: rank of its input, batch included.
        width: channel count of its input.
    """
    declared = getattr(type(layer), "channelwise", None)
    if declared is not None:
        return bool(declared)
    if not layer.weights or any(tuple(w.shape) != (width,) for w in layer.weights):
        return False
    cached = _CHANNELWISE.get(layer)
    if cached is not None and cached[0] == (rank, width):
        return cached[1]
    ok = _probe_channelwise(layer, rank, width)
    _CHANNELWISE[layer] = ((rank, width), ok)
    return ok


def _probe_channelwise(layer, rank, width):
    """Perturbs one channel per batch row: only that channel of the output may move."""
    if width > 4096:
        return False
    rng = np.random.default_rng(0)
    base = rng.normal(size=width).astype("float32")
    x = np.tile(base, (width + 1, 1))
    x[1:] += np.eye(width, dtype="float32") * (1.0 + np.abs(base))
    x = x.reshape((width + 1,) + (1,) * (rank - 2) + (width,))
    try:
        y = ops.convert_to_numpy(layer(ops.convert_to_tensor(x), training=False))
    except Exception:  # noqa: BLE001 - a layer that cannot take the probe is not analysed
        return False
    if y.shape != x.shape:
        return False
    y = y.reshape(width + 1, width).astype(np.float64)
    diff = np.abs(y[1:] - y[0])
    off = diff[~np.eye(width, dtype=bool)]
    return bool(
        np.all(np.isfinite(y)) and (off.size == 0 or off.max() <= 1e-6 * (1.0 + np.abs(y).max()))
    )
