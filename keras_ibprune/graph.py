"""Channel dependency analysis of Functional graphs: which output channels go together.

Public: `channel_groups(model)` and `ChannelGroup` (used by `channels`, `shrink` and
`flops`, and by users who plan their own structured pruning).

Every position of the last axis of every tensor gets a *class*: an integer of a
union-find. A producer (Dense, Conv*, ConvTranspose*, SeparableConv*; DepthwiseConv* when
it carries a unit mask) creates one class per output unit; layers that pass channels
through (BatchNormalization, activations, pooling, ...) forward their input's classes;
Add/Multiply/... unite the classes of their inputs position by position; Concatenate
joins them; Flatten/Reshape map them with an index table. Classes that cannot be removed
(model inputs and outputs, unsupported consumers, shared weighted layers) are *fixed*,
with the reason stored at the union-find root.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat

L = keras.layers
CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
CONV_T = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
SEP = (L.SeparableConv1D, L.SeparableConv2D)
DW = (L.DepthwiseConv1D, L.DepthwiseConv2D)
PRODUCERS = (L.Dense, *CONV, *CONV_T, *SEP)
POOLING = tuple(
    getattr(L, f"{kind}Pooling{d}D") for kind in ("Max", "Average") for d in (1, 2, 3)
)
GLOBAL_POOLING = tuple(
    getattr(L, f"Global{kind}Pooling{d}D") for kind in ("Average", "Max") for d in (1, 2, 3)
)
IDENTITY = (
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    *POOLING,
    *GLOBAL_POOLING,
    L.RepeatVector,
)
PADDING = (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)
ACTIVATIONS = (L.ReLU, L.LeakyReLU, L.ELU, L.Activation)
MERGES = {
    L.Add: np.add,
    L.Subtract: np.subtract,
    L.Multiply: np.multiply,
    L.Average: None,
    L.Maximum: np.maximum,
    L.Minimum: np.minimum,
}
RESHAPES = (L.Flatten, L.Reshape)
_ELEMENTWISE = {
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "tanh",
    "softplus",
    "softsign",
    "exponential",
    "mish",
    "celu",
    "log_sigmoid",
    "hard_tanh",
    "tanh_shrink",
    "squareplus",
    "sparse_plus",
    "soft_shrink",
    "hard_shrink",
}


def is_wrapper(layer):
    """True for a keras_ibprune `PruneWrapper` (checked by class name, no import)."""
    return type(layer).__name__ == "PruneWrapper" and hasattr(layer, "layer")


def is_channel_wrapper(layer):
    return (
        is_wrapper(layer)
        and getattr(layer, "granularity", None) == "channel"
        and getattr(layer, "unit_mask", None) is not None
    )


def functional_of(model):
    """The Functional graph behind `model` (Sequential models included)."""
    if isinstance(model, keras.Sequential):
        func = getattr(model, "_functional", None)
        if func is None:
            raise ValueError(
                "The Sequential model has no known input shape; start it with "
                f"`keras.Input(...)` or build it first. Received: model={model.name!r}"
            )
        return func
    if not isinstance(model, keras.Model) or not _keras_compat.has_graph(model):
        raise ValueError(
            "Expected a Functional or Sequential keras.Model (subclassed models have no "
            f"graph to analyse). Received: model={model!r}"
        )
    return model


def act_is_zero_at_zero(layer):
    act = getattr(layer, "activation", None)
    if act is None:
        return True
    return float(ops.convert_to_numpy(act(ops.zeros((1,))))[0]) == 0.0


def no_padding(layer):
    """True when a convolution never reads padded positions."""
    return layer.padding == "valid" or all(int(k) == 1 for k in layer.kernel_size)


def num_units(layer):
    if isinstance(layer, L.Dense):
        return int(layer.units)
    if isinstance(layer, DW):
        return int(layer.kernel.shape[-2] * layer.kernel.shape[-1])
    return int(layer.filters)


class UnionFind:
    def __init__(self):
        self.parent = []
        self.reason = {}

    def new(self, n, reason=None):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = np.arange(start, start + n)
        if reason is not None:
            for i in ids:
                self.reason[int(i)] = reason
        return ids

    def find(self, a):
        a = int(a)
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if ra not in self.reason and rb in self.reason:
                self.reason[ra] = self.reason[rb]

    def fix(self, ids, reason):
        for i in np.unique(ids):
            self.reason.setdefault(self.find(i), reason)

    def roots(self, ids):
        cache = {}
        return np.array([cache.setdefault(int(i), self.find(i)) for i in ids], dtype=np.int64)


class Rec:
    """One node of the graph with its effective (unwrapped) layer."""

    def __init__(self, node):
        self.node = node
        op = node.operation
        self.op = op
        self.layer = op.layer if is_wrapper(op) else op
        self.key = op.name  # the name masks are keyed by (the wrapper's, if wrapped)
        self.ins = [id(t) for t in node.input_tensors]
        self.outs = [id(t) for t in node.outputs]
        self.in_shapes = [tuple(t.shape) for t in node.input_tensors]
        self.out_shapes = [tuple(t.shape) for t in node.outputs]
        self.kind = "other"
        self.index = None  # index table of Flatten/Reshape


def _index_table(in_shape, out_shape):
    """Output last-axis position -> input channel, or None if not position-independent."""
    dims = tuple(in_shape[1:]) + tuple(out_shape[1:])
    if any(d is None for d in dims) or len(in_shape) < 2 or len(out_shape) < 2:
        return None
    idx = np.broadcast_to(np.arange(in_shape[-1]), in_shape[1:]).reshape(-1, out_shape[-1])
    if not (idx == idx[0]).all():
        return None
    return idx[0].copy()


class Graph:
    """Class assignment of a Functional model.

    Args:
        model: Functional or Sequential model (PruneWrappers are seen through).
        members: extra layer keys (DepthwiseConv with a unit mask) that own their units.
    """

    def __init__(self, model, members=()):
        self.model = functional_of(model)
        self.uf = UnionFind()
        self.src = {}
        self.units = {}  # member key -> raw classes of its units
        self.layers = {}  # member key -> effective layer
        self.sites = []  # producer records consuming a tracked tensor
        self.recs = []
        extra = set(members)
        by_depth = _keras_compat.nodes_by_depth(self.model)
        nodes = [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]
        calls = {}
        for n in nodes:
            calls[id(n.operation)] = calls.get(id(n.operation), 0) + 1
        for x in self.model.inputs:
            self.src[id(x)] = self._fresh(x.shape, "it is a model input")
        for n in nodes:
            if n.operation is None or n.is_input:
                continue
            rec = Rec(n)
            rec.shared = calls[id(n.operation)] > 1 and bool(rec.layer.weights)
            self._visit(rec, extra)
            self.recs.append(rec)
        for x in self.model.outputs:
            s = self.src.get(id(x))
            if s is not None:
                name = _keras_compat.producing_layer(x).name
                self.uf.fix(s, f"it reaches the model output of layer '{name}'")

    # ------------------------------------------------------------------ helpers
    def _fresh(self, shape, reason):
        if len(shape) < 2 or shape[-1] is None:
            return None
        return self.uf.new(int(shape[-1]), reason)

    def _block(self, rec, ins, why=None):
        why = why or (
            f"it is consumed by layer '{rec.key}' ({type(rec.layer).__name__}), which shrink "
            "cannot analyse"
        )
        for s in ins:
            if s is not None:
                self.uf.fix(s, why)
        rec.kind = "other"
        return [self._fresh(s, f"output of layer '{rec.key}'") for s in rec.out_shapes]

    def _visit(self, rec, extra):
        ins = [self.src.get(i) for i in rec.ins]
        outs = self._rule(rec, ins, extra)
        for i, s in zip(rec.outs, outs):
            self.src[i] = s

    def _rule(self, rec, ins, extra):
        layer, cls = rec.layer, type(rec.layer)
        if len(rec.outs) != 1 or (ins and all(s is None for s in ins)):
            return self._block(rec, ins)
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return self._block(rec, ins, f"layer '{rec.key}' is not channels_last")
        if cls in PRODUCERS or (cls in DW and rec.key in extra):
            return self._producer(rec, ins)
        if rec.shared:
            return self._block(rec, ins, f"layer '{rec.key}' is shared (called several times)")
        x = ins[0]
        if cls in DW:
            rec.kind = "depthwise"
            return [np.repeat(x, layer.depth_multiplier)]
        if cls is L.BatchNormalization:
            axis = layer.axis if isinstance(layer.axis, int) else -1
            if axis not in (-1, len(rec.in_shapes[0]) - 1):
                return self._block(rec, ins, f"layer '{rec.key}' normalizes a non-channel axis")
            rec.kind = "bn"
            return [x]
        if cls is L.Activation:
            name = getattr(layer.activation, "__name__", "")
            if name not in _ELEMENTWISE:
                return self._block(rec, ins)
        if cls in ACTIVATIONS or cls in IDENTITY or cls in PADDING or cls is L.PReLU:
            rec.kind = "pass"
            return [x]
        if cls is L.Permute:
            if tuple(layer.dims)[-1] != len(rec.in_shapes[0]) - 1:
                return self._block(rec, ins)
            rec.kind = "pass"
            return [x]
        if cls in MERGES or cls is L.Concatenate:
            return self._merge(rec, ins)
        if cls in RESHAPES:
            rec.index = _index_table(rec.in_shapes[0], rec.out_shapes[0])
            if rec.index is None:
                return self._block(
                    rec, ins, f"layer '{rec.key}' ({cls.__name__}) mixes channels with other axes"
                )
            rec.kind = "reshape"
            return [x[rec.index]]
        return self._block(rec, ins)

    def _producer(self, rec, ins):
        layer = rec.layer
        ok = (
            getattr(layer, "groups", 1) == 1
            and not getattr(layer, "lora_enabled", False)
            and not getattr(layer, "quantization_mode", None)
        )
        if rec.key not in self.units:
            self.layers[rec.key] = layer
            if isinstance(layer, DW):
                self.units[rec.key] = np.repeat(ins[0], layer.depth_multiplier)
            else:
                self.units[rec.key] = self.uf.new(num_units(layer))
            if not ok:
                self.uf.fix(self.units[rec.key], f"layer '{rec.key}' uses groups/LoRA/quantization")
        if not ok or rec.shared:
            self._block(rec, ins, f"layer '{rec.key}' is shared or uses groups/LoRA/quantization")
        elif not isinstance(layer, DW):
            self.sites.append(rec)
        rec.kind = "producer"
        return [self.units[rec.key]]

    def _merge(self, rec, ins):
        if any(s is None for s in ins):
            return self._block(rec, ins)
        layer = rec.layer
        rank = len(rec.out_shapes[0])
        if type(layer) is L.Concatenate and layer.axis % rank == rank - 1:
            rec.kind = "concat"
            return [np.concatenate(ins)]
        if len({len(s) for s in ins}) != 1:
            return self._block(rec, ins, f"layer '{rec.key}' broadcasts along the channel axis")
        for s in ins[1:]:
            for a, b in zip(ins[0], s):
                self.uf.union(a, b)
        rec.kind = "merge"
        return [ins[0]]

    # --------------------------------------------------------------- queries
    def roots(self, tensor_id):
        s = self.src.get(tensor_id)
        return None if s is None else self.uf.roots(s)

    def fixed(self, root):
        return root in self.uf.reason

    def removed_positions(self, tensor_id, removed):
        """Boolean mask of the removed positions of a tensor (None if untracked)."""
        r = self.roots(tensor_id)
        if r is None:
            return None
        return np.array([int(x) in removed for x in r], dtype=bool)

    def kept_width(self, tensor_id, shape, removed):
        rem = self.removed_positions(tensor_id, removed)
        return shape[-1] if rem is None else int((~rem).sum())

    def removed_from_masks(self, keep):
        """Roots removed by `keep` (layer key -> bool array): masked by every member."""
        kept, masked = set(), set()
        for key, classes in self.units.items():
            roots = self.uf.roots(classes)
            k = keep.get(key)
            if k is None:
                kept.update(int(r) for r in roots)
                continue
            kept.update(int(r) for r in roots[k])
            masked.update(int(r) for r in roots[~k])
        return masked - kept, kept


# ------------------------------------------------------------- public: channel groups
@dataclasses.dataclass
class ChannelGroup:
    """Output channels of several layers that must be kept or removed together.

    Attributes:
        members: layer name -> int array with one entry per output unit of the layer: the
            group channel that unit belongs to.
        size: number of group channels.
        prunable: bool array `(size,)`: False for channels `shrink` may never remove.
        reason: why some channels are not prunable (None if all are).
    """

    members: dict
    size: int
    prunable: np.ndarray
    reason: str | None = None

    @property
    def layers(self):
        """Member layer names, in graph order."""
        return tuple(self.members)

    def expand(self, group_keep):
        """Maps a bool keep array over group channels to a `keep` dict over members."""
        group_keep = np.asarray(group_keep, dtype=bool)
        return {name: group_keep[idx] for name, idx in self.members.items()}

    def reduce(self, per_unit, fn=np.sum):
        """Aggregates per-unit scores (`{layer: array}`) into one score per group channel."""
        out = np.zeros(self.size)
        parts = [[] for _ in range(self.size)]
        for name, idx in self.members.items():
            if name in per_unit:
                for g, v in zip(idx, np.asarray(per_unit[name], dtype=np.float64)):
                    parts[g].append(v)
        for g, p in enumerate(parts):
            out[g] = fn(p) if p else 0.0
        return out


def channel_groups(model):
    """Finds the groups of layers whose output channels must be pruned together.

    Producers are Dense, Conv1D/2D/3D, Conv*Transpose and SeparableConv* layers (and
    DepthwiseConv* layers wrapped with a channel mask). BatchNormalization, activations,
    Dropout, pooling, padding, cropping, up-sampling and DepthwiseConv pass channels
    through; Add/Subtract/Multiply/Average/Maximum/Minimum couple their inputs channel by
    channel; Concatenate maps channels with offsets; Flatten and Reshape map channels to
    positions when the mapping is position-independent. Channels reaching a model output
    or consumed by any other layer are reported as not prunable, with the reason.

    Args:
        model: a Functional or Sequential `keras.Model`, with or without `PruneWrapper`s
            (a wrapper is reported under its own name).

    Returns:
        A list of `ChannelGroup`, in graph order; uncoupled layers form singleton groups.

    Raises:
        ValueError: if the model is not a Functional/Sequential graph.

    Example:

    ```python
    for g in kib.channel_groups(model):
        print(g.layers, g.size, g.prunable.sum())
    ```
    """
    func = functional_of(model)
    members = [la.name for la in func.layers if is_channel_wrapper(la)]
    graph = Graph(func, members=members)
    return _groups(graph)


def _groups(graph):
    """Layers whose unit classes meet (through one union-find) form one group."""
    uf = graph.uf
    order = list(graph.units)
    roots = {k: uf.roots(c) for k, c in graph.units.items()}
    layers = UnionFind()
    slot = {k: int(layers.new(1)[0]) for k in order}
    owner = {}
    for k in order:
        for r in np.unique(roots[k]):
            r = int(r)
            if r in owner:
                layers.union(slot[k], slot[owner[r]])
            else:
                owner[r] = k
    members = {}
    for k in order:
        members.setdefault(layers.find(slot[k]), []).append(k)
    out = []
    for keys in members.values():
        index = {}
        for k in keys:
            for r in roots[k]:
                index.setdefault(int(r), len(index))
        fixed = [graph.fixed(r) for r in index]
        reasons = [uf.reason[r] for r in index if graph.fixed(r)]
        out.append(
            ChannelGroup(
                members={k: np.array([index[int(r)] for r in roots[k]]) for k in keys},
                size=len(index),
                prunable=~np.array(fixed, dtype=bool),
                reason=reasons[0] if reasons else None,
            )
        )
    return out
