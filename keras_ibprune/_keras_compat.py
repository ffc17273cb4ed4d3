"""Every use of Keras-private API in one place (Keras 3.x), so an upgrade touches one file.

- `all_layers(model)`: every layer, nested models and subclassed attributes included
  (`Layer._flatten_layers`).
- `get_stateless_scope()`: the enclosing `keras.StatelessScope`, or None.
- `producing_layer(tensor)`: the layer that produced a symbolic tensor (`_keras_history`).
- `nodes_by_depth(model)`, `outbound_layers(layer)`: the Functional graph.
"""

from __future__ import annotations

try:  # Keras >= 3.0 keeps the helper here.
    from keras.src.backend.common.stateless_scope import get_stateless_scope
except ImportError:  # pragma: no cover
    def get_stateless_scope():
        return None


def all_layers(model, recursive=True):
    """Layers of `model` (not the model itself), depth first, each once."""
    return list(model._flatten_layers(include_self=False, recursive=recursive))


def producing_layer(tensor):
    """The operation (layer) whose output `tensor` is, or None."""
    return getattr(getattr(tensor, "_keras_history", None), "operation", None)


def has_graph(model):
    """True for Functional/Sequential models (they keep a node graph)."""
    return hasattr(model, "_nodes_by_depth")


def nodes_by_depth(model):
    """`{depth: [nodes]}` of a Functional model."""
    return model._nodes_by_depth


def outbound_layers(layer):
    """Layers consuming `layer`'s outputs, in graph order."""
    return [n.operation for n in getattr(layer, "_outbound_nodes", [])]
