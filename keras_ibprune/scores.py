"""Scores: statistics of a layer -> importance of each prunable weight (or unit).

A `Score` maps a `stats.LayerStats` to one array per prunable weight (same shapes; higher
means keep). Channel-granularity pruning asks `unit_scores` for one value per output
unit instead. A score declares what it needs: `statistics` (names from
`stats.STATISTICS`, computed in one compiled pass over the held-out batch),
`needs_activations` (full eager capture), `needs_gradients` (loss gradients w.r.t. the
weights) and `needs_labels`; the `Pruner` collects only that. A score may also
`reconstruct` the surviving weights after the masks are chosen.

Scores here: ``"magnitude"`` (alias ``"l1"`` for units), ``"random"``, ``"activation"``
(Wanda), ``"gradient"``, ``"taylor"``, ``"bn_gamma"``, ``"apoz"``. The information scores
(``"ib"``, ``"obs"``, ``"gaussian_obd"``) live in `keras_ibprune.information`.

Every score is Keras-serializable; `get` resolves an alias, a class name, a config dict
or an instance, and `serialize` / `deserialize` round-trip.

Example:

```python
class AbsTimesTwo(kib.Score):
    def __call__(self, stats):
        return [2 * abs(w) for w in stats.weights]

cb = kib.IBPruning(schedule=kib.OneShot(0.5), score=AbsTimesTwo())
```
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat

_ALIASES: dict[str, type] = {}


def register_score(name):
    """Class decorator: registers a `Score` under `name` and as a Keras serializable."""

    def deco(cls):
        _ALIASES[name] = cls
        return keras.saving.register_keras_serializable(package="keras_ibprune")(cls)

    return deco


def aliases():
    """Sorted names accepted by `get`."""
    return sorted(_ALIASES)


class Score:
    """Base class for pruning scores.

    Subclasses implement `__call__(stats) -> list[np.ndarray]` (one score array per
    prunable weight) and/or `unit_scores(stats) -> np.ndarray` (one value per output unit,
    for `granularity="channel"`). Override `score_model(stats_list)` for scores that need
    every layer at once, and `reconstruct(stats, masks)` to re-fit surviving weights.

    Attributes:
        statistics: names from `stats.STATISTICS` this score reads from `stats.summary`.
        log_statistics: extra statistics `measure` needs (computed only when logging).
        needs_activations: full eager activations in `stats.inputs/preacts/outputs`.
        needs_gradients: loss gradients w.r.t. the weights in `stats.grads`.
        needs_labels: held-out labels are required (label-free mode supplies them).
        default_allocation: allocation used when the user gives none.
    """

    statistics: tuple = ()
    log_statistics: tuple = ()
    needs_activations = False
    needs_gradients = False
    needs_labels = False
    default_allocation = "uniform"

    @property
    def needs_data(self):
        """Whether the score reads held-out data at all."""
        return bool(self.statistics or self.needs_activations or self.needs_gradients)

    def __call__(self, stats):
        raise NotImplementedError(f"{type(self).__name__} does not score weights.")

    def unit_scores(self, stats):
        """Default unit score: the mean weight score over each output unit's fan-in."""
        scores = self(stats)
        per = [np.abs(np.asarray(s)).reshape(-1, np.shape(s)[-1]).mean(axis=0) for s in scores]
        n = per[-1].shape[0]
        return np.mean([p for p in per if p.shape[0] == n], axis=0)

    def score_model(self, stats_list, granularity="weight"):
        """Scores every layer; returns one list of arrays (or one array) per layer."""
        if granularity == "channel":
            return [self.unit_scores(s) for s in stats_list]
        return [self(s) for s in stats_list]

    def required_statistics(self, granularity="weight", log=False):
        """The statistics to compute for this granularity (and for `measure` if `log`)."""
        return tuple(self.statistics) + (tuple(self.log_statistics) if log else ())

    def measure(self, stats):
        """Information quantities of one layer for the epoch logs (see `logs`)."""

    def reconstruct(self, stats, masks):
        """New values of the prunable weights once `masks` are chosen, or None (keep)."""
        return None

    def logs(self):
        """Quantities to add to the epoch logs (information scores)."""
        return {}

    def reset(self):
        """Forgets logged quantities (called by `Pruner.reset`, i.e. at train begin). Scores
        keep no state that decides masks: that lives in the model."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"


@register_score("magnitude")
class MagnitudeScore(Score):
    """`|w|` (Han et al., 2015). Unit score: L1 norm of the unit's fan-in (Li et al., 2017).

    Alias ``"l1"`` names the same score for channel pruning ("Pruning Filters for Efficient
    ConvNets"): a filter's L1 norm ``Σ_i |w_ij|``.
    """

    def __call__(self, stats):
        return [np.abs(w) for w in stats.weights]

    def unit_scores(self, stats):
        w = stats.weights[-1]
        return np.abs(w).reshape(-1, w.shape[-1]).sum(axis=0)


_ALIASES["l1"] = MagnitudeScore
L1Score = MagnitudeScore  # the class name used in 0.1; its saved configs still load:
keras.saving.get_custom_objects()["keras_ibprune>L1Score"] = MagnitudeScore


@register_score("random")
class RandomScore(Score):
    """Uniform random scores, fixed per (seed, layer, weight): a baseline.

    Args:
        seed: integer seed; the same seed gives the same masks.
    """

    def __init__(self, seed=0):
        self.seed = int(seed)

    def _rng(self, stats, j):
        return np.random.default_rng([self.seed, stats.index, j])

    def __call__(self, stats):
        return [self._rng(stats, j).random(np.shape(w)) for j, w in enumerate(stats.weights)]

    def unit_scores(self, stats):
        return self._rng(stats, 99).random(stats.wrapper.unit_mask.shape[0])

    def get_config(self):
        return {"seed": self.seed}


@register_score("activation")
class ActivationScore(Score):
    """Wanda `|w_ij| · ‖x_i‖` (Sun et al., 2023): weight times input RMS on held-out data.

    Dense/Conv layers use the input features (conv: patch entries) of the held-out batch;
    other layers fall back to `|w|`.
    """

    statistics = ("x2",)
    default_allocation = "erk"

    def __call__(self, stats):
        x2 = stats.summary.get("x2")
        out = []
        for j, w in enumerate(stats.weights):
            if j == 0 and x2 is not None:
                out.append(np.abs(w) * np.sqrt(np.maximum(x2, 0.0))[..., None])
            else:
                out.append(np.abs(w))
        return out


@register_score("gradient")
class GradientScore(Score):
    """`|∂L/∂w|` on the held-out batch (needs a compiled loss and labels)."""

    needs_labels = True
    needs_gradients = True
    default_allocation = "erk"

    def __call__(self, stats):
        return [np.abs(g) for g in stats.grads]


@register_score("taylor")
class TaylorScore(Score):
    """First-order Taylor `|w · ∂L/∂w|` (Molchanov et al., 2017/2019)."""

    needs_labels = True
    needs_gradients = True
    default_allocation = "erk"

    def __call__(self, stats):
        return [np.abs(w * g) for w, g in zip(stats.weights, stats.grads)]


# ------------------------------------------------------------------- unit scores
def following_batchnorm(wrapper):
    """The BatchNormalization layer consuming `wrapper`'s output, if it is the only one."""
    bns = [o for o in _keras_compat.outbound_layers(wrapper)
           if isinstance(o, keras.layers.BatchNormalization)]
    return bns[0] if len(bns) == 1 else None


@register_score("bn_gamma")
class BNGammaScore(Score):
    """`|γ_j|` of the BatchNormalization that directly follows the layer (network slimming,
    Liu et al., 2017). Layers without a following BatchNormalization fall back to the L1
    norm, scaled to the same mean so the two are comparable."""

    def __call__(self, stats):
        return [np.abs(w) for w in stats.weights]

    def unit_scores(self, stats):
        l1 = MagnitudeScore().unit_scores(stats)
        bn = following_batchnorm(stats.wrapper)
        gamma = None if bn is None or bn.gamma is None else ops.convert_to_numpy(bn.gamma.value)
        if gamma is None or gamma.shape[0] != l1.shape[0]:
            return l1 / (np.mean(l1) + 1e-12)
        g = np.abs(gamma).astype(np.float64)
        return g / (np.mean(g) + 1e-12)


@register_score("apoz")
class APoZScore(Score):
    """`1 - APoZ_j`: the fraction of held-out samples (and positions) where unit `j` is
    non-zero after its activation (Hu et al., 2016, "Network Trimming"). A small mean
    `|output|` term breaks ties between always-active units."""

    needs_activations = True

    def __call__(self, stats):
        return [np.abs(w) for w in stats.weights]

    def unit_scores(self, stats):
        out = stats.outputs
        if out is None:
            raise ValueError(
                "The 'apoz' score needs held-out activations: pass `held_out=(x_val, y_val)`."
            )
        out = np.asarray(out, np.float64).reshape(-1, np.shape(out)[-1])
        active = np.mean(np.abs(out) > 1e-12, axis=0)
        mag = np.mean(np.abs(out), axis=0)
        return active + 1e-3 * mag / (np.max(mag) + 1e-12)


@register_score("vib")
class VIBScore(Score):
    """`α_j = μ_j²/σ_j²` of the unit's variational information bottleneck gate (Dai et
    al., 2018): the gate's signal-to-noise ratio, which the KL term drives to 0 for units
    the loss does not need. Needs `kib.prune(model, granularity="channel", gates="vib")`;
    reads no held-out data. α is comparable across layers, so the channel policy ranks
    raw α (no per-layer normalization) and defaults to one global ranking. Units without a
    gate (model outputs) score +inf (kept).
    """

    normalize_units = False
    default_allocation = "global"

    def __call__(self, stats):
        raise ValueError(
            "The 'vib' score rates output units: use it with granularity='channel' and "
            "gates='vib'. Received: weight-granularity wrappers"
        )

    def unit_scores(self, stats):
        gate = getattr(stats.wrapper, "gate", None)
        if gate is None:
            return np.full(stats.wrapper.unit_mask.shape[0], np.inf)
        return gate.alpha()

    def score_model(self, stats_list, granularity="weight"):
        if granularity != "channel" or not any(
            getattr(s.wrapper, "gate", None) is not None for s in stats_list
        ):
            raise ValueError(
                "score='vib' needs VIB gates: prune with `kib.prune(model, "
                "granularity='channel', gates='vib')`. Received: granularity="
                f"{granularity!r} without gated layers"
            )
        return super().score_model(stats_list, granularity)


# ---------------------------------------------------------------------- registry
def serialize(score):
    """Keras config of a `Score` (see `keras.saving.serialize_keras_object`)."""
    return keras.saving.serialize_keras_object(score)


def deserialize(config):
    """A `Score` from `serialize`'s output."""
    obj = keras.saving.deserialize_keras_object(config)
    if not isinstance(obj, Score):
        raise ValueError(f"The config does not describe a Score. Received: config={config!r}")
    return obj


def get(identifier):
    """Returns a `Score` from an alias, a class name, a `Score` instance or a config dict.

    Raises:
        ValueError: for unknown names or objects.
    """
    import keras_ibprune.information  # noqa: F401  (registers "ib", "obs", "gaussian_obd")

    if isinstance(identifier, Score):
        return identifier
    if isinstance(identifier, str):
        if identifier in _ALIASES:
            return _ALIASES[identifier]()
        by_class = {cls.__name__: cls for cls in _ALIASES.values()}
        if identifier in by_class:
            return by_class[identifier]()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise ValueError(
        f"Unknown score. Expected one of {aliases()}, a Score class name, a config dict or a "
        f"keras_ibprune.Score instance. Received: score={identifier!r}"
    )
