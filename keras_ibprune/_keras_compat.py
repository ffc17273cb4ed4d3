"""Every use of Keras-private API in one place (Keras 3.x), so an upgrade touches one file.

- `all_layers(model)`: every layer, nested models and subclassed attributes included
  (`Layer._flatten_layers`).
- `get_stateless_scope()`: the enclosing `keras.StatelessScope`, or None.
- `producing_layer(tensor)`: the layer that produced a symbolic tensor (`_keras_history`).
- `nodes_by_depth(model)`, `outbound_layers(layer)`, `connected_operations(tensors)`: the
  Functional graph (`_inbound_nodes`, `_outbound_nodes`).
- `copy_call_signature(wrapper, layer)`: Keras binds the wrapper's call arguments with the
  inner layer's signature (`Layer._call_signature`, `_call_has_training_arg`, ...), so
  keywords, several inputs, `training` and masks reach `call` as the inner layer takes them.
- `sublayers(layer)`, `replace_sublayer(parent, old, new)`: direct tracked sublayers and
  in-place replacement (`Layer._layers`, attributes).
- `tracking_unlocked(layer)`: a context in which a built layer may add weights
  (`Layer._tracker`).
- `optimizer_slots(optimizer, variable)`: an optimizer's per-variable state
  (`_get_variable_index` and its slot lists).
- `track_for_checkpoint(layer, name, variable)`: a variable in a list reaches
  `tf.train.Checkpoint` (`_track_trackable`).
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


def connected_operations(tensors):
    """Operations linked to the symbolic `tensors` through the node graph, either way."""
    stack = [producing_layer(t) for t in keras.tree.flatten(tensors)]
    seen, out = set(), []
    while stack:
        op = stack.pop()
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        out.append(op)
        for node in [*getattr(op, "_inbound_nodes", []), *getattr(op, "_outbound_nodes", [])]:
            stack.append(node.operation)
            stack.extend(p.operation for p in node.parent_nodes)
    return out


def copy_call_signature(wrapper, layer):
    """Makes Keras bind `wrapper`'s call arguments exactly as it binds `layer`'s.

    `Layer.__call__` binds `(*args, **kwargs)` against `_call_signature` (first input,
    build shapes, `training` and mask propagation); with the inner layer's signature the
    wrapper (whose `call` takes `*args, **kwargs`) accepts every call form of the layer.
    """
    wrapper._call_signature = layer._call_signature
    wrapper.call_signature_parameters = list(layer.call_signature_parameters)
    wrapper._call_has_training_arg = layer._call_has_training_arg
    wrapper._call_has_mask_arg = layer._call_has_mask_arg
    wrapper._call_context_args = set(layer._call_context_args)
    wrapper._call_has_context_arg = dict(layer._call_has_context_arg)
    wrapper._allow_non_tensor_positional_args = layer._allow_non_tensor_positional_args


def call_parameter_names(layer):
    """Names of `layer.call`'s parameters, in order."""
    return list(layer._call_signature.parameters)


def sublayers(layer):
    """The layers `layer` tracks directly (attributes, lists, dicts), each once."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def replace_sublayer(parent, old, new):
    """Replaces `old` by `new` in `parent`: attributes, lists/dicts of layers, `_layers`.

    Works below Keras' attribute tracking (the tracker is locked once a layer is built).

    Returns:
        The number of references replaced.
    """
    count = 0

    def swap(value):
        nonlocal count
        if value is old:
            count += 1
            return new
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is old:
                    list.__setitem__(value, i, new)
                    count += 1
            return value
        if isinstance(value, tuple) and any(v is old for v in value):
            count += sum(v is old for v in value)
            items = [new if v is old else v for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, dict):
            for k, v in list(value.items()):
                if v is old:
                    dict.__setitem__(value, k, new)
                    count += 1
        return value

    for name, value in list(vars(parent).items()):
        if name == "_layers":
            continue
        result = swap(value)
        if result is not value:
            object.__setattr__(parent, name, result)
    tracked = parent._layers
    for i, v in enumerate(tracked):
        if v is old:
            list.__setitem__(tracked, i, new)
    return count


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


def track_for_checkpoint(layer, name, variable):
    """Makes `tf.train.Checkpoint` reach `variable` under `name` (TensorFlow backend).

    Keras 3 on TensorFlow exposes a layer's variables to TF checkpoints only when they are
    attributes; variables kept in a Python list (the wrapper's masks) are skipped
    (`KerasAutoTrackable._track_trackable`). No-op on other backends.
    """
    track = getattr(layer, "_track_trackable", None)
    if track is not None:
        track(variable, name=name, overwrite=True)


def call_training(layer):
    """The `training` flag of the Keras call in progress (None outside `fit` / `training=`).

    Read from the call context Keras threads through nested `Layer.__call__`s, so a
    wrapper whose inner layer takes no `training` argument still knows the phase.
    """
    return layer._get_call_context().get_value("training")


def in_symbolic_scope():
    """Whether Keras is tracing symbolically (Functional construction, output specs)."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _in

    return _in()
