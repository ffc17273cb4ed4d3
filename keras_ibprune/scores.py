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
    needs_summaries = False

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


def _summary(stats):
    return (stats.extra or {}).get("summary")


def _activation_name(layer):
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else "linear"


@register_score("activation")
@keras.saving.register_keras_serializable(package="keras_ibprune")
class ActivationScore(Score):
    """Wanda-style `|w_ij| · ‖x_i‖` (Sun et al., 2023): weight times input RMS on held-out data.

    Dense/Conv layers use the input features (conv: patch entries) of the held-out batch;
    other layers fall back to `|w|`.
    """

    needs_data = True
    needs_summaries = True
    default_allocation = "erk"

    def __call__(self, stats):
        s = _summary(stats)
        out = []
        for j, w in enumerate(stats.weights):
            if j == 0 and s is not None and "x2" in s:
                out.append(np.abs(w) * np.sqrt(np.maximum(s["x2"], 0.0))[..., None])
            else:
                out.append(np.abs(w))
        return out


@register_score("gradient")
@keras.saving.register_keras_serializable(package="keras_ibprune")
class GradientScore(Score):
    """`|∂L/∂w|` on the held-out batch (needs a compiled loss and labels)."""

    needs_data = True
    needs_labels = True
    needs_gradients = True
    default_allocation = "erk"

    def __call__(self, stats):
        return [np.abs(g) for g in stats.grads]


@register_score("taylor")
@keras.saving.register_keras_serializable(package="keras_ibprune")
class TaylorScore(Score):
    """First-order Taylor `|w · ∂L/∂w|` (Molchanov et al., 2017/2019)."""

    needs_data = True
    needs_labels = True
    needs_gradients = True
    default_allocation = "erk"

    def __call__(self, stats):
        return [np.abs(w * g) for w, g in zip(stats.weights, stats.grads)]


