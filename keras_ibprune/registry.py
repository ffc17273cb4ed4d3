"""Which layers can be pruned, and which of their weights.

The registry maps Keras layer classes to the weights that pruning masks. A custom layer
opts in by defining ``get_prunable_weights()`` returning a list of its variables, or by
calling :func:`register_prunable` once.

Example:

```python
class MyDense(keras.layers.Layer):
    ...
    def get_prunable_weights(self):
        return [self.kernel]
```
"""

from __future__ import annotations

import keras

_SUPPORTED = (
    "Dense, EinsumDense, Conv1D/2D/3D, Conv1DTranspose/2DTranspose/3DTranspose, "
    "DepthwiseConv1D/2D, SeparableConv1D/2D, Embedding, MultiHeadAttention, "
    "SimpleRNN, LSTM, GRU, RNN over SimpleRNNCell/LSTMCell/GRUCell, StackedRNNCells or "
    "cells defining get_prunable_weights()"
)

# Layer class -> function returning the list of prunable variables of a built layer.
_REGISTRY: dict[type, object] = {}


def _attrs(*names):
    def getter(layer):
        return [getattr(layer, n) for n in names]

    return getter


# Recurrent cell class -> prunable variables of a built cell. Cells are not layers one
# wraps on their own: an `RNN` layer is prunable when every cell it runs is.
_CELLS: dict[type, object] = {}


def _cells(cell):
    """The cells an RNN runs: `StackedRNNCells` is flattened (at any depth)."""
    if isinstance(cell, keras.layers.StackedRNNCells):
        return [c for inner in cell.cells for c in _cells(inner)]
    return [cell]


def _cell_getter(cell):
    if hasattr(cell, "get_prunable_weights"):
        return lambda c: list(c.get_prunable_weights())
    for cls in type(cell).__mro__:
        if cls in _CELLS:
            return _CELLS[cls]
    return None


def _rnn(layer):
    return [w for cell in _cells(layer.cell) for w in _cell_getter(cell)(cell)]


def _rnn_supported(layer):
    return all(_cell_getter(c) is not None for c in _cells(layer.cell))


def _mha(layer):
    return [
        layer._query_dense.kernel,
        layer._key_dense.kernel,
        layer._value_dense.kernel,
        layer._output_dense.kernel,
    ]


def register_prunable(layer_class, get_weights):
    """Registers a layer class as prunable.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        get_weights: a callable `layer -> list of variables`, or a list of attribute
            names (e.g. `["kernel"]`) of the built layer.

    Example:

    ```python
    kib.register_prunable(MyConv, ["kernel"])
    ```
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"`layer_class` must be a subclass of keras.layers.Layer. Received: "
            f"layer_class={layer_class!r}"
        )
    if isinstance(get_weights, (list, tuple)):
        get_weights = _attrs(*get_weights)
    if not callable(get_weights):
        raise TypeError(
            "`get_weights` must be a callable or a list of attribute names. "
            f"Received: get_weights={get_weights!r}"
        )
    _REGISTRY[layer_class] = get_weights


L = keras.layers
for _cls in (L.Dense, L.EinsumDense, L.Conv1D, L.Conv2D, L.Conv3D):
    register_prunable(_cls, ["kernel"])
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_prunable(_cls, ["kernel"])
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register_prunable(_cls, ["kernel"])
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register_prunable(_cls, ["depthwise_kernel", "pointwise_kernel"])
register_prunable(L.Embedding, ["embeddings"])
register_prunable(L.MultiHeadAttention, _mha)
register_prunable(L.RNN, _rnn)  # SimpleRNN, LSTM, GRU and generic RNN(cell)
for _cls in (L.SimpleRNNCell, L.LSTMCell, L.GRUCell):
    _CELLS[_cls] = _attrs("kernel", "recurrent_kernel")
del L, _cls


def _lookup(layer):
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def is_prunable(layer) -> bool:
    """Returns whether `layer` can be wrapped by `PruneWrapper`.

    A layer is prunable when its class (or a base class) is registered, or when it
    defines `get_prunable_weights()`.
    """
    if hasattr(layer, "get_prunable_weights"):
        return True
    if isinstance(layer, keras.layers.RNN) and not _rnn_supported(layer):
        return False
    return _lookup(layer) is not None


def get_prunable_weights(layer) -> list:
    """Returns the variables of a built `layer` that pruning masks (never biases).

    Raises:
        ValueError: if the layer is not prunable.
    """
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    getter = _lookup(layer)
    if getter is None or not is_prunable(layer):
        raise ValueError(unsupported_message(layer))
    return list(getter(layer))


def unsupported_message(layer) -> str:
    """The error message for a layer that cannot be wrapped."""
    if isinstance(layer, keras.layers.RNN):
        bad = [type(c).__name__ for c in _cells(layer.cell) if _cell_getter(c) is None]
        return (
            f"Layer '{layer.name}' of type {type(layer).__name__} cannot be pruned: its "
            f"cell(s) {bad} are not prunable. Supported cells: SimpleRNNCell, LSTMCell, "
            "GRUCell (also inside StackedRNNCells); a custom cell opts in by defining "
            f"`get_prunable_weights()`. Received: layer={layer!r}"
        )
    return (
        f"Layer '{getattr(layer, 'name', layer)}' of type {type(layer).__name__} cannot be "
        f"pruned. Supported layer types: {_SUPPORTED}. A custom layer opts in by defining "
        "`get_prunable_weights()` (returning its prunable variables) or via "
        f"`keras_ibprune.register_prunable`. Received: layer={layer!r}"
    )


def supports_channels(layer) -> bool:
    """Whether `layer` has output units/filters that a channel mask can remove."""
    L = keras.layers
    kinds = (
        L.Dense,
        L.Conv1D,
        L.Conv2D,
        L.Conv3D,
        L.Conv1DTranspose,
        L.Conv2DTranspose,
        L.Conv3DTranspose,
        L.SeparableConv1D,
        L.SeparableConv2D,
        L.DepthwiseConv1D,
        L.DepthwiseConv2D,
    )
    if not isinstance(layer, kinds):
        return False
    return getattr(layer, "data_format", "channels_last") == "channels_last"
