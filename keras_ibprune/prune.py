"""Wrap a model's prunable layers (`prune`) and unwrap them again (`strip_pruning`).

Sequential and Functional models (nested ones included) are cloned: the result is a new
model holding copies of the original weights, so a pretrained model stays pretrained
and the original is left untouched. A layer used twice becomes one wrapper used twice
(shared masks). Subclassed models are pruned by wrapping layers inside them
(`self.fc = kib.PruneWrapper(keras.layers.Dense(10))`); `strip_pruning` then unwraps
them in place.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_ibprune import _keras_compat, registry
from keras_ibprune.stats import find_wrappers
from keras_ibprune.wrapper import PruneWrapper


def _is_graph_model(model):
    return isinstance(model, keras.Sequential) or any(
        c.__name__ == "Functional" for c in type(model).__mro__
    )


def _all_layers(model):
    return _keras_compat.all_layers(model)


def _copy_layer(layer):
    return layer.__class__.from_config(layer.get_config())


def _clone(model, fn):
    """Clones a graph model (recursively) with `fn(layer) -> new layer`; copies weights."""
    pairs = []

    def clone_fn(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless `keras.ops` operation used on symbolic tensors
        new = fn(layer)
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_fn, recursive=True)
    return new_model, pairs


def prune(to_prune, layers=None, exclude=None, granularity="weight", block_size=None):
    """Wraps the prunable layers of a model (or a single layer) in `PruneWrapper`.

    Args:
        to_prune: a Sequential or Functional `keras.Model`, or a single layer.
        layers: optional names (or layer objects) of the only layers to wrap.
        exclude: optional names (or layer objects) of layers not to wrap.
        granularity: `"weight"` (unstructured) or `"channel"` (units/filters, for
            `shrink`).
        block_size: optional `(rows, cols)` block for weight masks over the
            `(inputs, units)` kernel matrix, e.g. `(16, 1)`, which TFLite runs sparse.

    Returns:
        A new model with the same weights whose prunable layers are wrapped (or a
        `PruneWrapper` when given a layer).

    Raises:
        ValueError: bad input (not a model/layer, nothing prunable, unknown layer
            names, an already pruned model, a subclassed model).

    Example:

    ```python
    pruned = kib.prune(model, exclude=["logits"])
    pruned.compile("adam", "sparse_categorical_crossentropy")
    pruned.fit(x, y, epochs=4, callbacks=[kib.IBPruning(kib.PolynomialDecay(0, .9, 0, 3))])
    ```
    """
    if isinstance(to_prune, keras.layers.Layer) and not isinstance(to_prune, keras.Model):
        return PruneWrapper(to_prune, granularity=granularity, block_size=block_size)
    if not isinstance(to_prune, keras.Model):
        raise ValueError(
            "`prune` expects a keras.Model (Sequential or Functional) or a keras layer. "
            f"Received: to_prune={to_prune!r}"
        )
    if find_wrappers(to_prune):
        raise ValueError(
            f"Model '{to_prune.name}' already contains PruneWrapper layers; wrapping twice is "
            "not allowed. Call `kib.strip_pruning` first. Received: to_prune="
            f"{to_prune.name!r}"
        )
    if not _is_graph_model(to_prune):
        raise ValueError(
            f"`prune` cannot rebuild the subclassed model '{to_prune.name}'. Wrap its layers "
            "where you define them instead, e.g. `self.fc = kib.PruneWrapper("
            "keras.layers.Dense(10))`; the IBPruning callback, strip_pruning and the summary "
            f"then work on it. Received: to_prune of type {type(to_prune).__name__}"
        )
    all_layers = _all_layers(to_prune)
    by_name = {layer.name: layer for layer in all_layers}

    def resolve(items, arg):
        if items is None:
            return None
        if isinstance(items, (str, keras.layers.Layer)):
            items = [items]
        ids = set()
        for item in items:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(
                        f"No layer named {item!r} in model '{to_prune.name}'. Available: "
                        f"{sorted(by_name)}. Received: {arg}={items!r}"
                    )
                item = by_name[item]
            elif not isinstance(item, keras.layers.Layer):
                raise ValueError(
                    f"`{arg}` must hold layer names or layers. Received: {arg}={items!r}"
                )
            ids.add(id(item))
        return ids

    only, skip = resolve(layers, "layers"), resolve(exclude, "exclude") or set()
    if only is not None:
        for lid in only:
            layer = next(la for la in all_layers if id(la) == lid)
            if not registry.is_prunable(layer):
                raise ValueError(registry.unsupported_message(layer))
            if granularity == "channel" and not registry.supports_channels(layer):
                raise ValueError(
                    f"granularity='channel' does not apply to layer {layer.name!r} of type "
                    f"{type(layer).__name__}; only Dense/Conv-style layers have units to remove."
                )

    def wanted(layer):
        if isinstance(layer, keras.Model) or id(layer) in skip:
            return False
        if only is not None:
            return id(layer) in only
        if granularity == "channel":
            return registry.supports_channels(layer)
        return registry.is_prunable(layer)

    if not any(wanted(la) for la in all_layers):
        raise ValueError(
            f"Model '{to_prune.name}' has no prunable layer (after `layers`/`exclude`). "
            f"Supported types: {registry._SUPPORTED}. Received layers: "
            f"{[type(la).__name__ for la in all_layers]}"
        )

    def clone_fn(layer):
        copy = _copy_layer(layer)
        if wanted(layer):
            return PruneWrapper(copy, granularity=granularity, block_size=block_size)
        return copy

    new_model, pairs = _clone(to_prune, clone_fn)
    for old, new in pairs:
        target = new.layer if isinstance(new, PruneWrapper) else new
        if old.built and target.built and old.weights:
            target.set_weights(old.get_weights())
    return new_model


def strip_pruning(model):
    """Returns a plain Keras model: wrappers removed, masks baked into the weights.

    Sequential/Functional models are cloned (the pruned model is untouched). For a
    subclassed model the wrappers inside it are replaced by their inner layers, in place,
    and the same model is returned. A single `PruneWrapper` gives back its inner layer.

    Example:

    ```python
    final = kib.strip_pruning(pruned)
    final.save("small.keras")           # no custom objects needed to load it
    ```
    """
    if isinstance(model, PruneWrapper):
        model.layer.set_weights(model.baked_weights())
        return model.layer
    if not isinstance(model, keras.Model):
        raise ValueError(f"`strip_pruning` expects a keras.Model. Received: model={model!r}")
    if not _is_graph_model(model):
        return _strip_in_place(model)

    def clone_fn(layer):
        if isinstance(layer, PruneWrapper):
            return _copy_layer(layer.layer)
        return _copy_layer(layer)

    new_model, pairs = _clone(model, clone_fn)
    for old, new in pairs:
        if not (old.built and new.built):
            continue
        if isinstance(old, PruneWrapper):
            new.set_weights(old.baked_weights())
        elif old.weights:
            new.set_weights(old.get_weights())
    return new_model


def _strip_in_place(model):
    """Replaces `PruneWrapper` attributes of a subclassed model by their inner layers."""

    def unwrap(value):
        if isinstance(value, PruneWrapper):
            if value.built:
                value.layer.set_weights(value.baked_weights())
            return value.layer
        if isinstance(value, (list, tuple)) and any(isinstance(v, PruneWrapper) for v in value):
            return type(value)(unwrap(v) for v in value)
        if isinstance(value, dict) and any(isinstance(v, PruneWrapper) for v in value.values()):
            return {k: unwrap(v) for k, v in value.items()}
        return value

    objs = [model] + [la for la in _all_layers(model) if not isinstance(la, PruneWrapper)]
    for obj in objs:
        for name, value in list(vars(obj).items()):
            if name.startswith("_") and name not in ("_layers",):
                continue
            new = unwrap(value)
            if new is not value:
                object.__setattr__(obj, name, new)
        tracked = getattr(obj, "_layers", None)
        if isinstance(tracked, list):
            tracked[:] = [unwrap(v) for v in tracked]
    remaining = np.sum([isinstance(la, PruneWrapper) for la in _all_layers(model)])
    if remaining:
        raise ValueError(
            f"Could not strip {remaining} PruneWrapper(s) held in unusual containers of "
            f"subclassed model '{model.name}'. Keep wrappers as attributes or in lists/dicts."
        )
    return model
