"""Structured pruning policy: which whole units/filters to remove at each update.

With `granularity="channel"` every `PruneWrapper` holds a `unit_mask`. This module turns
per-unit scores into unit masks while respecting the graph:

- channels of layers coupled through Add/Multiply/Concatenate/... (`channel_groups`) are
  scored together (sum of the members' normalized scores; a VIB gate the members share
  counts once) and removed together;
- channels `shrink` can never remove (reaching a model output, consumed by an opaque
  layer) are never removed;
- the schedule's sparsity means the fraction of **units** removed (`target="units"`), of
  **FLOPs** removed (`target="flops"`: 0.75 -> 4x fewer FLOPs) or of **parameters** removed
  (`target="params"`), measured exactly with `count_flops`/`count_params(effective=True)`;
- every group keeps at least `max(1, min_width)` channels, and with `round_to=N` a multiple
  of N (when the layer is that wide).

Unit scores come from `keras_ibprune.scores` (``"l1"``, ``"bn_gamma"``, ``"apoz"``,
``"random"``) and `keras_ibprune.information` (``"ib"``: unique label information of the
unit minus β times its compression cost).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat
from keras_ibprune import flops as flops_lib
from keras_ibprune.graph import ChannelGroup, channel_groups

TARGETS = ("units", "flops", "params")


def check_target(target):
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}. Received: target={target!r}")
    return target


class ChannelPolicy:
    """Computes and writes unit masks for one model (used by `Pruner` in channel mode).

    Args:
        model: a Functional/Sequential model whose wrappers use `granularity="channel"`.
        wrappers: those wrappers.
        target: `"units"`, `"flops"` or `"params"`.
        allocation: `"uniform"` (each group loses the same fraction) or `"global"` / its
            alias `"ib"` (one ranking of normalized scores, per unit of cost for
            flops/params). `"erk"` and `"global_erk_floor"` are weight allocations and
            raise here.
        min_width: minimum number of channels any group keeps (at least 1).
        round_to: keep a multiple of this many channels per group (when possible).
        regrow: allow removed channels to come back.
        frozen: names of wrappers whose units are never removed (`exclude`).
    """

    def __init__(
        self,
        model,
        wrappers,
        target="units",
        allocation="uniform",
        min_width=1,
        round_to=None,
        regrow=False,
        frozen=(),
    ):
        self.model = model
        self.target = check_target(target)
        if callable(allocation) or allocation not in ("uniform", "global", "ib"):
            raise ValueError(
                "Channel pruning allocates units with 'uniform' or 'global' (alias 'ib'). "
                f"Received: allocation={allocation!r}"
            )
        self.allocation = "global" if allocation == "ib" else allocation
        self.regrow = bool(regrow)
        self.round_to = round_to
        self.by_name = {w.name: w for w in wrappers}
        graph_ok = _keras_compat.has_graph(model) or isinstance(model, keras.Sequential)
        if graph_ok:
            self.groups = [g for g in channel_groups(model) if g.size > 0]
        else:  # subclassed: no graph -> every wrapper alone, every unit prunable
            self.groups = [
                ChannelGroup(
                    {w.name: np.arange(w.unit_mask.shape[0])},
                    int(w.unit_mask.shape[0]),
                    np.ones(int(w.unit_mask.shape[0]), bool),
                )
                for w in wrappers
            ]
            if self.target != "units":
                raise ValueError(
                    f"target={target!r} needs a Functional or Sequential model to count costs. "
                    f"Received: a subclassed model {model.name!r}"
                )
        # A group with an unwrapped member (a plain producer coupled through Add, ...) or an
        # excluded one keeps every channel; only wrapped members get masks written.
        groups = []
        for g in self.groups:
            if any(name in frozen or name not in self.by_name for name in g.members):
                g.prunable = np.zeros(g.size, dtype=bool)
            g.members = {n: i for n, i in g.members.items() if n in self.by_name}
            if g.members:
                groups.append(g)
        self.groups = groups
        self.min_width = max(1, int(min_width or 1))
        for g in self.groups:
            if self.min_width > g.size:
                raise ValueError(
                    f"`min_width` is larger than layer(s) {list(g.layers)} with {g.size} units. "
                    f"Received: min_width={min_width}"
                )
        # Exact counts of the model `shrink` would build (kept-back units count as kept).
        self._counter = flops_lib.Counter(model, int(self.target == "params")) if graph_ok else None
        if self.target != "units":
            count = flops_lib.count_flops if self.target == "flops" else flops_lib.count_params
            self._count = self._counter
            self.total = float(count(model))
            self._unit_cost = (
                flops_lib.unit_flops if self.target == "flops" else flops_lib.unit_params
            )(model)

    def removed(self):
        """Fraction of the target quantity (units, FLOPs or params) removed now."""
        if self.target == "units":
            ms = [ops.convert_to_numpy(w.unit_mask.value) for w in self.by_name.values()]
            return float(1.0 - np.concatenate(ms).mean())
        return float(1.0 - self._count(None) / self.total)

    # ------------------------------------------------------------------ masks
    def current_keep(self, group):
        keep = np.zeros(group.size, dtype=bool)
        for name, idx in group.members.items():
            um = ops.convert_to_numpy(self.by_name[name].unit_mask.value) > 0
            np.logical_or.at(keep, idx, um)
        return keep

    def group_scores(self, group, per_layer, normalize=True):
        normed, gates = {}, set()
        for name in group.members:
            s = np.asarray(per_layer[name], np.float64).reshape(-1)
            if not normalize:  # comparable across layers (VIB α); +inf = ungated, kept
                gate = getattr(self.by_name[name], "gate", None)
                if gate is not None and id(gate) in gates:
                    continue  # a shared gate (residual Add): the unit's α counts once
                gates.add(id(gate))
                normed[name] = np.nan_to_num(s, nan=0.0, posinf=np.inf, neginf=0.0)
                continue
            s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
            scale = np.mean(np.abs(s)) + 1e-12
            normed[name] = s / scale
        return group.reduce(normed, fn=np.sum)

    def update(self, sparsity, per_layer, normalize=True):
        """Writes unit masks removing `sparsity` of the target quantity.

        Args:
            sparsity: fraction in [0, 1) of units / FLOPs / parameters to remove.
            per_layer: dict wrapper name -> unit scores (higher = keep).
            normalize: divide each layer's scores by their mean before coupled layers'
                scores are summed (False: scores already comparable, e.g. VIB α).
        """
        stuck = self._stuck()
        plans = []
        for g in self.groups:
            scores = self.group_scores(g, per_layer, normalize)
            alive = np.ones(g.size, bool) if self.regrow else self.current_keep(g)
            # Units shrink would keep anyway are not picked (masked ones stay masked).
            free = g.prunable & ~(stuck(g) & alive)
            scores = np.where(alive, scores, -np.inf)
            scores = np.where(free, scores, np.inf)  # never removed
            order = np.argsort(scores, kind="stable")  # lowest first
            removable = int(np.sum(free))
            floor = min(g.size, self.min_width)
            max_remove = max(0, min(removable, g.size - floor))
            plans.append((g, order, int(np.sum(~alive)), max_remove, scores))
        if self.target == "units" and self.allocation == "uniform":
            for g, *_ in plans:
                if int(round(sparsity * g.size)) >= g.size:
                    raise ValueError(
                        f"Sparsity {sparsity:.4g} would remove every unit of layer(s) "
                        f"{list(g.layers)} ({g.size} units). Lower the sparsity or use "
                        f"target='flops'. Received: sparsity={sparsity!r}"
                    )
            counts = [
                self._round(g, min(mr, max(dead, int(round(sparsity * g.size)))))
                for g, _, dead, mr, _ in plans
            ]
        elif self.allocation == "uniform":
            counts = self._solve(plans, sparsity, lambda f, p: self._uniform_count(p, f))
        else:
            counts = self._solve_global(plans, sparsity)
        for (g, order, _, _, _), c in zip(plans, counts):
            keep = np.ones(g.size, bool)
            keep[order[:c]] = False
            for name, m in g.expand(keep).items():
                self.by_name[name].unit_mask.assign(m.astype("float32"))

    def _stuck(self):
        """Group channel -> "kept by shrink whenever masked", from the current weights."""
        if self._counter is None:
            return lambda g: np.zeros(g.size, dtype=bool)
        self._counter.refresh()
        roots = np.array(sorted(self._counter.stuck()), dtype=np.int64)
        graph = self._counter.graph

        def of(g):
            out = np.zeros(g.size, dtype=bool)
            for name, idx in g.members.items():
                hit = np.isin(graph.uf.roots(graph.units[name]), roots)
                np.logical_or.at(out, idx, hit)
            return out

        return of

    def _round(self, g, remove):
        if not self.round_to:
            return remove
        kept = g.size - remove
        kept = min(g.size, int(np.ceil(kept / self.round_to) * self.round_to))
        return g.size - kept

    def _uniform_count(self, plan, f):
        g, _, dead, mr, _ = plan
        return self._round(g, min(mr, max(dead, int(np.floor(f * g.size + 1e-9)))))

    def _keep_dict(self, plans, counts):
        out = {}
        for (g, order, _, _, _), c in zip(plans, counts):
            keep = np.ones(g.size, bool)
            keep[order[:c]] = False
            out.update(g.expand(keep))
        return out

    def _removed_fraction(self, plans, counts):
        if self.target == "units":
            total = sum(g.size for g, *_ in plans)
            return sum(counts) / max(total, 1)
        return 1.0 - self._count(self._keep_dict(plans, counts)) / self.total

    def _solve(self, plans, sparsity, counts_for):
        """Smallest f in [0, 1] whose counts remove at least `sparsity` (bisection)."""
        lo, hi = 0.0, 1.0
        best = [counts_for(1.0, p) for p in plans]
        self._check_reachable(plans, best, sparsity)
        for _ in range(30):
            mid = (lo + hi) / 2
            counts = [counts_for(mid, p) for p in plans]
            if self._removed_fraction(plans, counts) >= sparsity - 1e-9:
                hi, best = mid, counts
            else:
                lo = mid
        return best

    def _solve_global(self, plans, sparsity):
        """One threshold on score per unit of cost across groups (bisection on rank)."""
        entries = []
        for i, (g, order, dead, mr, scores) in enumerate(plans):
            cost = max(self._group_cost(g), 1e-12)
            for rank in range(mr):
                s = scores[order[rank]]
                entries.append((-np.inf if rank < dead else s / cost, i))
        entries.sort(key=lambda e: e[0])

        def counts_for(k):
            counts = [0] * len(plans)
            for _, i in entries[:k]:
                counts[i] += 1
            return [self._round(p[0], c) for p, c in zip(plans, counts)]

        self._check_reachable(plans, counts_for(len(entries)), sparsity)
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._removed_fraction(plans, counts_for(mid)) >= sparsity - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        return counts_for(lo)

    def _check_reachable(self, plans, most, sparsity):
        reach = self._removed_fraction(plans, most)
        if reach < sparsity - 1e-9:
            raise ValueError(
                f"target={self.target!r}: removing {sparsity:.4g} would remove every unit of "
                f"some layer; at most {reach:.4g} can go while every layer keeps "
                f"{self.min_width} unit(s) and output/opaque channels stay. Received: "
                f"sparsity={sparsity!r}"
            )

    def _group_cost(self, g):
        if self.target == "units":
            return 1.0
        costs = [self._unit_cost.get(n, 0.0) for n in g.members]
        return max(costs) if costs else 1.0
