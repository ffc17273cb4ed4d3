"""FLOP and parameter counts of Keras models, optionally with channel masks applied.

Convention: **FLOPs = 2 x multiply-accumulates** of Dense/Conv/attention/RNN products,
plus 1 per output element for each bias add, 2 per element for (inference-time)
BatchNormalization, 1 per window element for pooling, and `n_inputs - 1` per element for
Add/Subtract/Multiply/Average/Maximum/Minimum. Activations, reshapes, padding, dropout and
Embedding lookups count 0. Counts are per example (batch size 1) and need static shapes.

Layers inside a `PruneWrapper` are counted through `.layer` (mask variables are not
parameters). With `effective=True`, units removed by channel masks (and the matching
input slices of their consumers) are not counted: the numbers `shrink` would give,
before any `round_to`. Weight (unstructured) masks do not change the counts.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_ibprune import _keras_compat, removal
from keras_ibprune import graph as G

L = keras.layers
_RNN_GATES = {L.SimpleRNN: 1, L.LSTM: 4, L.GRU: 3}


def _prod(shape, name):
    if any(d is None for d in shape):
        raise ValueError(
            f"count_flops needs static shapes; layer '{name}' has an unknown dimension. "
            f"Received: shape={shape}"
        )
    return int(np.prod(shape, dtype=np.int64))


def _weights_size(layer):
    return int(sum(np.prod(w.shape) for w in layer.weights))


def _cost(rec, ins, outs, biased=False):
    """(flops, params) of one node; `ins`/`outs` are shapes without the batch axis.

    `biased`: the layer gains a bias in `shrink` (constants of removed inputs folded).
    """
    layer, name = rec.layer, rec.key
    o = outs[0] if outs else ()
    i = ins[0] if ins else ()
    bias = 1 if getattr(layer, "use_bias", False) or biased else 0
    if isinstance(layer, keras.Model):
        return count_flops(layer), count_params(layer)
    if isinstance(layer, L.Dense):
        n_in, n_out = i[-1], o[-1]
        macs = _prod(o[:-1], name) * n_in * n_out
        return 2 * macs + bias * _prod(o, name), n_in * n_out + bias * n_out
    if isinstance(layer, G.SEP):
        k, dm = _prod(layer.kernel_size, name), layer.depth_multiplier
        mid, pos = i[-1] * dm, _prod(o[:-1], name)
        macs = pos * k * mid + pos * mid * o[-1]
        return 2 * macs + bias * _prod(o, name), k * mid + mid * o[-1] + bias * o[-1]
    if isinstance(layer, G.DW):
        k = _prod(layer.kernel_size, name)
        return 2 * _prod(o, name) * k + bias * _prod(o, name), (k + bias) * o[-1]
    if isinstance(layer, G.CONV_T):
        k = _prod(layer.kernel_size, name)
        macs = _prod(i[:-1], name) * k * i[-1] * o[-1]
        return 2 * macs + bias * _prod(o, name), k * i[-1] * o[-1] + bias * o[-1]
    if isinstance(layer, G.CONV):
        # A grouped conv keeps its per-group width when whole groups go.
        cin = i[-1] if layer.groups == 1 else int(layer.kernel.shape[-2])
        k = _prod(layer.kernel_size, name)
        macs = _prod(o, name) * k * cin
        return 2 * macs + bias * _prod(o, name), k * cin * o[-1] + bias * o[-1]
    if isinstance(layer, L.BatchNormalization):
        per = 2 + int(layer.scale) + int(layer.center)
        return 2 * _prod(o, name), per * o[-1]
    if isinstance(layer, G.POOLING):
        return _prod(o, name) * _prod(layer.pool_size, name), 0
    if isinstance(layer, G.GLOBAL_POOLING):
        return _prod(i, name), 0
    if isinstance(layer, tuple(G.MERGES)):
        return (len(ins) - 1) * _prod(o, name), 0
    if isinstance(layer, L.MultiHeadAttention):
        return _mha(layer, ins, name), _weights_size(layer)
    if type(layer) in _RNN_GATES:
        gates, units = _RNN_GATES[type(layer)], layer.units
        steps = _prod(i[:-1], name)
        macs = steps * gates * units * (i[-1] + units)
        return 2 * macs + steps * gates * units, _weights_size(layer)
    return 0, _weights_size(layer) if isinstance(layer, keras.layers.Layer) else 0


def _mha(layer, ins, name):
    q = ins[0]
    v = ins[1] if len(ins) > 1 else q
    k = ins[2] if len(ins) > 2 else v
    heads, kd = layer.num_heads, layer.key_dim
    vd = layer.value_dim or kd
    tq, tk = _prod(q[:-1], name), _prod(k[:-1], name)
    out_dim = layer._output_dense.kernel.shape[-1]
    macs = tq * q[-1] * heads * kd + tk * k[-1] * heads * kd + tk * v[-1] * heads * vd
    macs += heads * tq * tk * (kd + vd) + tq * heads * vd * out_dim
    return 2 * macs


def _analysis(model, keep):
    func = G.functional_of(model)
    wrappers = {la.name: la for la in func.layers if G.is_channel_wrapper(la)}
    masks = {n: keras.ops.convert_to_numpy(w.unit_mask) > 0.5 for n, w in wrappers.items()}
    if keep is not None:
        alias = {w.layer.name: n for n, w in wrappers.items()}
        masks.update({alias.get(k, k): np.asarray(v, dtype=bool) for k, v in keep.items()})
    graph = G.Graph(func, members=list(masks))
    roots = {tid: graph.uf.roots(s) for tid, s in graph.src.items() if s is not None}
    return graph, masks, roots


def _table(graph, roots, removed, biased=frozenset()):
    """Per layer key: (flops, params) given a set of removed class roots."""
    rem = list(removed)

    def shape(tid, s):
        s = tuple(s[1:])
        if rem and tid in roots:
            s = s[:-1] + (int((~np.isin(roots[tid], rem)).sum()),)
        return s

    table = {}
    for rec in graph.recs:
        ins = [shape(t, s) for t, s in zip(rec.ins, rec.in_shapes)]
        outs = [shape(t, s) for t, s in zip(rec.outs, rec.out_shapes)]
        f, p = _cost(rec, ins, outs, rec.key in biased)
        old = table.get(rec.key, (0, None))
        table[rec.key] = (old[0] + f, p if old[1] is None else old[1])  # shared: params once
    return table


def _removed(graph, masks, dead=None):
    """`shrink`'s plan: (removed classes, layers that gain a folded bias).

    Kept-back classes count as kept.
    """
    removed, _, dead = removal.plan(graph, masks, dead=dead)
    return removed, removal.folded_bias(graph, removed, dead)


class Counter:
    """FLOPs/params of one model under many candidate `keep` dicts (for the policy).

    The graph, and the values removed channels leave (which depend on the current
    weights), are computed once; `refresh()` recomputes the latter after weights change.
    """

    def __init__(self, model, index):
        self.graph, self.masks, self.roots = _analysis(model, None)
        self.index = index
        self.refresh()

    def refresh(self):
        self.dead = removal.dead_values(self.graph)
        self.masks = _current(self.graph)

    def stuck(self):
        """Roots that would be kept back whenever masked (see `removal.stuck`)."""
        return removal.stuck(self.graph, self.dead)

    def __call__(self, keep=None):
        masks = _current(self.graph) if keep is None else {**self.masks, **keep}
        table = _table(self.graph, self.roots, *_removed(self.graph, masks, self.dead))
        return sum(v[self.index] for v in table.values())


def _current(graph):
    func = graph.model
    return {
        la.name: keras.ops.convert_to_numpy(la.unit_mask) > 0.5
        for la in func.layers
        if G.is_channel_wrapper(la)
    }


def count_flops(model, per_layer=False, effective=False, keep=None):
    """Counts the FLOPs of one forward pass of one example (2 per multiply-add).

    Args:
        model: a Functional or Sequential `keras.Model` with static input shapes
            (`PruneWrapper`s are counted through their inner layer).
        per_layer: if True, return a dict layer name -> FLOPs instead of the total.
        effective: if True, leave out units removed by channel masks (the wrappers'
            `unit_mask`, or `keep`), as `shrink` would.
        keep: optional dict layer name -> bool array over output units, used (over the
            wrappers' masks) when `effective=True`.

    Returns:
        An int, or a dict of ints when `per_layer=True`.

    Raises:
        ValueError: for subclassed models or unknown (non-batch) dimensions.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    kib.count_flops(model)  # 2 * 4 * 3 + 3 = 27
    ```
    """
    graph, masks, roots = _analysis(model, keep)
    removed = _removed(graph, masks) if effective else (set(),)
    table = {k: v[0] for k, v in _table(graph, roots, *removed).items()}
    return table if per_layer else int(sum(table.values()))


def count_params(model, per_layer=False, effective=False, keep=None):
    """Counts parameters (trainable and not, masks excluded), optionally after masking.

    Args:
        model: a Functional or Sequential `keras.Model`.
        per_layer: if True, return a dict layer name -> parameter count.
        effective: if True, leave out weights of units removed by channel masks.
        keep: optional dict layer name -> bool array, as in `count_flops`.

    Returns:
        An int, or a dict of ints when `per_layer=True`.

    Raises:
        ValueError: for subclassed models with `effective=True` (they have no graph);
            without it their weights are simply summed.

    Example:

    ```python
    kib.count_params(pruned, effective=True)  # size after kib.shrink(pruned)
    ```
    """
    if not effective and isinstance(model, keras.Model) and not _is_graph(model):
        table = _leaf_params(model)  # subclassed model: no graph, plain weight sizes
    else:
        graph, masks, roots = _analysis(model, keep)
        removed = _removed(graph, masks) if effective else (set(),)
        table = {k: v[1] for k, v in _table(graph, roots, *removed).items()}
    return table if per_layer else int(sum(table.values()))


def _is_graph(model):
    return isinstance(model, keras.Sequential) or _keras_compat.has_graph(model)


def _leaf_params(model):
    layers = _keras_compat.all_layers(model)
    under = {id(sub) for la in layers if G.is_wrapper(la) for sub in _keras_compat.all_layers(la)}
    table = {}
    for la in layers:
        if G.is_wrapper(la):
            table[la.name] = _weights_size(la.layer)
        elif id(la) not in under and la.weights:
            if not _keras_compat.all_layers(la, recursive=False):
                table[la.name] = _weights_size(la)
    return table


def _unit_costs(model, index):
    graph, _, roots = _analysis(model, None)
    base = _table(graph, roots, set())
    total = sum(v[index] for v in base.values())
    out = {}
    for key, classes in graph.units.items():
        free = [int(r) for r in graph.uf.roots(classes) if not graph.fixed(int(r))]
        if free:
            table = _table(graph, roots, {free[0]})
            out[key] = float(total - sum(v[index] for v in table.values()))
    return out


def unit_flops(model):
    """FLOPs saved by removing one output unit of each prunable layer.

    The saving includes the unit's own kernel column and bias, the channel in every
    pass-through layer (BatchNormalization, pooling, ...) and the matching input slice of
    every consumer, relative to the unmasked model. For layers coupled in one
    `ChannelGroup` the value is the saving of removing one channel of the whole group
    (the same channel is removed from every member), so do not add members' values.

    Args:
        model: a Functional or Sequential `keras.Model`.

    Returns:
        Dict layer name -> float, for layers with at least one removable unit.

    Example:

    ```python
    costs = kib.unit_flops(model)   # {"conv1": 3456.0, ...}
    ```
    """
    return _unit_costs(model, 0)


def unit_params(model):
    """Parameters saved by removing one output unit of each prunable layer.

    Same conventions as `unit_flops`.

    Args:
        model: a Functional or Sequential `keras.Model`.

    Returns:
        Dict layer name -> float.

    Example:

    ```python
    kib.unit_params(model)["dense"]  # inputs + 1 (bias) + the consumer's row
    ```
    """
    return _unit_costs(model, 1)
