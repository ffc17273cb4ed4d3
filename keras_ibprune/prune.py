"""Wrap a model's prunable layers (`prune`) and unwrap them again (`strip_pruning`).

Sequential and Functional models (nested ones included) are cloned: the result is a new
model holding copies of the original weights, so a pretrained model stays pretrained
and the original is left untouched. Prunable layers inside custom layers are wrapped in
place in the copy of their custom layer (`keras_ibprune.nested`). A layer used twice
becomes one wrapper used twice (shared masks). Subclassed models are pruned by wrapping
layers inside them (`self.fc = kib.PruneWrapper(keras.layers.Dense(10))`);
`strip_pruning` then unwraps them in place.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_ibprune import _keras_compat, registry, selection
from keras_ibprune import gates as gates_lib
from keras_ibprune.nested import (
    NestedPruneWrapper,
    left_dense,
    warn_left_dense,
)
from keras_ibprune.patterns import check_pattern, supports_pattern
from keras_ibprune.stats import find_wrappers
from keras_ibprune.wrapper import PruneWrapper


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


def prune(
    to_prune,
    layers=None,
    exclude=None,
    granularity="weight",
    block_size=None,
    pattern=None,
    gates=None,
    gamma=None,
    policy=None,
):
    """Wraps the prunable layers of a model (or a layer, or a list of layers).

    Prunable layers are found at any depth: in nested Sequential/Functional models (cloned)
    and inside custom layers (e.g. keras_hub's `TransformerEncoder`), where they are
    wrapped in place in a copy of the custom layer (held by a `NestedPruneWrapper`).
    Layers with weight matrices that cannot be pruned are reported in a warning.

    Args:
        to_prune: a Sequential or Functional `keras.Model`, a single layer, or a list of
            layers (as in tfmot's `prune_low_magnitude`).
        layers: optional names (or layer objects) of the only layers to wrap. A plain
            name selects every layer of that name (keras_hub repeats names across
            blocks), `"outer/inner"` one nested layer; the name of a custom layer or a
            nested model selects the prunable layers inside it.
        exclude: optional names (or layer objects) of layers not to wrap, resolved
            the same way.
        granularity: `"weight"` (unstructured) or `"channel"` (units/filters, for
            `shrink`; layers of the model graph only).
        block_size: optional `(rows, cols)` block for weight masks over the
            `(inputs, units)` kernel matrix, e.g. `(16, 1)`, which TFLite runs sparse.
        pattern: optional N:M sparsity for weight masks, e.g. `"2:4"`: at most M − N of
            every M consecutive inputs of a unit are removed (see `PruneWrapper`). Applies
            to Dense and Conv layers; other wrapped layers get unstructured masks (a warning
            names them).
        gates: with `granularity="channel"`: `"vib"` adds a variational information
            bottleneck gate to every output unit (`keras_ibprune.gates`); `fit` trains
            the gates through a KL term added with `add_loss`; `IBPruning(score="vib")`
            removes the units with the lowest `α = μ²/σ²`.
        gamma: the KL weight γ of the gates: a float for every layer or a dict
            `{layer name: γ}` (unnamed layers get the default 1e-4). Change it later with
            `kib.set_gate_gamma`.
        policy: `"xnnpack_sparse"`: wrap only the 1x1 `Conv2D` layers that LiteRT's XNNPACK
            runs with sparse kernels, after checking the graph meets its conditions
            (`kib.check_xnnpack_sparse`; prune them to >= 2/3 sparsity). Excludes `layers`.

    Returns:
        A new model with the same weights whose prunable layers are wrapped (a
        `PruneWrapper` for a layer, a list of them for a list of layers).

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
    gates_lib.check_gates(gates, granularity)
    gamma_of = _gamma_of(gates, gamma)
    if isinstance(to_prune, (list, tuple)) or (
        isinstance(to_prune, keras.layers.Layer) and not isinstance(to_prune, keras.Model)
    ):
        if gates is not None:
            raise ValueError(
                "gates='vib' applies to models (`kib.prune(model, granularity='channel', "
                "gates='vib')`) or single `kib.PruneWrapper(layer, granularity='channel', "
                f"gates='vib')`. Received: to_prune={to_prune!r}"
            )
        return _prune_layers(to_prune, layers, exclude, granularity, block_size, pattern)
    if not isinstance(to_prune, keras.Model):
        raise ValueError(
            "`prune` expects a keras.Model (Sequential or Functional), a keras layer or a "
            f"list of layers. Received: to_prune={to_prune!r}"
        )
    if find_wrappers(to_prune):
        raise ValueError(
            f"Model '{to_prune.name}' already contains PruneWrapper layers; wrapping twice is "
            "not allowed. Call `kib.strip_pruning` first. Received: to_prune="
            f"{to_prune.name!r}"
        )
    if not selection.is_graph_model(to_prune):
        raise ValueError(
            f"`prune` cannot rebuild the subclassed model '{to_prune.name}'. Wrap its layers "
            "where you define them instead, e.g. `self.fc = kib.PruneWrapper("
            "keras.layers.Dense(10))`; the IBPruning callback, strip_pruning and the summary "
            f"then work on it. Received: to_prune of type {type(to_prune).__name__}"
        )
    if policy is not None:
        from keras_ibprune import xnnpack

        layers = xnnpack.policy_layers(to_prune, policy, layers, granularity)
    chosen = selection.select(to_prune, layers, exclude, granularity)
    all_layers, only, skip = chosen.layers, chosen.only, chosen.skip
    plan, nested = chosen.plan, chosen.nested
    if only is None and granularity == "weight":
        covered = {
            id(v)
            for la in all_layers
            if id(la) in plan and la.built
            for v in registry.get_prunable_weights(la)
        }
        warn_left_dense(to_prune, left_dense(to_prune, plan, skip, covered))
    if check_pattern(pattern) is not None:
        unpatterned = [la.name for la in all_layers if id(la) in plan and not supports_pattern(la)]
        unpatterned += [f"layers inside {la.name}" for la in all_layers if id(la) in nested]
        if unpatterned:
            warnings.warn(
                f"prune: pattern={pattern!r} (N:M along the inputs) applies to Dense and Conv "
                f"layers; these get unstructured masks instead: {unpatterned}", stacklevel=2)

    if isinstance(gamma, dict):
        named = {la.name for la in all_layers if id(la) in plan}
        if set(gamma) - named:
            raise ValueError(
                f"`gamma` names layers that are not gated: {sorted(set(gamma) - named)}. Gated "
                f"layers: {sorted(named)}. Received: gamma={gamma!r}"
            )

    # Model outputs keep every channel: their units get no gate (nothing to select).
    outputs = {
        id(_keras_compat.producing_layer(t)) for t in getattr(to_prune, "outputs", None) or []
    }
    # Coupled producers (residual Add branches) share the gate of the first of them.
    gated = {la.name for la in all_layers if id(la) in plan and id(la) not in outputs}
    shared = {} if gates is None else gates_lib.plan_sharing(to_prune, gated)

    def clone_fn(layer):
        copy = _copy_layer(layer)
        if id(layer) in plan:
            if gates is not None and id(layer) not in outputs:
                owner = shared.get(layer.name)
                return PruneWrapper(
                    copy,
                    granularity=granularity,
                    gates=gates,
                    gate_gamma=gamma_of(layer.name),
                    gate_shared_with=None if owner is None else f"prune_{owner}",
                )
            return PruneWrapper(copy, granularity=granularity, block_size=block_size,
                                pattern=pattern if supports_pattern(copy) else None)
        if id(layer) in nested:
            return NestedPruneWrapper(
                copy, nested[id(layer)], granularity=granularity, block_size=block_size,
                pattern=pattern,
            )
        return copy

    new_model, pairs = _clone(to_prune, clone_fn)
    for old, new in pairs:
        if not (old.built and new.built and old.weights):
            continue
        if isinstance(new, NestedPruneWrapper):
            with new.unwrapped() as plain:
                plain.set_weights(old.get_weights())
        else:
            (new.layer if isinstance(new, PruneWrapper) else new).set_weights(old.get_weights())
    if shared:
        gates_lib.link_model(new_model)
    return new_model


def _gamma_of(gates, gamma):
    """`layer name -> γ` from `prune`'s `gamma` (a float, a dict or None)."""
    if gamma is not None and gates is None:
        raise ValueError(f"`gamma` applies with gates='vib' only. Received: gamma={gamma!r}")
    if isinstance(gamma, dict):
        values = {k: gates_lib.check_gamma(v) for k, v in gamma.items()}
        return lambda name: values.get(name, gates_lib.DEFAULT_GAMMA)
    value = gates_lib.check_gamma(gamma)
    return lambda name: value


def _prune_layers(to_prune, layers, exclude, granularity, block_size, pattern=None):
    """tfmot's layer and list forms: a `PruneWrapper` per layer, weights shared."""
    if layers is not None or exclude is not None:
        raise ValueError(
            "`layers` / `exclude` select layers of a model; to wrap some layers only, pass "
            "just those: `kib.prune([dense_1, conv_2])`. Received: "
            f"layers={layers!r}, exclude={exclude!r}"
        )
    items = list(to_prune) if isinstance(to_prune, (list, tuple)) else None
    for la in items if items is not None else [to_prune]:
        if not isinstance(la, keras.layers.Layer) or isinstance(la, keras.Model):
            raise ValueError(
                "`prune` wraps a model, a layer or a list of layers; a list must hold "
                "keras layers only (prune models one by one: `[kib.prune(m) for m in "
                f"models]`). Received: to_prune={to_prune!r}"
            )
    wrap = [
        PruneWrapper(la, granularity=granularity, block_size=block_size, pattern=pattern)
        for la in (items if items is not None else [to_prune])
    ]
    return wrap if items is not None else wrap[0]


def strip_pruning(model):
    """Returns a plain Keras model: wrappers removed, masks baked into the weights.

    Sequential/Functional models are cloned (the pruned model is untouched). For a
    subclassed model the wrappers inside it are replaced by their inner layers, in place,
    and the same model is returned. A single `PruneWrapper` gives back its inner layer.
    Layers wrapped inside custom layers are unwrapped too (a `NestedPruneWrapper` gives
    back its plain custom layer).

    Example:

    ```python
    final = kib.strip_pruning(pruned)
    final.save("small.keras")           # no custom objects needed to load it
    ```
    """
    if isinstance(model, PruneWrapper):
        model.layer.set_weights(model.baked_weights())
        return model.layer
    if isinstance(model, NestedPruneWrapper):
        return model.strip()
    if not isinstance(model, keras.Model):
        raise ValueError(f"`strip_pruning` expects a keras.Model. Received: model={model!r}")
    if not selection.is_graph_model(model):
        return _strip_in_place(model)

    def clone_fn(layer):
        if isinstance(layer, PruneWrapper):
            return _copy_layer(layer.layer)
        if isinstance(layer, NestedPruneWrapper):
            with layer.unwrapped() as plain:
                return _copy_layer(plain)
        return _copy_layer(layer)

    new_model, pairs = _clone(model, clone_fn)
    for old, new in pairs:
        if not (old.built and new.built):
            continue
        if isinstance(old, (PruneWrapper, NestedPruneWrapper)):
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
        if isinstance(value, NestedPruneWrapper):
            return value.strip()
        kinds = (PruneWrapper, NestedPruneWrapper)
        if isinstance(value, (list, tuple)) and any(isinstance(v, kinds) for v in value):
            return type(value)(unwrap(v) for v in value)
        if isinstance(value, dict) and any(isinstance(v, kinds) for v in value.values()):
            return {k: unwrap(v) for k, v in value.items()}
        return value

    objs = [model] + [
        la for la in _all_layers(model) if not isinstance(la, (PruneWrapper, NestedPruneWrapper))
    ]
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
