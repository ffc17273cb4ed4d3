"""Prunable layers nested inside custom layers: wrapped in place, saved and loaded.

A custom `keras.layers.Layer` (not a Model) that holds prunable layers, e.g. keras_hub's
`TransformerEncoder` with its attention and feed-forward Dense layers, is not rebuilt by
`clone_model`. `kib.prune` therefore copies it, replaces each prunable sublayer by a
`PruneWrapper` in place (the attribute and the entry in the tracked sublayer list; the
weights stay the same variables), and holds the copy in a `NestedPruneWrapper`. The
container records where the wrappers sit (index paths through the tracked sublayers), so
`keras.models.load_model` restores them, and `strip_pruning` gives back the plain layer
with the masks baked in.
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np

from keras_ibprune import _keras_compat, registry
from keras_ibprune.patterns import check_pattern
from keras_ibprune.wrapper import PruneWrapper, _single_shape_build


def nested_targets(layer, wanted, skip=frozenset(), path=()):
    """`(index path, sublayer)` of the built sublayers under `layer` to wrap.

    The walk descends through layers that are not prunable themselves (at any depth); it
    stops at models (`prune` clones those), wrappers, prunable layers and `skip` (ids).
    """
    out = []
    for i, child in enumerate(_keras_compat.sublayers(layer)):
        if isinstance(child, (keras.Model, PruneWrapper, NestedPruneWrapper)):
            continue
        if id(child) in skip:
            continue
        if wanted(child):
            if child.built and child.weights:
                out.append((path + (i,), child))
        elif not registry.is_prunable(child):
            out.extend(nested_targets(child, wanted, skip, path + (i,)))
    return out


def _resolve(root, path):
    """`(parent, child, names)` at an index path under `root`."""
    parent, names = root, [root.name]
    for depth, i in enumerate(path):
        children = _keras_compat.sublayers(parent)
        if i >= len(children):
            raise ValueError(
                f"Layer '{root.name}' has no sublayer at path {list(path)} (it has "
                f"{len(children)} sublayers at depth {depth}): the layer's structure differs "
                f"from the one that was pruned. Received: path={list(path)}"
            )
        child = children[i]
        names.append(child.name)
        if depth == len(path) - 1:
            return parent, child, names
        parent = child
    raise ValueError(f"An index path needs at least one index. Received: path={list(path)}")


def left_dense(model, plan, skip, covered):
    """`[(qualified name, layer, weights)]`: weight matrices no wrapper will mask.

    `plan` / `skip`: ids of the layers to wrap / left out on purpose; `covered`: ids of the
    variables the wrappers will mask. A layer with nothing to wrap inside is reported as a
    whole; one with wrapped layers inside is entered.
    """
    out = []

    def matrices(layer):
        return [v for v in layer.trainable_weights if len(v.shape) >= 2 and id(v) not in covered]

    def walk(node, prefix):
        for layer in _keras_compat.sublayers(node):
            if id(layer) in skip or id(layer) in plan:
                continue
            name, mats = f"{prefix}{layer.name}", matrices(layer)
            if not mats:
                continue
            inner = _keras_compat.all_layers(layer)
            if isinstance(layer, keras.Model) or any(id(la) in plan for la in inner):
                kids = {id(v) for c in _keras_compat.sublayers(layer) for v in c.trainable_weights}
                own = [v for v in mats if id(v) not in kids]
                if own:
                    out.append((name, layer, own))
                walk(layer, name + "/")
            else:
                out.append((name, layer, mats))

    walk(model, "")
    return out


def warn_left_dense(model, left):
    """Warns once, naming every layer in `left` (from `left_dense`)."""
    if not left:
        return
    items = ", ".join(
        f"'{name}' ({type(la).__name__}, {sum(int(np.prod(v.shape)) for v in ws):,} weights)"
        for name, la, ws in left
    )
    warnings.warn(
        f"kib.prune leaves weight matrices of model '{model.name}' dense because their "
        f"layers cannot be pruned: {items}. Supported types: {registry._SUPPORTED}. Make a "
        "custom layer prunable with `get_prunable_weights()` or `kib.register_prunable`, or "
        "pass `exclude=[...]` to leave it dense on purpose (that silences this warning).",
        stacklevel=3,
    )


@keras.saving.register_keras_serializable(package="keras_ibprune")
class NestedPruneWrapper(keras.layers.Wrapper):
    """Holds a custom layer whose prunable sublayers are `PruneWrapper`s, in place.

    `kib.prune` creates it for every custom layer of the model graph that holds prunable
    layers; you rarely build one yourself. The wrapped sublayers are found by
    `kib.stats.find_wrappers` like any other wrapper, so the callback prunes them.

    Args:
        layer: the custom layer (a `keras.layers.Layer`, not a Model).
        paths: where the sublayers to wrap sit: lists of indices through the tracked
            sublayers (`nested_targets` gives them).
        granularity: `"weight"` or `"channel"`, for each inner `PruneWrapper`.
        block_size: optional weight-mask block, for each inner `PruneWrapper`.
        pattern: optional N:M sparsity, for each inner `PruneWrapper`.
        **kwargs: base layer keyword arguments (`name`, ...).
    """

    def __init__(self, layer, paths, granularity="weight", block_size=None, pattern=None,
                 **kwargs):
        if isinstance(layer, (keras.Model, PruneWrapper, NestedPruneWrapper)) or not isinstance(
            layer, keras.layers.Layer
        ):
            raise ValueError(
                "NestedPruneWrapper holds a custom keras.layers.Layer (not a model or a "
                f"wrapper). Received: layer={layer!r}"
            )
        try:
            paths = [tuple(int(i) for i in p) for p in paths]
        except TypeError:
            paths = []
        if not paths or any(not p for p in paths):
            raise ValueError(
                "`paths` must be a non-empty list of index paths such as [[0], [2, 1]]. "
                f"Received: paths={paths!r}"
            )
        kwargs.setdefault("name", f"prune_{layer.name}")
        super().__init__(layer, **kwargs)
        self.paths = paths
        self.granularity = granularity
        self.block_size = block_size
        self.pattern = pattern
        self._wrapped = False
        self.supports_masking = getattr(layer, "supports_masking", False)
        _keras_compat.copy_call_signature(self, layer)
        if layer.built:
            self._wrap()

    def _wrap(self):
        if self._wrapped:
            return
        for path in self.paths:
            parent, child, names = _resolve(self.layer, path)
            if isinstance(child, PruneWrapper):
                continue
            wrapper = PruneWrapper(
                child,
                granularity=self.granularity,
                block_size=self.block_size,
                pattern=None,  # N:M masks apply to top-level Dense/Conv layers only
                name="_".join([self.name, *names[1:]]),
            )
            _keras_compat.replace_sublayer(parent, child, wrapper)
            if child.built:
                wrapper.build()
        self._wrapped = True

    def build(self, input_shape=None, **shapes):
        if not self.layer.built:
            if shapes:
                self.layer.build(*(() if input_shape is None else (input_shape,)), **shapes)
            elif (
                input_shape is not None
                and type(self.layer).build is not keras.layers.Layer.build
                and _single_shape_build(self.layer)
            ):
                self.layer.build(input_shape)
            # Otherwise (several inputs, no `build`) the layer builds on the first call.
        if self.layer.built:
            self._wrap()
        self.built = True

    def call(self, *args, **kwargs):
        if not self._wrapped:
            self.layer(*args, **kwargs)  # builds the layer (and its sublayers)
            self._wrap()
        return self.layer(*args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    @property
    def wrappers(self):
        """The `PruneWrapper`s inside, in path order."""
        out = []
        for path in self.paths:
            child = _resolve(self.layer, path)[1]
            if isinstance(child, PruneWrapper):
                out.append(child)
        return out

    @contextlib.contextmanager
    def unwrapped(self):
        """Context in which the inner layer holds its plain sublayers again.

        Inside it `self.layer.weights` / `set_weights` have the order of the unpruned
        layer (the variables are the same objects the wrappers mask).
        """
        swaps = []
        for path in self.paths:
            parent, child, _ = _resolve(self.layer, path)
            if isinstance(child, PruneWrapper):
                _keras_compat.replace_sublayer(parent, child, child.layer)
                swaps.append((parent, child))
        try:
            yield self.layer
        finally:
            for parent, wrapper in swaps:
                _keras_compat.replace_sublayer(parent, wrapper.layer, wrapper)

    def baked_weights(self):
        """Weights of the plain inner layer (unpruned order) with the masks baked in."""
        baked = {}
        for w in self.wrappers:
            if w.built:
                baked.update(zip((id(v) for v in w.layer.weights), w.baked_weights()))
        with self.unwrapped() as plain:
            return [
                baked[id(v)] if id(v) in baked else keras.ops.convert_to_numpy(v.value)
                for v in plain.weights
            ]

    def strip(self):
        """Bakes the masks into the inner layer, unwraps it in place and returns it."""
        values = self.baked_weights()
        for path in self.paths:
            parent, child, _ = _resolve(self.layer, path)
            if isinstance(child, PruneWrapper):
                _keras_compat.replace_sublayer(parent, child, child.layer)
        if self.layer.built:
            self.layer.set_weights(values)
        return self.layer

    def get_config(self):
        with self.unwrapped():  # the plain layer's config, whatever it serializes
            config = super().get_config()
        config.update(
            {
                "paths": [list(p) for p in self.paths],
                "granularity": self.granularity,
                "block_size": list(self.block_size) if self.block_size else None,
                "pattern": None if self.pattern is None else "{}:{}".format(
                    *check_pattern(self.pattern)),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if config.get("block_size") is not None:
            config["block_size"] = tuple(config["block_size"])
        return super().from_config(config, custom_objects=custom_objects)