@register_score("ib")
@keras.saving.register_keras_serializable(package="keras_ibprune")
class IBScore(Score):
    """Information-bottleneck score: nats of label information lost per removed weight.

    For a wrapped layer with output ``T`` (post-activation; logits for a softmax layer)
    the held-out batch gives the Gaussian sensitivity of ``I(T; Y)`` to noise in unit j
    (`estimators.noise_sensitivity`, joint over the layer's units, so redundant copies
    are cheap to damage):

        κ_j = ½ ((Σ_w⁻¹)_jj − (Σ_t⁻¹)_jj)                      [nats / variance]

    Removing ``w_ij`` adds ``−w_ij x_i`` to the pre-activation of unit j, a perturbation
    of energy ``δ_ij = w_ij² E[x_i²]`` at each of the ``P`` output positions the weight is
    used at (``P = 1`` for Dense, ``H_out·W_out`` for Conv2D). To first order the label
    information lost, counted per input (positions treated as independent uses), is

        ΔI_ij = ½ κ_j · w_ij² · E[x_i²] · P                     [nats]

    a Gaussian-channel Optimal Brain Damage whose curvature is the Fisher information of
    ``Y`` about the unit (not the loss Hessian), and whose ``|w|·‖x‖`` factor is Wanda's.
    The input energy is not gated by the activation (a unit that is off now may be on
    after fine-tuning; gating measured worse on LeNet-5). Scores are nats for every
    layer, so the ``"ib"`` allocation water-fills them across layers. They are smoothed
    across updates with an EMA (`ema`).

    Unit scores (``granularity="channel"``): ``u_j − β ū I(X; T_j) / Ī(X; T)`` with the
    unique relevance ``u_j = ½ log((Σ_w⁻¹)_jj / (Σ_t⁻¹)_jj)``, the noise-floor compression
    ``I(X; T_j) = ½ log(1 + var(T_j)/σ²)`` expressed in units of the layer's mean relevance
    ``ū`` (bars: layer means), and constant (dead) units ranked last.

    Logs: ``I_TY/<layer>`` (Gaussian ``I(T; Y)`` of the per-sample output, conv outputs
    averaged over positions) and ``I_XT/<layer>`` (``½ log det(I + Σ_t/σ²)``).

    Args:
        estimator: `"gaussian"` (default), `"binned"` or `"hsic"` for relevance and logs;
            with the non-Gaussian estimators ``κ_j = I(T_j; Y) / var(T_j)``.
        beta: weight of the compression term in unit scores (default 0.05 nats/nat).
        noise_var: σ² of the noise floor for ``I(X; T)`` (in units of the activations).
        shrinkage: covariance shrinkage λ of the Gaussian estimator.
        ema: smoothing factor across updates (0 = no smoothing).
        joint: use the joint (unique) sensitivity; False = marginal per-unit.
        max_rows: rows (samples × conv positions) kept per layer.
        seed: seed of the conv position subsample.

    References: Tishby et al. (2000); Shwartz-Ziv & Tishby (2017); Dai et al. (2018),
    variational IB pruning; LeCun et al. (1990), Optimal Brain Damage; Sun et al. (2023),
    Wanda; Evci et al. (2020), ERK (the floors of the "ib" allocation).

    Example:

    ```python
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.98, 0, 4), score=IBScore(ema=0.7),
                       held_out=(x_val, y_val))          # allocation "ib" by default
    ```
    """

    needs_data = True
    needs_labels = True
    needs_summaries = True
    default_allocation = "ib"

    def __init__(self, estimator="gaussian", beta=0.05, noise_var=1e-2, shrinkage=0.05,
                 ema=0.5, joint=True, max_rows=8192, seed=0):
        from keras_ibprune import estimators

        self.estimator = estimators.check_estimator(estimator)
        self.beta, self.noise_var, self.shrinkage = float(beta), float(noise_var), float(shrinkage)
        if not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"`ema` must be in [0, 1). Received: ema={ema!r}")
        self.ema, self.joint = float(ema), bool(joint)
        self.max_rows, self.seed = int(max_rows), int(seed)
        self.reset()

    def reset(self):
        self._ema, self._logs = {}, {}

    def get_config(self):
        return {"estimator": self.estimator, "beta": self.beta, "noise_var": self.noise_var,
                "shrinkage": self.shrinkage, "ema": self.ema, "joint": self.joint,
                "max_rows": self.max_rows, "seed": self.seed}

    def logs(self):
        return dict(self._logs)

    # ------------------------------------------------------------------ helpers
    def _unit_t(self, stats, s):
        if _activation_name(stats.wrapper.layer) == "softmax":
            return s["z"], s["labels"]
        return s["t"], s["labels"]

    def _kappa(self, stats, s):
        """κ_j per unit, plus the layer's Gaussian `(cov, info)` for reuse by `measure`."""
        from keras_ibprune import estimators as est

        t, lab = self._unit_t(stats, s)
        if self.estimator != "gaussian":
            r = est.unit_mi(t, lab, self.estimator, shrinkage=self.shrinkage)
            return r / np.maximum(t.var(axis=0), 1e-12), None
        cov = est.covariances(t, lab, self.shrinkage)
        info = est.gaussian_layer(None, None, cov=cov)
        if self.joint:
            return info["kappa"], (cov, info)
        st, sw = cov
        return np.maximum(0.5 * (1.0 / np.diag(sw) - 1.0 / np.diag(st)), 0.0), (cov, info)

    def measure(self, stats, cached=None):
        """Refreshes the logged ``I(T; Y)`` and ``I(X; T)`` of one layer; returns both.

        ``I(T; Y)``: Gaussian (or the chosen estimator) on the per-sample output (conv:
        spatial mean; softmax layer: logits). ``I(X; T) = ½ log det(I + Σ_t/σ²)``.
        """
        from keras_ibprune import estimators as est

        s = _summary(stats)
        if s is None or s["sample_labels"] is None:
            return None
        name = stats.wrapper.layer.name
        softmax = _activation_name(stats.wrapper.layer) == "softmax"
        if cached is not None and s["positions"] == 1 and self.estimator == "gaussian":
            (st, _), info = cached
            ity = info["mi"]
            c = st / max(self.noise_var, 1e-12)
            c[np.diag_indices(len(c))] += 1.0
            ixt = 0.5 * est._logdet(c)
        else:
            if softmax:
                tm = s["z"][np.unique(s["rows"], return_index=True)[1]]
            else:
                tm = s["t_mean"]
            ity = est.layer_mi(tm, s["sample_labels"], self.estimator,
                               shrinkage=self.shrinkage)
            ixt = est.gaussian_compression(tm, self.noise_var, per_unit=False)
        self._logs[f"I_TY/{name}"] = float(ity)
        self._logs[f"I_XT/{name}"] = float(max(ixt, 0.0))
        return ity, ixt

    def _smooth(self, key, value):
        old = self._ema.get(key)
        if old is not None and old.shape == value.shape and self.ema > 0:
            value = self.ema * old + (1.0 - self.ema) * value
        self._ema[key] = value
        return value

    # ------------------------------------------------------------------- scores
    def __call__(self, stats):
        s = _summary(stats)
        if s is None or s["labels"] is None:
            return [np.abs(w) for w in stats.weights]
        kappa, cached = self._kappa(stats, s)
        self.measure(stats, cached)
        out = []
        for j, w in enumerate(stats.weights):
            w2 = np.square(w.astype(np.float64))
            if j == 0 and "x2" in s:
                d = 0.5 * kappa * w2 * s["x2"][..., None] * s["positions"]
            else:  # other layers: weight energy relative to the unit's fan-in energy
                d = self._fallback(w2, kappa, s)
            out.append(self._smooth((stats.index, j), np.nan_to_num(d, nan=0.0, posinf=0.0)))
        return out

    @staticmethod
    def _fallback(w2, kappa, s):
        """Layers without an input/kernel mapping (attention, RNN, embedding, depthwise...).

        ``½ κ_j var(T_j) w_ij² / Σ_i w_ij²`` when the kernel's last axis is the layer's
        output units; otherwise the layer's mean ``κ var(T)`` times ``w² / mean(w²)``.
        """
        if w2.ndim < 2:
            return w2
        var = s["t"].var(axis=0)
        if w2.shape[-1] == kappa.shape[0]:
            fan = w2.reshape(-1, w2.shape[-1]).sum(axis=0)
            return 0.5 * kappa * var * w2 / np.maximum(fan, 1e-12)
        scale = 0.5 * float(np.mean(kappa * var))
        return scale * w2 / max(float(np.mean(w2)), 1e-12) / max(w2.size, 1)

    def unit_scores(self, stats):
        from keras_ibprune import estimators as est

        s = _summary(stats)
        if s is None or s["sample_labels"] is None:
            return MagnitudeScore().unit_scores(stats)
        self.measure(stats)
        tm = s["t_mean"]
        if self.estimator == "gaussian":
            rel = est.unique_relevance(tm, s["sample_labels"], self.shrinkage)
        else:
            rel = est.unit_mi(tm, s["sample_labels"], self.estimator)
        comp = est.gaussian_compression(tm, self.noise_var)
        # β weighs compression in units of the layer's typical relevance, so a wide layer
        # whose unique relevances are all tiny is not ranked by compression alone.
        comp = comp / (np.mean(comp) + 1e-12) * (np.mean(np.abs(rel)) + 1e-12)
        score = rel - self.beta * comp
        var = np.var(np.asarray(tm, np.float64), axis=0)
        dead = var <= 1e-10 * max(float(var.max()), 1e-30)
        if dead.any() and not dead.all():  # a constant unit carries nothing: rank it last
            score = np.where(dead, score[~dead].min() - 1.0, score)
        return self._smooth((stats.index, "units"), score)


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
