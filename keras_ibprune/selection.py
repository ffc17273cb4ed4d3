"""Which layers `prune` wraps: layer names resolved, containers expanded, the plan made.

`prune(model, layers=..., exclude=...)` names layers by plain name (every layer of that
name, nested ones too), by `"outer/inner"` path (exactly one) or as layer objects; the
name of a custom layer or nested model stands for the prunable layers inside it. `select`
walks the model once and returns the plan: the graph layers to wrap and, per custom
layer, the prunable layers to wrap in place inside it (`keras_ibprune.nested`).
"""

from __future__ import annotations

import dataclasses

import keras

from keras_ibprune import _keras_compat, registry
from keras_ibprune.nested import nested_targets


def is_graph_model(model):
    """Whether `model` is Sequential or Functional (rebuilt by cloning)."""
    return isinstance(model, keras.Sequential) or any(
        c.__name__ == "Functional" for c in type(model).__mro__
    )


@dataclasses.dataclass
class Selection:
    """What `prune` wraps in a model (layers by `id`)."""

    layers: list  # every layer under the model
    only: set | None  # the layers `layers=` named (containers expanded); None: all
    skip: set  # the layers `exclude=` named
    plan: set  # graph layers to wrap, and the targets inside custom layers
    nested: dict  # id(custom layer) -> paths of the targets to wrap inside it


def select(model, layers, exclude, granularity):
    """The layers of a graph `model` that `prune` wraps.

    Args:
        model: a Sequential or Functional model.
        layers: `prune`'s `layers` (names, `"outer/inner"` paths, layers) or None.
        exclude: `prune`'s `exclude`, resolved the same way, or None.
        granularity: `"weight"` or `"channel"`.

    Returns:
        A `Selection`.

    Raises:
        ValueError: an unknown name, a named layer that cannot be pruned (or has no
            units for `granularity="channel"`) or cannot be reached, or nothing to wrap.
    """
    entries = _qualified_layers(model)
    all_layers = [la for _, la in entries]
    only = _expand(_resolve_names(model, entries, layers, "layers"), entries, granularity)
    skip = _resolve_names(model, entries, exclude, "exclude") or set()
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
        return _selectable(layer, granularity)

    # The plan: layers of the (nested) model graphs, and targets inside custom layers.
    plan, nested = set(), {}

    def make_plan(node):
        for layer in _keras_compat.sublayers(node):
            if id(layer) in skip:
                continue
            if isinstance(layer, keras.Model):
                if is_graph_model(layer):
                    make_plan(layer)
            elif wanted(layer):
                plan.add(id(layer))
            elif not registry.is_prunable(layer):
                targets = nested_targets(layer, wanted, skip)
                if targets:
                    nested[id(layer)] = [p for p, _ in targets]
                    plan.update(id(t) for _, t in targets)

    make_plan(model)
    if only is not None and only - plan:
        missed = [la for la in all_layers if id(la) in only - plan]
        where = [q for q, la in entries if id(la) in only - plan]
        raise ValueError(
            f"Cannot wrap {[la.name for la in missed]} of model '{model.name}': "
            + (
                "granularity='channel' applies to layers of the model graph, not to layers "
                "inside custom layers. "
                if granularity == "channel"
                else "they sit inside another prunable layer (name that layer), inside a "
                "subclassed model, or are not built. "
            )
            + f"Received: layers at {where}"
        )
    if not plan:
        raise ValueError(
            f"Model '{model.name}' has no prunable layer (after `layers`/`exclude`). "
            f"Supported types: {registry._SUPPORTED}. Received layers: "
            f"{[type(la).__name__ for la in all_layers]}"
        )
    return Selection(all_layers, only, skip, plan, nested)


def _qualified_layers(model):
    """`[(qualified name, layer)]` of every layer under `model`: `"outer/inner"` paths."""
    out = []

    def walk(node, prefix):
        for layer in _keras_compat.sublayers(node):
            name = f"{prefix}{layer.name}"
            out.append((name, layer))
            walk(layer, name + "/")

    walk(model, "")
    return out


def _resolve_names(model, entries, items, arg):
    """Layer ids named by `items`: a plain name matches every layer of that name (nested
    ones too), `"outer/inner"` exactly one path; layer objects are taken as they are."""
    if items is None:
        return None
    if isinstance(items, (str, keras.layers.Layer)):
        items = [items]
    ids = set()
    for item in items:
        if isinstance(item, keras.layers.Layer):
            ids.add(id(item))
            continue
        if not isinstance(item, str):
            raise ValueError(f"`{arg}` must hold layer names or layers. Received: {arg}={items!r}")
        key = 0 if "/" in item else 1
        found = [la for q, la in entries if (q if key == 0 else la.name) == item]
        if not found:
            raise ValueError(
                f"No layer named {item!r} in model '{model.name}'. Available: "
                f"{sorted({la.name for _, la in entries})} (nested layers also as "
                f"'outer/inner' paths). Received: {arg}={items!r}"
            )
        ids.update(id(la) for la in found)
    return ids


def _expand(ids, entries, granularity):
    """Names of containers (custom layers, nested models) stand for their prunable layers."""
    if ids is None:
        return None
    by_id = {id(la): la for _, la in entries}
    out = set()
    for lid in ids:
        layer = by_id.get(lid)
        if layer is None or registry.is_prunable(layer) or not _keras_compat.sublayers(layer):
            out.add(lid)
            continue
        inner = [la for la in _keras_compat.all_layers(layer) if _selectable(la, granularity)]
        out.update(id(la) for la in inner) if inner else out.add(lid)
    return out


def _selectable(layer, granularity):
    if granularity == "channel":
        return registry.supports_channels(layer)
    return registry.is_prunable(layer)
