"""Coupled channel groups: the public view of the graph analysis.

`channel_groups(model)` lists the layers whose output channels must be pruned together
and which of those channels may go at all; `ChannelGroup` is one such group. Used by
`channels` (the structured policy) and by users planning their own structured pruning.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_ibprune import graph as G


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
    DepthwiseConv* / grouped Conv layers wrapped with a channel mask). Depthwise and
    grouped convs couple each group's input and output channels (a group goes whole).
    BatchNormalization, activations, Dropout, pooling, padding, cropping, up-sampling,
    elementwise `keras.ops` calls with constants (``x + 3``, ``x * gamma``) and
    per-channel layers (``channelwise = True``, or all weights of shape ``(C,)``) pass
    channels through; Add/Subtract/Multiply/Average/Maximum/Minimum and ``x + y`` couple
    their inputs channel by channel; Concatenate maps channels with offsets; Flatten and
    Reshape map channels to positions when the mapping is position-independent. Channels
    reaching a model output, normalized over the channel axis (LayerNormalization) or
    consumed by any other layer are reported as not prunable, with the reason.

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
    func = G.functional_of(model)
    members = [la.name for la in func.layers if G.is_channel_wrapper(la)]
    graph = G.Graph(func, members=members)
    return _groups(graph)


def _groups(graph):
    """Layers whose unit classes meet (through one union-find) form one group."""
    uf = graph.uf
    order = list(graph.units)
    roots = {k: uf.roots(c) for k, c in graph.units.items()}
    layers = G.UnionFind()
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
