"""Pruning-preserving quantization-aware fine-tuning: fake int8 as TFLite computes it.

`quantize_aware(model, representative_data)` switches every `PruneWrapper` of a pruned
model to fake quantization; a short `fit` then adapts the weights to int8 before
`export_tflite(quantize="int8")`. The scheme is the one TFLite's converter uses for full
integer models:

* weights: per-output-channel symmetric int8, `scale = max|w| / 127`, values in
  [-127, 127], applied to the *masked* weights. Zero is exactly representable, so pruned
  weights stay exactly zero (the masks are untouched and the gradient of a pruned weight
  stays zero).
* activations: per-tensor asymmetric int8 (`scale = (max - min) / 255`, integer zero
  point) on a range `[min, max]` that always contains 0. Quantized: each wrapper's input
  (the model input, or whatever non-wrapped op feeds it; re-quantizing a tensor that a
  wrapper already quantized on the same range changes nothing) and its output, after the
  activation when TFLite fuses it (linear, ReLU, ReLU6), else before it, followed by the
  fixed output range TFLite gives softmax / sigmoid ([0, 1), scale 1/256) and tanh
  ([-1, 1), scale 1/128).
* ranges: with `representative_data`, the minimum and maximum over the first 200 samples,
  computed with the float model as the converter's calibration does, then kept fixed
  during `fit` (call `quantize_aware` again after `fit` to recalibrate, as the export
  will). Without it, an exponential moving average of batch ranges learned during `fit`
  (narrower than the converter's: the model then matches the int8 file less closely).

Gradients pass the rounding straight through. Everything is `keras.ops`. Not modelled:
int32 bias rounding (below an output step), batch normalization folded by the converter
into a preceding convolution (the wrapper quantizes the convolution's unfolded output),
and ops that the converter requantizes between wrappers (Add, Concatenate, average pooling:
their output is quantized on the next wrapper's input range).
"""

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat

MOMENTUM = 0.99  # EMA of the activation ranges when no calibration data is given
CALIBRATION_SAMPLES = 200  # as many as `export_tflite` hands the converter
_FUSED = ("linear", "relu", "relu6")
_FIXED = {"softmax": (0.0, 255 / 256), "sigmoid": (0.0, 255 / 256), "tanh": (-1.0, 127 / 128)}
# quant_range slots: input [low, high], output [low, high], state (0 none, 1 EMA, 2 calibrated)
_IN, _OUT, _STATE = 0, 2, 4


def _output_axes(weight, depthwise):
    """Axes reduced for the per-channel scale: all but the output channel axis."""
    rank = len(weight.shape)
    if depthwise and rank == 4:  # (h, w, in, multiplier): TFLite's channel is in * mult
        return (0, 1)
    return tuple(range(rank - 1))


def fake_quant_weight(w, axes):
    """Symmetric int8 fake quantization of `w`, one scale per index of the kept axes."""
    max_abs = ops.max(ops.abs(w), axis=axes, keepdims=True)
    scale = ops.maximum(max_abs, 1e-12) / 127.0
    q = ops.clip(ops.round(w / scale), -127.0, 127.0) * scale
    return w + ops.stop_gradient(q - w)


def fake_quant_activation(x, low, high):
    """Asymmetric int8 fake quantization of `x` on the range `[low, high]` (contains 0)."""
    low, high = ops.minimum(low, 0.0), ops.maximum(high, 0.0)
    scale = ops.maximum(high - low, 1e-8) / 255.0
    zero_point = ops.clip(ops.round(-128.0 - low / scale), -128.0, 127.0)
    q = ops.clip(ops.round(x / scale) + zero_point, -128.0, 127.0)
    y = (q - zero_point) * scale
    return x + ops.stop_gradient(ops.cast(y, x.dtype) - x)


def build_range(wrapper):
    """Adds the wrapper's activation ranges (non-trainable, see the slots above)."""
    wrapper.quant_range = wrapper.add_weight(
        name="quant_range", shape=(5,), initializer="zeros", trainable=False, dtype="float32"
    )


def _activation_name(wrapper):
    act = getattr(wrapper.layer, "activation", None)
    return None if act is None else getattr(act, "__name__", None)


def needs_preact(wrapper):
    """True when TFLite quantizes this layer before its (unfused) activation."""
    if not getattr(wrapper, "fake_quant", False):
        return False
    name = _activation_name(wrapper)
    return name is not None and name not in _FUSED


def masked_value(wrapper, weight, masked):
    """The value a fake-quantizing wrapper computes with: masked weights, fake int8."""
    if not getattr(wrapper, "fake_quant", False) or len(weight.shape) < 2:
        return masked
    if getattr(wrapper, "_calibrating", False):  # the converter calibrates in float
        return masked
    depthwise = isinstance(wrapper.layer, keras.layers.DepthwiseConv2D)
    return fake_quant_weight(masked, _output_axes(weight, depthwise))


