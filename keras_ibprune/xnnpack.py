"""Pruning for XNNPACK's sparse inference path (Fast Sparse ConvNets, Elsen et al. 2020).

LiteRT's XNNPACK delegate runs a MobileNet-style subgraph in NCHW layout with sparse
1x1 convolutions when (TensorFlow `lite/delegates/xnnpack/README.md`, "Sparse Inference";
XNNPACK `src/subgraph.c`):

* the weights of its 1x1 convolutions are stored sparse (DENSIFY ops) and at least 2/3 of
  them are zero (counted over the subgraph);
* it starts with a 3x3 stride-2 CONV_2D with padding 1 on each side and 3 input channels,
  and ends with a spatial MEAN (Keras `GlobalAveragePooling2D`) or DEPTH_TO_SPACE;
* inside it there are only 1x1 CONV_2D (stride 1, no padding), 3x3 / 5x5 DEPTHWISE_CONV_2D
  (stride 1 or 2, padding k // 2 on each side), ADD / MUL of 4-D tensors, RESIZE_BILINEAR
  and unary elementwise ops (ReLU, ReLU6, sigmoid, hard-swish, ...);
* the delegate asks for it by itself (`XNN_FLAG_HINT_SPARSE_INFERENCE` whenever a delegated
  partition reads DENSIFY'd static weights): there is no option to set;
* the CPU supports it: on x86 XNNPACK turns the path off when the CPU has AVX ("dense
  inference is expected to be faster"), so desktop / server x86 runs such files dense.
  ARM phones run it.

Padding. XNNPACK converts TensorFlow "SAME" padding to explicit padding only for stride 1;
a stride-2 op with "SAME" padding keeps the TensorFlow flag and is refused. The converter
folds `ZeroPadding2D` + a "valid" stride-2 conv into one "SAME" op when the two agree, so
`export_tflite(sparse=True)` rewrites each stride-2 "SAME" CONV_2D / DEPTHWISE_CONV_2D whose
padding is symmetric back into PAD + "VALID" (XNNPACK fuses that PAD into the convolution).
The padding is symmetric (k // 2 on each side) when the op's input height and width are odd;
for a network with five stride-2 stages (MobileNetV2) that means input sizes 32k + 1
(33, 97, 161, 225, ...). Even sizes pad (0, 1): a different function, which the sparse
path cannot compute.
"""

import keras

from keras_ibprune import _keras_compat

POLICIES = ("xnnpack_sparse",)

_UNARY = (
    "ReLU",
    "ELU",
    "LeakyReLU",
    "Activation",
    "Dropout",
    "GaussianNoise",
    "SpatialDropout2D",
    "BatchNormalization",
    "Rescaling",
)
_UNARY_ACTIVATIONS = (
    "linear",
    "relu",
    "relu6",
    "sigmoid",
    "hard_swish",
    "hard_silu",
    "elu",
    "leaky_relu",
    "abs",
)
_MERGE = ("Add", "Multiply")


def _kind(layer):
    return type(layer).__name__


def _spatial(tensor):
    shape = tuple(tensor.shape)
    return shape[1:3] if len(shape) == 4 else None


