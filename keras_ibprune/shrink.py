"""Structured pruning, physically: remove whole units/filters and build a smaller model.

`shrink` turns a model with channel masks (``kib.prune(model, granularity="channel")``),
or a plain model plus an explicit ``keep`` dict, into a new, smaller Functional
`keras.Model` with the same predictions as the masked model. `graph.channel_groups` is the
dependency analysis behind it: which layers' output channels are coupled (Add, Multiply,
Concatenate, ...) and must be pruned together.

A removed unit's output is zero in the masked model. Layers between it and its consumers
(BatchNormalization, activations, pooling, DepthwiseConv, ...) may turn that zero into a
per-channel constant; `shrink` folds such constants into the consumer's bias (or, for
padded convolutions, into one retained *carrier* channel), so the result stays exact. A
masked unit that cannot be removed exactly is kept with zeroed weights instead (it still
outputs zero), never approximated.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat, removal
from keras_ibprune import graph as G
from keras_ibprune import layer_kinds as K

L = keras.layers


def check_widths(keep, min_width=None):
    """Validates a `keep` dict: no layer loses every unit, none falls below `min_width`.

    Args:
        keep: dict layer name -> bool array over the layer's output units (True = keep).
        min_width: optional minimum number of units each layer must keep.

    Raises:
        ValueError: if a mask keeps no unit, if `min_width` exceeds a layer's width, or if
            a mask keeps fewer than `min_width` units.

    Example:

    ```python
    kib.check_widths({"conv": np.array([True, False, True])}, min_width=2)
    ```
    """
    for name, mask in keep.items():
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if not mask.any():
            raise ValueError(
                f"The channel mask would remove every unit of layer '{name}'; keep at least "
                f"one. Received: keep[{name!r}] with 0 of {mask.size} units kept"
            )
        if min_width is None:
            continue
        if min_width > mask.size:
            raise ValueError(
                f"`min_width` is larger than layer '{name}', which has {mask.size} units. "
                f"Received: min_width={min_width}"
            )
        if mask.sum() < min_width:
            raise ValueError(
                f"The channel mask keeps {int(mask.sum())} units of layer '{name}', fewer "
                f"than min_width. Received: min_width={min_width}"
            )


def _wrapper_masks(func):
    wrappers = [la for la in func.layers if G.is_wrapper(la)]
    masks = {
        w.name: ops.convert_to_numpy(w.unit_mask) > 0.5 for w in wrappers if G.is_channel_wrapper(w)
    }
    return wrappers, masks


def shrink(model, keep=None, round_to=None, min_width=None):
    """Builds a physically smaller model with the same predictions as the masked model.

    Removed units lose their kernel columns and bias; every consumer loses the matching
    input slice (Dense rows, also through Flatten/Reshape; Conv/ConvTranspose input
    channels; DepthwiseConv and SeparableConv channels; BatchNormalization statistics;
    Concatenate offsets). Coupled layers (see `channel_groups`) keep a channel if any of
    them keeps it; a masked unit that is kept (coupling, `round_to`, or a non-constant
    value reaching a consumer) gets zero weights so it still outputs zero.

    Args:
        model: a Functional or Sequential `keras.Model`. `PruneWrapper`s with
            `granularity="channel"` provide the masks (weight-granularity wrappers are
            baked); the result has no wrappers and its layers carry the inner names.
        keep: optional dict layer name -> bool array `(units,)`, True = keep; overrides
            (or, for plain models, replaces) the wrappers' unit masks. Names may be
            wrapper names or inner-layer names.
        round_to: optional int; every pruned layer's width is raised to a multiple of it
            (or to its full width) by keeping back removed units in index order.
        min_width: optional minimum number of units per layer (see `check_widths`).

    Returns:
        A new Functional `keras.Model`.

    Raises:
        ValueError: if the model has no channel masks, a mask removes every unit of a
            layer, names an unknown layer or has the wrong size, or asks to remove
            channels that cannot be removed (model outputs, unsupported consumers), or a
            masked unit that must be kept has an activation that is non-zero at zero.

    Example:

    ```python
    pruned = kib.prune(model, granularity="channel")
    # ... train with the pruning callback ...
    small = kib.shrink(pruned, round_to=8)
    ```
    """
    func = G.functional_of(model)
    wrappers, masks = _wrapper_masks(func)
    if keep is None:
        if not masks:
            got = (
                f"a model with only weight masks ({len(wrappers)} PruneWrapper(s) with "
                "granularity='weight')"
                if wrappers
                else "a model without PruneWrappers"
            )
            raise ValueError(
                "shrink needs granularity='channel' masks: use "
                "`kib.prune(model, granularity='channel')` or pass `keep=`. Received "
                f"{got}."
            )
        keep = masks
    else:
        alias = {w.layer.name: w.name for w in wrappers}
        keep = {**masks, **{alias.get(k, k): np.asarray(v, dtype=bool) for k, v in keep.items()}}
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise ValueError(f"`round_to` must be a positive int. Received: round_to={round_to!r}")
    graph = G.Graph(func, members=list(keep))
    for name, mask in keep.items():
        if name not in graph.units:
            raise ValueError(
                f"`keep` names layer '{name}', which is not a Dense/Conv/ConvTranspose/"
                "SeparableConv/DepthwiseConv layer at the top level of the model (nested "
                f"models are not supported). Received: keep keys={sorted(keep)}"
            )
        if mask.shape != graph.units[name].shape:
            raise ValueError(
                f"The mask of layer '{name}' must have shape {graph.units[name].shape}. "
                f"Received: shape={mask.shape}"
            )
    check_widths(keep, min_width)
    _check_fixed(graph, keep)
    plan = removal.plan(graph, keep, round_to)
    _check_zero_at_zero(graph, keep, plan[0])
    return _rebuild(graph, keep, plan)


def _check_fixed(graph, keep):
    uf = graph.uf
    removed, _ = graph.removed_from_masks(keep)
    for r in sorted(removed):
        if graph.fixed(r):
            name = next(k for k, c in graph.units.items() if r in set(uf.roots(c).tolist()))
            raise ValueError(
                f"Cannot remove units of layer '{name}': {uf.reason[r]}. Keep those units "
                "(see `kib.channel_groups`) or restructure the model."
            )


def _check_zero_at_zero(graph, keep, removed):
    for key, classes in graph.units.items():
        if key in keep and not G.act_is_zero_at_zero(graph.layers[key]):
            roots = graph.uf.roots(classes)
            if any(int(r) not in removed for r in roots[~keep[key]]):
                raise ValueError(
                    f"A masked unit of layer '{key}' must be kept (coupling, round_to or "
                    "padding), but its activation is not zero at zero, so it cannot be "
                    "made to output zero. Received: activation="
                    f"{getattr(graph.layers[key].activation, '__name__', '?')}"
                )


def _values(op):
    """Numpy weights of the effective layer, weight masks baked in."""
    inner = op.layer if G.is_wrapper(op) else op
    values = (
        op.baked_weights(units=False)
        if G.is_wrapper(op)
        else [ops.convert_to_numpy(v) for v in inner.weights]
    )
    return values, [v.name for v in inner.weights]


def _rebuild(graph, keep, plan):
    removed, neutral, dead = plan
    func = graph.model
    tmap, cache = {}, {}
    for x in func.inputs:
        name = _keras_compat.producing_layer(x).name
        tmap[id(x)] = keras.Input(batch_shape=x.shape, dtype=x.dtype, name=name)

    def rem_of(tid):
        roots = graph.roots(tid)
        return None if roots is None else np.array([int(r) in removed for r in roots], bool)

    for rec in graph.recs:
        args, kwargs = rec.node.arguments.fill_in(tmap)
        try:
            if not isinstance(rec.layer, keras.layers.Layer):
                if rec.kind == "op":
                    args, kwargs = _slice_constants(rec, (args, kwargs), rem_of(rec.ins[0]))
                outs = rec.op(*args, **kwargs)
            elif id(rec.op) in cache:
                outs = cache[id(rec.op)](*args, **kwargs)
            else:
                cfg, vals = _transform(rec, graph, keep, rem_of, plan)
                if rec.kind == "channelwise":
                    new, outs = _channelwise(rec, cfg, vals, args, kwargs)
                else:
                    new = type(rec.layer).from_config(cfg)
                    outs = new(*args, **kwargs)
                    if new.weights:
                        if isinstance(vals, dict):
                            vals = [vals[w.name] for w in new.weights]
                        new.set_weights(vals)
                cache[id(rec.op)] = new
        except (ValueError, IndexError, TypeError) as e:
            shapes = [tuple(getattr(a, "shape", ())) for a in keras.tree.flatten(args)]
            raise ValueError(
                f"shrink cannot rebuild layer '{rec.key}' ({type(rec.layer).__name__}) with "
                f"its channels removed: {e}. Keep the channels it reads (see "
                "`kib.channel_groups`) or report the layer type. Received: inputs of shape "
                f"{shapes}"
            ) from e
        for i, y in zip(rec.outs, keras.tree.flatten(outs)):
            tmap[i] = y
    inputs = keras.tree.map_structure(lambda x: tmap[id(x)], func._inputs_struct)
    outputs = keras.tree.map_structure(lambda x: tmap[id(x)], func._outputs_struct)
    return keras.Model(inputs, outputs, name=f"{func.name}_shrunk")


def _transform(rec, graph, keep, rem_of, plan):
    """New config and weights (by variable name) of one layer."""
    removed, neutral, dead = plan
    layer = rec.layer
    cfg, (values, names) = layer.get_config(), _values(rec.op)
    vals = dict(zip(names, values))
    rem = rem_of(rec.ins[0]) if rec.ins else None
    if rec.kind == "grouped":
        out_keep, neut = ~rem_of(rec.outs[0]), None
    if rec.kind == "producer":
        roots = graph.uf.roots(graph.units[rec.key])
        out_keep = np.array([int(r) not in removed for r in roots], dtype=bool)
        neut = ~keep[rec.key] & out_keep if rec.key in keep else np.zeros_like(out_keep)
    if isinstance(layer, G.DW) and rec.kind in ("producer", "grouped"):
        return cfg, _depthwise(vals, rem, neut)
    if K.is_grouped(layer) and rec.kind in ("producer", "grouped"):
        return _grouped(layer, cfg, vals, out_keep, neut)
    if rec.kind == "producer":
        d = dead[rec.ins[0]]
        if rem is None:
            rem = np.zeros(rec.in_shapes[0][-1], dtype=bool)
        _fold(layer, vals, rem, d, graph.roots(rec.ins[0]), neutral)
        bias = vals.get("bias")
        if isinstance(layer, G.SEP):
            vals["depthwise_kernel"] = vals["depthwise_kernel"][..., ~rem, :]
            kern = "pointwise_kernel"
        else:
            kern = "kernel"
        k = vals[kern]
        if isinstance(layer, G.CONV_T):
            k = k[..., ~rem][..., out_keep, :]
            k[..., neut[out_keep], :] = 0.0
        else:
            if isinstance(layer, G.SEP):
                dm = layer.depth_multiplier
                k = k.reshape(k.shape[:-2] + (-1, dm, k.shape[-1]))[..., ~rem, :, :]
                k = k.reshape(k.shape[:-3] + (-1, k.shape[-1]))
            else:
                k = k[..., ~rem, :]
            k = k[..., out_keep]
            k[..., neut[out_keep]] = 0.0
        vals[kern] = k
        if bias is not None:
            vals["bias"] = bias[out_keep] * ~neut[out_keep]
            cfg["use_bias"] = True
        cfg["units" if isinstance(layer, G.L.Dense) else "filters"] = int(out_keep.sum())
        return cfg, vals
    if rem is None or not rem.any() or rec.kind not in ("bn", "pass", "reshape", "channelwise"):
        return cfg, values
    if rec.kind == "channelwise":
        return cfg, [v[..., ~rem] if v.shape[-1:] == rem.shape else v for v in values]
    if rec.kind == "bn":
        return cfg, {n: v[~rem] for n, v in vals.items()}
    if "alpha" in vals and vals["alpha"].shape[-1] == rem.size:
        vals["alpha"] = vals["alpha"][..., ~rem]
    if isinstance(layer, G.L.Reshape):
        width = int((~rem_of(rec.outs[0])).sum())
        cfg["target_shape"] = tuple(rec.out_shapes[0][1:-1]) + (width,)
    return cfg, vals


def _grouped(layer, cfg, vals, out_keep, neut):
    """A grouped conv loses whole groups (the graph couples each group's channels)."""
    k, b = vals["kernel"][..., out_keep].copy(), vals.get("bias")
    out = {"kernel": k}
    if b is not None:
        out["bias"] = b[out_keep].copy()
    if neut is not None and neut[out_keep].any():
        k[..., neut[out_keep]] = 0.0
        if b is not None:
            out["bias"][neut[out_keep]] = 0.0
    per_out = K.group_sizes(layer)[1]
    cfg["filters"] = int(out_keep.sum())
    cfg["groups"] = int(out_keep.sum()) // per_out
    return cfg, out


def _slice_constants(rec, structure, rem):
    """Slices the per-channel constants of a `keras.ops` node (``x * gamma``)."""
    if rem is None or not rem.any():
        return structure
    width = rem.size

    def cut(a):
        if isinstance(a, keras.KerasTensor) or K.const_width(a) != width or width == 1:
            return a
        if isinstance(a, np.ndarray):
            return a[..., ~rem]
        return ops.convert_to_tensor(ops.convert_to_numpy(a)[..., ~rem], dtype=a.dtype)

    return keras.tree.map_structure(cut, structure)


def _channelwise(rec, cfg, values, args, kwargs):
    """Rebuilds a per-channel custom layer, resizing its config if its weights need it."""
    old, new_width = rec.in_shapes[0][-1], args[0].shape[-1]
    candidates = [cfg]
    sized = {k: new_width for k, v in cfg.items() if type(v) is int and v == old}
    if sized and new_width != old:
        candidates.append({**cfg, **sized})
    got = []
    for c in candidates:
        new = type(rec.layer).from_config(c)
        new.build(tuple(args[0].shape))
        got = [tuple(w.shape) for w in new.weights]
        if got == [v.shape for v in values]:
            new.set_weights(values)
            return new, new(*args, **kwargs)
    raise ValueError(
        f"layer '{rec.key}' ({type(rec.layer).__name__}) does not rebuild with "
        f"{new_width} channels from its config: weights of shape "
        f"{[tuple(v.shape) for v in values]} expected. Received: a rebuilt layer with weights "
        f"of shape {got}"
    )


def _depthwise(vals, rem, neut):
    k, b = vals["kernel"].copy(), vals.get("bias")
    n_in, dm = k.shape[-2:]
    if neut is not None and neut.any():
        k.reshape(-1, n_in * dm)[:, neut] = 0.0
        b = None if b is None else b * ~neut
    if rem is not None:
        k = k[..., ~rem, :]
        b = None if b is None else b.reshape(n_in, dm)[~rem].reshape(-1)
    out = {"kernel": k}
    if b is not None:
        out["bias"] = b
    return out


def _fold(layer, vals, rem, d, roots, neutral):
    """Adds the constant contribution of removed input channels to the bias/carrier."""
    live = rem & ~np.isnan(d) & (d != 0)
    if not live.any():
        return
    c = d[live]
    n_out = G.num_units(layer)
    if isinstance(layer, G.SEP):
        dw, dm = vals["depthwise_kernel"], layer.depth_multiplier
        s = dw.sum(axis=tuple(range(dw.ndim - 2)))[live] * c[:, None]
        pw = vals["pointwise_kernel"].reshape(-1, dm, n_out)[live]
        delta = np.einsum("ij,ijo->o", s, pw)
    elif isinstance(layer, G.L.Dense):
        delta = c @ vals["kernel"][live]
    elif isinstance(layer, G.CONV) and G.no_padding(layer):
        k = vals["kernel"]
        delta = c @ k.sum(axis=tuple(range(k.ndim - 2)))[live]
    else:  # padded Conv or ConvTranspose: fold into a carrier channel with constant value
        car = removal.carrier(roots, d, neutral)
        k = vals["kernel"].copy()
        if isinstance(layer, G.CONV_T):
            k[..., car] += np.tensordot(k[..., live], c / d[car], axes=([-1], [0]))
        else:
            k[..., car, :] += np.tensordot(k[..., live, :], c / d[car], axes=([-2], [0]))
        vals["kernel"] = k
        return
    vals["bias"] = (vals["bias"] if "bias" in vals else np.zeros(n_out, "float32")) + delta
