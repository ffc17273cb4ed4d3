"""Sparsity reports for wrapped or stripped models: `sparsity` and `sparsity_summary`."""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_ibprune import _keras_compat, registry
from keras_ibprune.wrapper import PruneWrapper


def _rows(model):
    rows, seen = [], set()
    for layer in _keras_compat.all_layers(model):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, PruneWrapper) or registry.is_prunable(layer):
            # Sub-layers of a counted layer (the wrapped layer, MHA projections) are not rows.
            seen.update(id(sub) for sub in _keras_compat.all_layers(layer))
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
                weights = registry.get_prunable_weights(layer)
                values = [ops.convert_to_numpy(v.value) for v in weights]
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
    """Per-layer sparsity table; `print()` it or use `as_dict()`.

    Two totals, labelled: `sparsity` over every prunable weight of the model (wrapped or
    not), and `pruned_sparsity` over the wrapped layers only — the figure `IBPruning` logs
    as `sparsity` and the schedule targets. They differ when some prunable layers are left
    unwrapped (`kib.prune(model, layers=[...])` or `exclude=`).
    """

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

    @property
    def pruned_sparsity(self):
        """Fraction of zeros over the wrapped layers (None when nothing is wrapped)."""
        rows = [r for r in self.rows if r["wrapped"]]
        t = sum(r["weights"] for r in rows)
        return 1.0 - sum(r["nonzero"] for r in rows) / t if t else None

    def as_dict(self):
        return {
            "layers": {r["layer"]: dict(r) for r in self.rows},
            "total_weights": self.total_weights,
            "total_nonzero": self.total_nonzero,
            "sparsity": self.sparsity,
            "pruned_sparsity": self.pruned_sparsity,
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
        wrapped = [r for r in self.rows if r["wrapped"]]
        if wrapped and len(wrapped) < len(self.rows):  # the callback's figure, labelled
            lines.append(
                f"{'pruned layers':<{w}}  {'(IBPruning sparsity)':<18} "
                f"{sum(r['weights'] for r in wrapped):>9} "
                f"{sum(r['nonzero'] for r in wrapped):>9} {self.pruned_sparsity:>8.2%}"
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


def plot_information_plane(history, layers=None, ax=None):
    """Draws each layer's path in the information plane `(I(X;T), I(T;Y))` over epochs.

    Reads the `I_XT/<layer>` and `I_TY/<layer>` entries that
    `IBPruning(..., log_information=True)` writes into the epoch logs (Shwartz-Ziv &
    Tishby, 2017). Needs matplotlib (an optional dependency).

    Args:
        history: the `keras.callbacks.History` returned by `fit`, or its `.history` dict.
        layers: optional layer names to draw (default: every layer found in the logs).
        ax: optional matplotlib axes to draw on.

    Returns:
        The matplotlib axes.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the history holds no information-plane entries.

    Example:

    ```python
    cb = kib.IBPruning(sched, held_out=(xv, yv), log_information=True)
    history = pruned.fit(x, y, epochs=6, callbacks=[cb])
    kib.plot_information_plane(history).figure.savefig("ip.png")
    ```
    """
    plt, logs = _pyplot_and_logs("plot_information_plane", history)
    names = [n for n in _layer_names(logs, "I_XT/", layers) if f"I_TY/{n}" in logs]
    if not names:
        raise ValueError(
            "No information-plane entries (I_XT/<layer>, I_TY/<layer>) in the history "
            "(pass `log_information=True` to IBPruning): "
            "train with IBPruning using an IB score and held-out data. Received: keys "
            f"{sorted(logs)[:10]}"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    for name in names:
        xs = np.asarray(logs[f"I_XT/{name}"], dtype=float)
        ys = np.asarray(logs[f"I_TY/{name}"], dtype=float)
        (line,) = ax.plot(xs, ys, "-", label=name, alpha=0.8)
        ax.scatter(xs, ys, c=np.arange(len(xs)), cmap="viridis", s=18, zorder=3)
        ax.annotate("start", (xs[0], ys[0]), fontsize=7, color=line.get_color())
    ax.set_xlabel("I(X;T) [nats]")
    ax.set_ylabel("I(T;Y) [nats]")
    ax.set_title("Information plane (colour: epoch)")
    ax.legend(fontsize=8)
    return ax


def plot_units_kept(history, layers=None, ax=None):
    """Draws the units each gated layer keeps over epochs (VIB gates, `gates="vib"`).

    Reads the ``vib/units/<layer>`` entries that `IBPruning` writes into the epoch logs
    of a model pruned with `kib.prune(model, granularity="channel", gates="vib")`; the
    line's markers are coloured by the layer's mean ``log α`` (``vib/log_alpha/<layer>``)
    when logged. Needs matplotlib.

    Args:
        history: the `keras.callbacks.History` returned by `fit`, or its `.history` dict.
        layers: optional layer names to draw (default: every gated layer in the logs).
        ax: optional matplotlib axes to draw on.

    Returns:
        The matplotlib axes.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the history holds no ``vib/units/<layer>`` entries.

    Example:

    ```python
    history = pruned.fit(x, y, epochs=8, callbacks=[kib.IBPruning(sched, score="vib")])
    kib.plot_units_kept(history).figure.savefig("units.png")
    ```
    """
    plt, logs = _pyplot_and_logs("plot_units_kept", history)
    prefix = "vib/units/"
    names = _layer_names(logs, prefix, layers)
    if not names:
        raise ValueError(
            "No 'vib/units/<layer>' entries in the history: train a model pruned with "
            "gates='vib' with the IBPruning callback. Received: keys "
            f"{sorted(logs)[:10]}"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    for name in names:
        units = np.asarray(logs[prefix + name], dtype=float)
        epochs = np.arange(1, len(units) + 1)
        (line,) = ax.plot(epochs, units, "-", label=name, alpha=0.8)
        log_alpha = logs.get(f"vib/log_alpha/{name}")
        if log_alpha is not None:
            ax.scatter(epochs, units, c=np.asarray(log_alpha, float), cmap="viridis", s=18,
                       zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("units kept")
    ax.set_title("Units kept per layer (marker colour: mean log α)")
    ax.legend(fontsize=8)
    return ax


def _pyplot_and_logs(name, history):
    """`matplotlib.pyplot` and the epoch logs of a keras `History` (or its dict)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{name} needs matplotlib: `pip install matplotlib`.") from e
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict):
        raise ValueError(
            "Expected a keras History or its `.history` dict. Received: "
            f"history of type {type(history).__name__}"
        )
    return plt, logs


def _layer_names(logs, prefix, layers=None):
    """Layer names of the `<prefix><layer>` log entries, optionally only those in `layers`."""
    names = [k[len(prefix):] for k in logs if k.startswith(prefix)]
    return names if layers is None else [n for n in names if n in set(layers)]
