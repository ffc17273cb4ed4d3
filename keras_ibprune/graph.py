"""Channel dependency analysis of Functional graphs: which output channels go together.

`Graph` walks a Functional model once. Every position of the last axis of every tensor
gets a *class*: an integer of a union-find. A producer (Dense, Conv*, ConvTranspose*,
SeparableConv*) creates one class per output unit; a depthwise or grouped conv unites
each group's input channels and gives its outputs that class (with a unit mask it is a
member owning them); layers and `keras.ops` calls that pass channels through
(BatchNormalization, activations, pooling, ``x * 0.5``, per-channel layers, ...) forward
their input's classes; Add/Multiply/``x + y``/... unite the classes of their inputs
position by position; Concatenate joins them; Flatten/Reshape map them with an index
table. Classes that cannot be removed (model inputs and outputs, channel-axis
normalizations, unsupported consumers, shared weighted layers) are *fixed*, with the
reason stored at the union-find root. The per-kind rules' vocabulary is in
`layer_kinds`; the public view (`channel_groups`, `ChannelGroup`) in `groups`.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_ibprune import _keras_compat
from keras_ibprune import layer_kinds as K
from keras_ibprune.layer_kinds import (  # noqa: F401 - re-exported for shrink/flops/users
    ACTIVATIONS,
    CONV,
    CONV_T,
    DW,
    GLOBAL_POOLING,
    IDENTITY,
    MERGES,
    PADDING,
    POOLING,
    PRODUCERS,
    RESHAPES,
    SEP,
    L,
    act_is_zero_at_zero,
    functional_of,
    is_channel_wrapper,
    is_wrapper,
    no_padding,
    num_units,
)


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
        if K.is_elementwise_op(rec.op):
            return self._op(rec, ins)
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return self._block(rec, ins, f"layer '{rec.key}' is not channels_last")
        if cls in DW or K.is_grouped(layer):
            return self._grouped(rec, ins, member=rec.key in extra)
        if cls in PRODUCERS:
            return self._producer(rec, ins)
        if rec.shared:
            return self._block(rec, ins, f"layer '{rec.key}' is shared (called several times)")
        x = ins[0]
        if cls is L.BatchNormalization:
            axis = layer.axis if isinstance(layer.axis, int) else -1
            if axis not in (-1, len(rec.in_shapes[0]) - 1):
                return self._block(rec, ins, f"layer '{rec.key}' normalizes a non-channel axis")
            rec.kind = "bn"
            return [x]
        if isinstance(layer, K.CHANNEL_NORMS):
            return self._block(
                rec,
                ins,
                f"it is normalized by layer '{rec.key}' ({cls.__name__}), whose statistics run "
                "over the channel axis: removing a channel (even an all-zero one) would change "
                "every other channel's output",
            )
        if cls is L.Activation:
            name = getattr(layer.activation, "__name__", "")
            if name not in K.ELEMENTWISE:
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
        if (
            isinstance(layer, keras.layers.Layer)
            and not isinstance(layer, keras.Model)
            and len(ins) == 1
            and x is not None
            and rec.out_shapes[0][1:] == rec.in_shapes[0][1:]
            and K.is_channelwise(layer, len(rec.in_shapes[0]), len(x))
        ):
            rec.kind = "channelwise"
            return [x]
        return self._block(rec, ins)

    def _producer(self, rec, ins):
        layer = rec.layer
        ok = not getattr(layer, "lora_enabled", False) and not getattr(
            layer, "quantization_mode", None
        )
        if rec.key not in self.units:
            self.layers[rec.key] = layer
            self.units[rec.key] = self.uf.new(num_units(layer))
            if not ok:
                self.uf.fix(self.units[rec.key], f"layer '{rec.key}' uses LoRA/quantization")
        if not ok or rec.shared:
            self._block(rec, ins, f"layer '{rec.key}' is shared or uses LoRA/quantization")
        else:
            self.sites.append(rec)
        rec.kind = "producer"
        return [self.units[rec.key]]

    def _grouped(self, rec, ins, member):
        """Depthwise and grouped convs: group g's inputs and outputs form one class.

        A group's output channels read only its input channels, so the group is kept or
        removed whole (a depthwise conv's group is one input channel and its
        `depth_multiplier` outputs). With a unit mask the layer is a member owning those
        classes; without one it passes them through.
        """
        layer, x = rec.layer, ins[0]
        if (
            x is None
            or rec.shared
            or getattr(layer, "lora_enabled", False)
            or getattr(layer, "quantization_mode", None)
        ):
            why = f"layer '{rec.key}' is shared or uses LoRA/quantization"
            out = self._block(rec, ins, why)
            if member and rec.key not in self.units:
                self.layers[rec.key], self.units[rec.key] = layer, out[0]
            return out
        per_in, per_out = K.group_sizes(layer)
        heads = x.reshape(-1, per_in)
        for row in heads[:, 1:].T:
            for a, b in zip(heads[:, 0], row):
                self.uf.union(a, b)
        out = np.repeat(heads[:, 0], per_out)
        if member:
            self.layers[rec.key], self.units[rec.key] = layer, out
            rec.kind = "producer"
        else:
            rec.kind = "grouped"
        return [out]

    def _merge(self, rec, ins):
        if any(s is None for s in ins):
            return self._block(rec, ins)
        layer = rec.layer
        rank = len(rec.out_shapes[0])
        if type(layer) is L.Concatenate and layer.axis % rank == rank - 1:
            rec.kind = "concat"
            return [np.concatenate(ins)]
        return self._unite(rec, ins)

    def _unite(self, rec, ins):
        widths = {len(s) for s in ins}
        if len({len(s) for s in rec.in_shapes}) != 1 or len(widths) != 1:
            return self._block(rec, ins, f"layer '{rec.key}' broadcasts along the channel axis")
        for s in ins[1:]:
            for a, b in zip(ins[0], s):
                self.uf.union(a, b)
        rec.kind = "merge"
        return [ins[0]]

    def _op(self, rec, ins):
        """`keras.ops` elementwise calls: constants keep channels, tensors are coupled."""
        if any(s is None for s in ins) or rec.out_shapes[0][-1:] != rec.in_shapes[0][-1:]:
            return self._block(rec, ins)
        width = len(ins[0])
        for c in K.node_constants(rec.node):
            if K.const_width(c) is None:  # a dtype name, an option: not a tensor operand
                continue
            if K.const_width(c) not in (1, width) or len(np.shape(c)) > len(rec.in_shapes[0]):
                return self._block(
                    rec, ins, f"operation '{rec.key}' has a constant that is not per channel"
                )
        if len(ins) == 1:
            rec.kind = "op"
            return [ins[0]]
        out = self._unite(rec, ins)
        if rec.kind == "merge":
            rec.kind = "op"
        return out

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


# Public names of the analysis live in `groups` (imported last: it builds on `Graph`).
from keras_ibprune.groups import ChannelGroup, channel_groups  # noqa: E402, F401
