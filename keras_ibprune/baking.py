"""Baking: a wrapper's masks (and VIB gate means) multiplied into its layer's weights.

The one path from a `PruneWrapper` to plain weights, used by `strip_pruning` and
`shrink`: weight masks multiply their weights; a channel wrapper's gate means and unit
mask scale each output unit's kernel slice and bias, where that is exact.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ibprune import gates as gates_lib


def baked_weights(wrapper, units=True):
    """Numpy values of `wrapper.layer.weights` with the masks multiplied in.

    Args:
        wrapper: a built `PruneWrapper`.
        units: also bake the unit mask (needs an activation that is 0 at 0).

    Returns:
        A list of numpy arrays in the order of `wrapper.layer.weights`.

    Raises:
        ValueError: the unit mask or the gates cannot be folded exactly (an activation
            not zero at zero; negative gate means with an activation that does not
            commute with negative scaling).
    """
    inner = wrapper.layer
    values = {id(v): ops.convert_to_numpy(v.value) for v in inner.weights}
    for w, m in zip(wrapper.prunable_weights, wrapper.masks):
        value = values[id(w)]
        values[id(w)] = value * ops.convert_to_numpy(m.value).astype(value.dtype)
    if wrapper.gate is not None:
        _scale_units(wrapper, values, _gate_fold(wrapper))
    um = None if wrapper.unit_mask is None else ops.convert_to_numpy(wrapper.unit_mask.value)
    if units and um is not None and um.min() < 1.0:
        act = getattr(inner, "activation", None)
        if act is not None and float(ops.convert_to_numpy(act(ops.zeros((1,))))[0]) != 0.0:
            raise ValueError(
                f"Cannot bake the unit mask of layer '{inner.name}': its activation is not "
                "zero at zero, so a zeroed unit would not output zero. Use `kib.shrink` "
                f"instead. Received: activation={getattr(act, '__name__', act)}"
            )
        _scale_units(wrapper, values, um)
    return [values[id(v)] for v in inner.weights]


def _scale_units(wrapper, values, um):
    """Multiplies each output unit's kernel column and bias (in `values`) by `um`."""
    inner = wrapper.layer
    L = keras.layers
    if isinstance(inner, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        k = inner.kernel
        values[id(k)] = values[id(k)] * um.reshape(k.shape[-2], k.shape[-1])
    elif isinstance(inner, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        values[id(inner.kernel)] = values[id(inner.kernel)] * um[:, None]
    else:
        last = wrapper.prunable_weights[-1]
        values[id(last)] = values[id(last)] * um
    bias = getattr(inner, "bias", None)
    if bias is not None:
        values[id(bias)] = values[id(bias)] * um


def _gate_fold(wrapper):
    """The gate mean μ, checked to fold exactly into the layer's weights."""
    mu = wrapper.gate.mean()
    if not wrapper.gate_pre and mu.min() < 0:
        act = getattr(wrapper.layer, "activation", None)
        if act is not None and not gates_lib.commutes_with_scaling(lambda a: -act(-a)):
            raise ValueError(
                f"Cannot fold the VIB gate of layer '{wrapper.layer.name}': some gate means "
                "are negative and its activation does not commute with negative scaling. "
                f"Keep gate_mu >= 0 (its constraint does). Received: min mu={mu.min()}"
            )
    return mu
