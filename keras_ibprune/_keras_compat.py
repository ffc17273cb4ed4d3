"""Every use of Keras-private API in one place (Keras 3.x), so an upgrade touches one file.

- `all_layers(model)`: every layer, nested models and subclassed attributes included
  (`Layer._flatten_layers`).
- `get_stateless_scope()`: the enclosing `keras.StatelessScope`, or None.
- `producing_layer(tensor)`: the layer that produced a symbolic tensor (`_keras_history`).
- `nodes_by_depth(model)`, `outbound_layers(layer)`: the Functional graph.
- `copy_call_signature(wrapper, layer)`: which of `training` / `mask` Keras passes to
  `call` (`Layer._call_has_training_arg`, `_call_has_mask_arg`).
- `tracking_unlocked(layer)`: a context in which a built layer may add weights
  (`Layer._tracker`).
- `optimizer_slots(optimizer, variable)`: an optimizer's per-variable state
  (`_get_variable_index` and its slot lists).
"""

from __future__ import annotations

import contextlib

import keras

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


def copy_call_signature(wrapper, layer):
    """Makes Keras pass `training` / `mask` to `wrapper.call` exactly when `layer` takes them."""
    wrapper._call_has_training_arg = layer._call_has_training_arg
    wrapper._call_has_mask_arg = layer._call_has_mask_arg


@contextlib.contextmanager
def tracking_unlocked(layer):
    """Lets `layer` create weights after it was built (the tracker is re-locked after)."""
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def optimizer_slots(optimizer, variable):
    """The optimizer's per-element state for `variable` (momentum, velocity, EMA, ...).

    Keras 3 optimizers keep one list per kind of state, indexed like their trainable
    variables (`Adam._momentums`, `SGD.momentums`, `Adafactor._v`, the EMA copies); entries
    of another shape (Adafactor's factored row/column statistics) are left out. Returns []
    when the optimizer is not built or does not track `variable`.
    """
    opt = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    indices = getattr(opt, "_trainable_variables_indices", None)
    if not indices or not getattr(opt, "built", False):
        return []
    try:
        idx = opt._get_variable_index(variable)
    except (KeyError, AttributeError):
        return []
    n = len(opt._trainable_variables)
    shape = tuple(variable.shape)
    slots = []
    for value in vars(opt).values():
        if (not isinstance(value, (list, tuple)) or len(value) != n
                or value is opt._trainable_variables):
            continue
        slot = value[idx]
        if isinstance(slot, keras.Variable) and slot is not variable and tuple(slot.shape) == shape:
            slots.append(slot)
    return slots
