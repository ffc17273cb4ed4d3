"""Pruning-preserving quantization-aware fine-tuning: fake int8 as TFLite computes it.

`quantize_aware(model)` switches every `PruneWrapper` of a pruned model to fake
quantization; a short `fit` then adapts the weights to int8 before
`export_tflite(quantize="int8")`. The scheme is the one TFLite's converter uses for full
integer models:

* weights: per-output-channel symmetric int8, `scale = max|w| / 127`, values in
  [-127, 127], applied to the *masked* weights. Zero is exactly representable, so pruned
  weights stay exactly zero (the masks are untouched and the gradient of a pruned weight
  stays zero).
* activations: each wrapper's output, per-tensor asymmetric int8 (`scale = (max - min) /
  255`, integer zero point), with the range `[min, max]` (always containing 0) an
  exponential moving average of the batch ranges during training, as the converter's
  min/max calibration would see them.

Gradients pass the rounding straight through. Everything is `keras.ops`. Not modelled:
the quantization of the model's input and of layers that are not wrapped (their outputs
are quantized by the converter from calibration alone), and int32 biases (exact enough).
"""

import keras
from keras import ops

from keras_ibprune import _keras_compat

MOMENTUM = 0.99  # EMA of the activation ranges


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
    """Adds the wrapper's activation range `[min, max, seen]` (non-trainable)."""
    wrapper.quant_range = wrapper.add_weight(
        name="quant_range", shape=(3,), initializer="zeros", trainable=False, dtype="float32"
    )


def masked_value(wrapper, weight, masked):
    """The value a fake-quantizing wrapper computes with: masked weights, fake int8."""
    if not getattr(wrapper, "fake_quant", False) or len(weight.shape) < 2:
        return masked
    depthwise = isinstance(wrapper.layer, keras.layers.DepthwiseConv2D)
    return fake_quant_weight(masked, _output_axes(weight, depthwise))


def quantize_output(wrapper, outputs):
    """Updates the activation range while training, then fake-quantizes `outputs`."""
    rng = wrapper.quant_range
    low, high, seen = rng[0], rng[1], rng[2]
    if _keras_compat.call_training(wrapper):
        x = ops.cast(ops.stop_gradient(outputs), "float32")
        batch_low, batch_high = ops.minimum(ops.min(x), 0.0), ops.maximum(ops.max(x), 0.0)
        keep = ops.where(seen > 0, MOMENTUM, 0.0)
        low = keep * low + (1.0 - keep) * batch_low
        high = keep * high + (1.0 - keep) * batch_high
        rng.assign(ops.stack([low, high, ops.ones_like(seen)]))
        seen = ops.ones_like(seen)
    dtype = outputs.dtype
    quantized = fake_quant_activation(outputs, ops.cast(low, dtype), ops.cast(high, dtype))
    # Before any range is known (never trained), the outputs pass unchanged.
    return ops.where(seen > 0, quantized, outputs)


def quantize_aware(model):
    """Switches the `PruneWrapper` layers of a pruned model to int8 fake quantization.

    In place: the masks and weights are kept, each wrapper gets an activation range
    (learned during the next `fit`) and `fake_quant=True` in its config, so a saved model
    reloads quantization-aware. Fine-tune briefly (a few epochs, a small learning rate),
    with or without the `IBPruning` callback, then `export_tflite(quantize="int8")`.

    Args:
        model: a model with `PruneWrapper` layers (from `kib.prune`), built.

    Returns:
        The same model (recompile it before `fit`: the wrappers' computation changed).

    Raises:
        ValueError: the model has no `PruneWrapper`.
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
    return model