def _quantize(wrapper, x, slot):
    """Calibrates, learns (EMA) or applies the range in `slot` for the tensor `x`."""
    rng = wrapper.quant_range
    low, high, state = rng[slot], rng[slot + 1], rng[_STATE]
    if getattr(wrapper, "_calibrating", False):  # eager pass: running min / max
        v = ops.convert_to_numpy(ops.cast(x, "float32"))
        values = rng.numpy().copy()
        values[slot] = min(values[slot], float(v.min()), 0.0)
        values[slot + 1] = max(values[slot + 1], float(v.max()), 0.0)
        rng.assign(values)
        return x
    if _keras_compat.call_training(wrapper):
        v = ops.cast(ops.stop_gradient(x), "float32")
        batch_low, batch_high = ops.minimum(ops.min(v), 0.0), ops.maximum(ops.max(v), 0.0)
        keep = ops.where(state > 1, 1.0, ops.where(state > 0, MOMENTUM, 0.0))
        low = keep * low + (1.0 - keep) * batch_low
        high = keep * high + (1.0 - keep) * batch_high
        rng.assign(ops.scatter_update(rng, [[slot], [slot + 1]], ops.stack([low, high])))
        state = ops.maximum(state, 1.0)
    dtype = x.dtype
    quantized = fake_quant_activation(x, ops.cast(low, dtype), ops.cast(high, dtype))
    # Before any range is known (never trained or calibrated), values pass unchanged.
    return ops.where(state > 0, quantized, x)


def _set_state(wrapper):
    """Marks the ranges learned (EMA) once a training step has updated them."""
    rng = wrapper.quant_range
    if _keras_compat.call_training(wrapper) and not getattr(wrapper, "_calibrating", False):
        new_state = ops.maximum(rng[_STATE], 1.0)
        rng.assign(ops.scatter_update(rng, [[_STATE]], ops.reshape(new_state, (1,))))


def quantize_input(wrapper, x):
    """Fake-quantizes a wrapper's (first) input, a float tensor."""
    if not getattr(wrapper, "fake_quant", False) or wrapper.quant_range is None:
        return x
    if not hasattr(x, "dtype") or "float" not in str(x.dtype):
        return x
    return _quantize(wrapper, x, _IN)


def quantize_output(wrapper, outputs, preact=None):
    """Fake-quantizes a wrapper's output where TFLite does (see the module docstring).

    Args:
        wrapper: the `PruneWrapper`.
        outputs: its output (after the activation).
        preact: its pre-activation, given when `needs_preact(wrapper)`.
    """
    if preact is None or not needs_preact(wrapper):
        outputs = _quantize(wrapper, outputs, _OUT)
        _set_state(wrapper)
        return outputs
    name = _activation_name(wrapper)
    outputs = wrapper.layer.activation(_quantize(wrapper, preact, _OUT))
    _set_state(wrapper)
    if name in _FIXED and not getattr(wrapper, "_calibrating", False):
        low, high = _FIXED[name]
        fixed = fake_quant_activation(outputs, low, high)
        outputs = ops.where(wrapper.quant_range[_STATE] > 0, fixed, outputs)
    return outputs


def _calibrate(model, wrappers, data):
    """Sets every range to its min / max over `data`, in float (as the converter does)."""
    first = data if not isinstance(data, dict) else next(iter(data.values()))
    n = min(len(first), CALIBRATION_SAMPLES)
    batch = (
        (lambda i, j: {k: v[i:j] for k, v in data.items()})
        if isinstance(data, dict)
        else (lambda i, j: data[i:j])
    )
    for wrapper in wrappers:
        wrapper.quant_range.assign(np.zeros(5, "float32"))
        wrapper._calibrating = True
    try:
        for start in range(0, n, 50):
            model(batch(start, min(start + 50, n)), training=False)
    finally:
        for wrapper in wrappers:
            wrapper._calibrating = False
    for wrapper in wrappers:
        values = wrapper.quant_range.numpy()
        values[_STATE] = 2.0
        wrapper.quant_range.assign(values)


def quantize_aware(model, representative_data=None):
    """Switches the `PruneWrapper` layers of a pruned model to int8 fake quantization.

    In place: the masks and weights are kept, each wrapper gets activation ranges and
    `fake_quant=True` in its config, so a saved model reloads quantization-aware.
    Fine-tune briefly (an epoch or a few, a small learning rate), with or without the
    `IBPruning` callback, then `export_tflite(quantize="int8")` with the same
    `representative_data`. Calling it again on a quantization-aware model recalibrates.

    Args:
        model: a model with `PruneWrapper` layers (from `kib.prune`), built.
        representative_data: model inputs (batch first; a dict for several inputs), the
            ones `export_tflite` gets: the ranges are their min / max over the first 200
            samples, as the converter computes them, and stay fixed during `fit`. None:
            ranges are a moving average of batch ranges learned during `fit`.

    Returns:
        The same model (recompile it before `fit`: the wrappers' computation changed).

    Raises:
        ValueError: the model has no `PruneWrapper`, one is not built or prunes channels.
    """
    from keras_ibprune.wrapper import PruneWrapper

    layers = _keras_compat.all_layers(model) if isinstance(model, keras.layers.Layer) else []
    wrappers = [layer for layer in layers if isinstance(layer, PruneWrapper)]
    if not wrappers:
        raise ValueError(
            "quantize_aware() expects a pruned model (from `kib.prune`) with "
            f"PruneWrapper layers. Received: model={getattr(model, 'name', model)!r}"
            " without any"
        )
    for wrapper in wrappers:
        if not wrapper.built:
            raise ValueError(
                f"quantize_aware() needs a built model. Received: layer "
                f"{wrapper.name!r} not built (call the model on data first)"
            )
        if wrapper.granularity != "weight":
            raise ValueError(
                "quantize_aware() supports weight-granularity wrappers only. "
                f"Received: layer {wrapper.name!r} with granularity="
                f"{wrapper.granularity!r}"
            )
        if getattr(wrapper, "fake_quant", False):
            continue
        with _keras_compat.tracking_unlocked(wrapper):
            build_range(wrapper)
        wrapper.fake_quant = True
    if representative_data is not None:
        _calibrate(model, wrappers, representative_data)
    return model
