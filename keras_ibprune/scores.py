"""Scores: statistics of a layer -> importance of each prunable weight (or unit).

A `Score` maps a `LayerStats` to one array per prunable weight (same shapes; higher
means keep). Channel-granularity pruning asks `unit_scores` for one value per output
unit instead. Scores declare what statistics they need (`needs_data`,
`needs_gradients`); the `Pruner` collects only that.

String aliases resolve through `get()`: ``"magnitude"``, ``"random"`` here; the
information-bottleneck scores register more.

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

_SCORES: dict[str, type] = {}


def register_score(name):
    """Class decorator registering a `Score` subclass under a string alias."""

    def deco(cls):
        _SCORES[name] = cls
        return cls

    return deco


class Score:
    """Base class for pruning scores.

    Subclasses implement `__call__(stats) -> list[np.ndarray]` (one score array per
    prunable weight) and/or `unit_scores(stats) -> np.ndarray` (one value per output
    unit, for `granularity="channel"`). Override `score_model(stats_list)` for scores
    that need every layer at once.
    """

    needs_data = False
    needs_labels = False
    needs_gradients = False

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

    def reset(self):
        """Forgets state kept across updates (called in `on_train_begin`)."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"


@register_score("magnitude")
@keras.saving.register_keras_serializable(package="keras_ibprune")
class MagnitudeScore(Score):
    """`|w|` (Han et al., 2015). Unit score: L1 norm of the unit's fan-in (Li et al., 2017)."""

    def __call__(self, stats):
        return [np.abs(w) for w in stats.weights]

    def unit_scores(self, stats):
        w = stats.weights[-1]
        return np.abs(w).reshape(-1, w.shape[-1]).sum(axis=0)


@register_score("random")
@keras.saving.register_keras_serializable(package="keras_ibprune")
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
        n = stats.wrapper.unit_mask.shape[0]
        return self._rng(stats, 99).random(n)

    def get_config(self):
        return {"seed": self.seed}


def get(identifier):
    """Returns a `Score` from an alias, a `Score` instance, or a serialized config.

    Raises:
        ValueError: for unknown names or objects.
    """
    if isinstance(identifier, Score):
        return identifier
    if isinstance(identifier, str) and identifier in _SCORES:
        return _SCORES[identifier]()
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Score):
            return obj
    raise ValueError(
        f"Unknown score. Expected one of {sorted(_SCORES)} or a keras_ibprune.scores.Score "
        f"instance. Received: score={identifier!r}"
    )
