"""Which channel classes a set of unit masks really removes, and what removed ones leave.

Shared by `shrink` (which builds the smaller model) and `flops` (which counts it, also for
the structured policy), so that the counted model and the shrunk one are the same model.

A removed unit outputs zero in the masked model. Layers between it and its consumers
(BatchNormalization, activations, per-channel ops, grouped convs, ...) may turn that zero
into a per-channel constant, the *dead value*. A consumer folds a constant into its bias
(or, for padded convolutions, into a retained *carrier* channel); where that is not exact
(a value that is not spatially constant, a padded SeparableConv reading a non-zero
constant) the class is kept back: its members keep the unit with zeroed weights.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from keras_ibprune import layer_kinds as K

L = keras.layers


def plan(graph, keep, round_to=None, dead=None):
    """Decides which classes go.

    Args:
        graph: a `graph.Graph`.
        keep: dict member key -> bool array over its units (True = keep).
        round_to: optional width multiple (see `shrink`).
        dead: dead values from `dead_values(graph)` (computed if None).

    Returns:
        (removed roots, neutral roots, dead values). Fixed roots are never removed.
        Neutral roots are kept although masked (kept back or coupled).
    """
    uf = graph.uf
    removed, kept = graph.removed_from_masks(keep)
    removed = {r for r in removed if not graph.fixed(r)}
    member_roots = {int(r) for c in graph.units.values() for r in uf.roots(c)}
    dead = dead_values(graph) if dead is None else dead
    changed = True
    while changed:
        changed = False
        neutral = member_roots - kept - removed
        for rec in graph.sites:
            roots = graph.roots(rec.ins[0])
            if roots is None:
                continue
            rem = np.array([int(r) in removed for r in roots], dtype=bool)
            d = dead[rec.ins[0]]
            need = rem & _must_keep(rec.layer, d)
            nz = rem & ~np.isnan(d) & (d != 0)
            if _padded(rec.layer) and nz.any() and carrier(roots, d, neutral) is None:
                need[np.flatnonzero(nz & ~need)[:1]] = True
            for r in set(roots[need].tolist()):
                removed.discard(r)
                changed = True
        if round_to:
            for classes in graph.units.values():
                roots = [int(r) for r in uf.roots(classes)]
                for r in roots:
                    width = sum(x not in removed for x in roots)
                    if width % round_to == 0 or width == len(roots):
                        break
                    if r in removed:  # keep back removed units in index order
                        removed.discard(r)
                        changed = True
    return removed, member_roots - kept - removed, dead


def stuck(graph, dead):
    """Roots that `plan` keeps back whenever they are masked (whatever else goes).

    Their dead value is unknown or not spatially constant where a consumer reads it, or a
    non-zero constant read by a padded SeparableConv. The policy does not pick them.
    """
    out = set()
    for rec in graph.sites:
        roots = graph.roots(rec.ins[0])
        if roots is not None:
            out.update(int(r) for r in roots[_must_keep(rec.layer, dead[rec.ins[0]])])
    return out


def folded_bias(graph, removed, dead):
    """Keys of layers without a bias that `shrink` gives one (folded dead constants)."""
    out = set()
    for rec in graph.sites:
        roots = graph.roots(rec.ins[0])
        if roots is None or getattr(rec.layer, "use_bias", True) or _padded(rec.layer):
            continue
        d = dead[rec.ins[0]]
        rem = np.array([int(r) in removed for r in roots], dtype=bool)
        if (rem & np.isfinite(d) & (d != 0)).any():
            out.add(rec.key)
    return out


def _padded(layer):
    return not isinstance(layer, L.Dense) and (
        isinstance(layer, K.CONV_T) or not K.no_padding(layer)
    )


def _must_keep(layer, d):
    need = np.isnan(d)
    if isinstance(layer, K.SEP) and _padded(layer):
        need |= d != 0  # depthwise border effects: no single carrier reproduces them
    return need


def carrier(roots, d, neutral):
    ok = [i for i, r in enumerate(roots) if int(r) in neutral and np.isfinite(d[i]) and d[i] != 0]
    return ok[0] if ok else None


# ----------------------------------------------- values a removed channel leaves behind
def dead_values(graph):
    """Per tensor: the value each position holds in the masked model if its class is removed.

    Constant per channel, or NaN where it is not spatially constant (or unknown).
    """
    dead = {}
    for x in graph.model.inputs:
        if graph.src.get(id(x)) is not None:
            dead[id(x)] = np.full(len(graph.src[id(x)]), np.nan)
    for rec in graph.recs:
        ins = [dead.get(i) for i in rec.ins]
        out = _dead_rule(rec, ins)
        for i in rec.outs:
            if graph.src.get(i) is not None:
                dead[i] = out if out is not None else np.full(len(graph.src[i]), np.nan)
    return dead


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


def _dead_rule(rec, ins):
    layer, cls, kind = rec.layer, type(rec.layer), rec.kind
    if kind == "producer":
        return np.zeros(rec.out_shapes[0][-1])
    if kind == "other" or any(v is None for v in ins):
        return None
    c = ins[0]
    if kind in ("depthwise", "grouped"):
        return _grouped_dead(layer, c)
    if kind == "bn":
        eps = layer.epsilon
        v = (c - _np(layer.moving_mean)) / np.sqrt(_np(layer.moving_variance) + eps)
        if layer.scale:
            v = v * _np(layer.gamma)
        if layer.center:
            v = v + _np(layer.beta)
        return v
    if kind == "pass":
        if cls in K.PADDING:
            return np.where(c == 0, 0.0, np.nan)
        if cls is L.PReLU:
            return np.where(c >= 0, c, np.nan)
        if cls is L.Activation:
            return _apply(layer.activation, c)
        if cls in K.ACTIVATIONS:
            return _apply(layer, c)
        return c
    if kind == "reshape":
        return c[rec.index]
    if kind == "concat":
        return np.concatenate(ins)
    if kind in ("op", "channelwise"):
        return _probe(rec, ins)
    if kind == "merge":
        if cls is L.Concatenate:  # along a non-channel axis
            return np.where(np.all([v == c for v in ins], axis=0), c, np.nan)
        if cls is L.Average:
            return np.mean(ins, axis=0)
        out = c
        for v in ins[1:]:
            out = K.MERGES[cls](out, v)
        return out
    return None


def _grouped_dead(layer, c):
    """Output of a depthwise/grouped conv whose input channels hold the constants `c`."""
    per_in, per_out = K.group_sizes(layer)
    k = _np(layer.kernel)
    s = k.sum(axis=tuple(range(k.ndim - 2)))  # (per_in, out) or (in, dm) for depthwise
    groups = c.reshape(-1, per_in)
    if isinstance(layer, K.DW):
        pre = (c[:, None] * s).reshape(-1)
    else:
        s = s.T.reshape(len(groups), per_out, per_in)
        pre = np.einsum("gi,goi->go", groups, s).reshape(-1)
    if layer.use_bias:
        pre = pre + _np(layer.bias)
    if not K.no_padding(layer):
        pre[np.repeat((groups != 0).any(axis=1), per_out)] = np.nan
    return _apply(layer.activation, pre)


def _probe(rec, ins):
    """Runs an op / per-channel layer on its inputs' dead values at the real spatial size."""
    shape = rec.in_shapes[0]
    spatial = tuple(3 if d is None else int(d) for d in shape[1:-1])
    nan = np.zeros(shape[-1], dtype=bool)
    probes = {}
    for tid, v, s in zip(rec.ins, ins, rec.in_shapes):
        nan |= np.isnan(v)
        x = (
            np.broadcast_to(np.nan_to_num(v), (1,) + spatial + (s[-1],))
            if len(s) == len(shape)
            else None
        )
        if x is None:
            return None
        probes[tid] = ops.convert_to_tensor(x.astype("float32"))
    args, kwargs = rec.node.arguments.fill_in({t: probes[t] for t in probes})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(rec.op, keras.layers.Layer):
            kwargs = {**kwargs, "training": False}
        y = _np(rec.op(*args, **kwargs))
    if y.shape != (1,) + spatial + (shape[-1],):
        return None
    flat = y.reshape(-1, shape[-1])
    out = flat[0].copy()
    out[~np.all(flat == flat[0], axis=0) | nan] = np.nan
    return out


def _apply(fn, values):
    nan = np.isnan(values)
    x = np.where(nan, 0.0, values).astype("float32")[None]
    with warnings.catch_warnings():  # e.g. softmax over a 1-channel probe: expected here
        warnings.simplefilter("ignore", UserWarning)
        out = _np(fn(ops.convert_to_tensor(x)))[0]
    out[nan] = np.nan
    return out