def _same_is_symmetric(size, kernel, stride):
    """TF "SAME" padding of one dimension is `kernel // 2` on each side."""
    if size is None:
        return False
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total == 2 * (kernel // 2)


def _error(layer, what, expected, received):
    return ValueError(
        f"policy='xnnpack_sparse': layer '{layer.name}' ({_kind(layer)}) {what}; XNNPACK's "
        f"sparse path expects {expected}. Received: {received}"
    )


def _pad_of(layer):
    """`((top, bottom), (left, right))` of a ZeroPadding2D layer."""
    return tuple(tuple(int(v) for v in p) for p in layer.padding)


def _check_padding(layer, kernel, stride, prev):
    """Checks the spatial padding a stride-`stride` conv sees (its own or a ZeroPadding2D's)."""
    size = _spatial(layer.input)
    want = kernel // 2
    if layer.padding == "same":
        if (
            stride == 1
            or _same_is_symmetric(size[0], kernel, stride)
            and _same_is_symmetric(size[1], kernel, stride)
        ):
            return
        raise _error(
            layer,
            f"uses padding='same' with stride 2 on a {size[0]}x{size[1]} input, "
            "which pads (0, 1) (asymmetric)",
            f"padding {want} on each side: odd input sizes (for MobileNet-style "
            "networks 32k + 1, e.g. 97 or 225)",
            f"input shape {tuple(layer.input.shape)}",
        )
    if prev is not None and _kind(prev) == "ZeroPadding2D":
        pad = _pad_of(prev)
        if pad == ((want, want), (want, want)):
            return
        raise _error(
            prev,
            f"pads {pad} before the stride-{stride} layer '{layer.name}'",
            f"symmetric padding (({want}, {want}), ({want}, {want})): keras.applications "
            "pads symmetrically for odd input sizes (32k + 1, e.g. 97 or 225)",
            f"padding={pad}",
        )
    raise _error(
        layer,
        "has padding='valid' without a ZeroPadding2D before it",
        f"padding {want} on each side (padding='same' on odd input sizes, or "
        f"ZeroPadding2D({want}) + 'valid')",
        "padding='valid'",
    )


def _inbound(layer):
    return (
        _keras_compat.producing_layer(layer.input)
        if not isinstance(layer.input, (list, tuple))
        else None
    )


def check_xnnpack_sparse(model):
    """Checks that a model's graph can run XNNPACK's sparse path; returns its 1x1 convs.

    The graph must start with a 3x3 stride-2 `Conv2D` on 3 input channels (padding 1 on
    each side: `padding="same"` on an odd input size, or `ZeroPadding2D(1)` + `"valid"`),
    continue with 1x1 `Conv2D` (stride 1), 3x3 / 5x5 `DepthwiseConv2D` (stride 1 or 2,
    symmetric padding), `Add` / `Multiply`, `BatchNormalization` and elementwise
    activations, and end with `GlobalAveragePooling2D`; anything may follow that. The
    1x1 convolutions must end up at least 2/3 zero (the pruning target) for the runtime to
    choose the sparse kernels.

    Args:
        model: a Functional or Sequential `keras.Model` with a 4-D (NHWC) input.

    Returns:
        The 1x1 `Conv2D` layers (in graph order) that run sparse; only these are pruned
        by `kib.prune(model, policy="xnnpack_sparse")`.

    Raises:
        ValueError: naming the first layer that breaks the conditions and what is expected.
    """
    if not isinstance(model, keras.Model) or not _keras_compat.has_graph(model):
        raise ValueError(
            "policy='xnnpack_sparse' needs a Functional or Sequential model. "
            f"Received: {type(model).__name__}"
        )
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ValueError(
            "policy='xnnpack_sparse' needs one image input (batch, height, "
            "width, channels). Received: input shapes "
            f"{[tuple(t.shape) for t in model.inputs]}"
        )
    started, ended, eligible = False, None, []
    for layer in model.layers:
        kind = _kind(layer)
        if ended is not None and kind in ("Conv2D", "DepthwiseConv2D"):
            raise _error(
                layer,
                f"follows the GlobalAveragePooling2D '{ended.name}'",
                "the sparse subgraph to end at its first spatial mean (squeeze-and-"
                "excitation blocks, as in MobileNetV3, are not supported by this "
                "check)",
                f"layer of type {kind} after '{ended.name}'",
            )
        if kind == "InputLayer" or ended is not None:
            continue
        prev = _inbound(layer)
        if kind == "Conv2D" and not started:
            k, s = tuple(layer.kernel_size), tuple(layer.strides)
            channels = layer.input.shape[-1]
            if (
                k != (3, 3)
                or s != (2, 2)
                or tuple(layer.dilation_rate) != (1, 1)
                or (channels != 3)
                or layer.groups != 1
            ):
                raise _error(
                    layer,
                    "is the first convolution",
                    "a 3x3 stride-2 Conv2D on 3 "
                    "input channels (no dilation or groups) to start the sparse "
                    "subgraph",
                    f"kernel_size={k}, strides={s}, input channels={channels}",
                )
            _check_padding(layer, 3, 2, prev)
            started = True
        elif not started:
            if kind in ("ZeroPadding2D", "Rescaling", "Normalization"):
                continue
            raise _error(
                layer,
                "comes before the first convolution",
                "the graph to start with a 3x3 stride-2 Conv2D",
                f"layer of type {kind}",
            )
        elif kind == "Conv2D":
            k, s = tuple(layer.kernel_size), tuple(layer.strides)
            if (
                k != (1, 1)
                or s != (1, 1)
                or tuple(layer.dilation_rate) != (1, 1)
                or (layer.groups != 1)
            ):
                raise _error(
                    layer,
                    "is a convolution inside the sparse subgraph",
                    "only 1x1 Conv2D with stride 1 (no dilation or groups) there",
                    f"kernel_size={k}, strides={s}",
                )
            eligible.append(layer)
        elif kind == "DepthwiseConv2D":
            k, s = tuple(layer.kernel_size), tuple(layer.strides)
            if (
                k not in ((3, 3), (5, 5))
                or s not in ((1, 1), (2, 2))
                or tuple(layer.dilation_rate) != (1, 1)
                or layer.depth_multiplier != 1
            ):
                raise _error(
                    layer,
                    "is a depthwise convolution inside the sparse subgraph",
                    "3x3 or 5x5 kernels, stride 1 or 2, depth_multiplier 1",
                    f"kernel_size={k}, strides={s}, depth_multiplier={layer.depth_multiplier}",
                )
            _check_padding(layer, k[0], s[0], prev)
        elif kind == "ZeroPadding2D":
            nxt = _keras_compat.outbound_layers(layer)
            if not nxt or _kind(nxt[0]) != "DepthwiseConv2D" or nxt[0].padding != "valid":
                raise _error(
                    layer,
                    "pads outside a stride-2 depthwise convolution",
                    "ZeroPadding2D only directly before a 'valid' DepthwiseConv2D",
                    f"padding={_pad_of(layer)}",
                )
        elif kind in _MERGE:
            shapes = [tuple(t.shape) for t in layer.input]
            if any(len(sh) != 4 for sh in shapes):
                raise _error(
                    layer, "merges non-image tensors", "4-D inputs", f"input shapes {shapes}"
                )
        elif kind == "GlobalAveragePooling2D":
            ended = layer
        elif kind in _UNARY:
            act = getattr(getattr(layer, "activation", None), "__name__", "linear")
            if kind == "Activation" and act not in _UNARY_ACTIVATIONS:
                raise _error(
                    layer, f"applies {act!r}", f"one of {_UNARY_ACTIVATIONS}", f"activation={act!r}"
                )
        else:
            raise _error(
                layer,
                "is inside the sparse subgraph",
                "only 1x1 Conv2D, "
                "DepthwiseConv2D, Add/Multiply, BatchNormalization and elementwise "
                "activations between the first convolution and "
                "GlobalAveragePooling2D",
                f"layer of type {kind}",
            )
        act = getattr(getattr(layer, "activation", None), "__name__", "linear")
        if kind in ("Conv2D", "DepthwiseConv2D") and act not in _UNARY_ACTIVATIONS:
            raise _error(
                layer,
                f"uses activation={act!r}",
                f"one of {_UNARY_ACTIVATIONS}",
                f"activation={act!r}",
            )
    if not started:
        raise ValueError(
            "policy='xnnpack_sparse': the model has no Conv2D to start the "
            "sparse subgraph (a 3x3 stride-2 Conv2D on 3 input channels). "
            f"Received: layers {[la.name for la in model.layers]}"
        )
    if ended is None:
        raise ValueError(
            "policy='xnnpack_sparse': the sparse subgraph must end with "
            "GlobalAveragePooling2D (a spatial MEAN). Received: no "
            "GlobalAveragePooling2D in model " + repr(model.name)
        )
    if not eligible:
        raise ValueError(
            "policy='xnnpack_sparse': the model has no 1x1 Conv2D to prune. "
            f"Received: model {model.name!r}"
        )
    return eligible


def policy_layers(model, policy, layers, granularity="weight"):
    """The layers `prune(model, policy=...)` wraps (checked), for `prune`'s `layers=`."""
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be None or one of {POLICIES}. Received: policy={policy!r}")
    if layers is not None:
        raise ValueError(
            "Pass either `policy` or `layers`, not both: the policy chooses the "
            f"layers. Received: policy={policy!r}, layers={layers!r}"
        )
    if granularity != "weight":
        raise ValueError(
            "policy='xnnpack_sparse' prunes weights (sparse kernels), not "
            f"channels. Received: granularity={granularity!r}"
        )
    return check_xnnpack_sparse(model)
