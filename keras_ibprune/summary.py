"""Sparsity reports for wrapped or stripped models: `sparsity` and `sparsity_summary`."""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_ibprune import registry
from keras_ibprune.wrapper import PruneWrapper


def _rows(model):
    rows, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, PruneWrapper) or registry.is_prunable(layer):
            # Sub-layers of a counted layer (the wrapped layer, MHA projections) are not rows.
            seen.update(id(sub) for sub in layer._flatten_layers(include_self=False))
        if isinstance(layer, PruneWrapper):
            if not layer.built:
                continue
            values = layer.masked_weights()
            inner = layer.layer
            units = None
            if layer.unit_mask is not None:
                um = ops.convert_to_numpy(layer.unit_mask.value)
                units = (int(um.sum()), int(um.size))
        elif registry.is_prunable(layer) and layer.built and not hasattr(layer, "layers"):
            try:
                values = [ops.convert_to_numpy(v.value) for v in registry.get_prunable_weights(layer)]
            except (AttributeError, ValueError):
                continue
            inner, units = layer, None
        else:
            continue
        total = int(sum(v.size for v in values))
        nonzero = int(sum(np.count_nonzero(v) for v in values))
        rows.append(
            {
                "layer": inner.name,
                "type": type(inner).__name__,
                "wrapped": isinstance(layer, PruneWrapper),
                "weights": total,
                "nonzero": nonzero,
                "sparsity": 1.0 - nonzero / total if total else 0.0,
                "units_kept": units,
            }
        )
    return rows


class SparsitySummary:
    """Per-layer sparsity table; `print()` it or use `as_dict()`."""

    def __init__(self, rows):
        self.rows = rows

    @property
    def total_weights(self):
        return sum(r["weights"] for r in self.rows)

    @property
    def total_nonzero(self):
        return sum(r["nonzero"] for r in self.rows)

    @property
    def sparsity(self):
        t = self.total_weights
        return 1.0 - self.total_nonzero / t if t else 0.0

    def as_dict(self):
        return {
            "layers": {r["layer"]: dict(r) for r in self.rows},
            "total_weights": self.total_weights,
            "total_nonzero": self.total_nonzero,
            "sparsity": self.sparsity,
        }

    def __getitem__(self, key):
        return self.as_dict()[key]

    def __str__(self):
        w = max([len(r["layer"]) for r in self.rows] + [5])
        lines = [f"{'layer':<{w}}  {'type':<18} {'weights':>9} {'nonzero':>9} {'sparsity':>8}"]
        lines.append("-" * len(lines[0]))
        for r in self.rows:
            lines.append(
                f"{r['layer']:<{w}}  {r['type']:<18} {r['weights']:>9} {r['nonzero']:>9} "
                f"{r['sparsity']:>8.2%}"
            )
        lines.append("-" * len(lines[0]))
        lines.append(
            f"{'total':<{w}}  {'':<18} {self.total_weights:>9} {self.total_nonzero:>9} "
            f"{self.sparsity:>8.2%}"
        )
        return "\n".join(lines)

    __repr__ = __str__


def sparsity_summary(model):
    """Per-layer table of prunable weights, non-zeros and sparsity (wrapped or stripped).

    Example:

    ```python
    print(kib.sparsity_summary(final))
    kib.sparsity_summary(final).as_dict()["sparsity"]
    ```
    """
    return SparsitySummary(_rows(model))


def sparsity(model) -> float:
    """Overall fraction of zero prunable weights (masks applied for wrapped layers)."""
    return sparsity_summary(model).sparsity
