"""Information scores: how many nats of label information removing a weight destroys.

The quantity (all layers, one unit: nats). Let ``p_W(y|x)`` be the model's predictive
distribution. Removing weights changes it to ``p_W'``; the label information the model's
prediction loses is the expected divergence

    ΔI = E_x KL(p_W(·|x) ‖ p_W'(·|x))
       = increase of E[−log p_W'(y|x)], y drawn from the model
       = decrease of the variational bound H(Y) − CE on the information I(X; Y) the
         network's output carries, when the model is calibrated.

To second order ``ΔI ≈ ½ δθᵀ F δθ`` with ``F`` the Fisher information of the prediction
(expectation under ``p_W`` itself, so no labels are needed; ``fisher="empirical"`` uses the
held-out labels instead). For a Dense/Conv layer ``z_j = Σ_i w_ij x_i`` the Kronecker
factorization (K-FAC: Martens & Grosse, 2015; Grosse & Martens, 2016 for convolutions)
``F ≈ H ⊗ diag(F_j)`` with ``H = E[x xᵀ]`` and ``F_j = Σ_p E[(∂ log p(ŷ|x)/∂z_pj)²]`` turns
removing ``w_ij`` with the optimal re-fit of the remaining weights of unit ``j`` into the
Optimal Brain Surgeon saliency (`keras_ibprune.obs`)

    ΔI_ij = ½ F_j w_ij² / [H⁻¹]_ii                                        [nats]

``F_j`` carries the labels (how much the prediction depends on unit ``j``); ``[H⁻¹]_ii``
the redundancy of input ``i`` given the others (``1/[H⁻¹]_ii = H_ii (1 − R_i²)``). With
``diagonal_correction=True`` the product ``F_j H_ii`` is replaced by the exact diagonal
Fisher ``D_ij = Σ_p E[g_pj² x_pi²]`` (how the label sensitivity and the input co-vary).
Because every layer is measured in the same nats, one global threshold allocates the
budget across layers (water-filling the information lost); after the masks are chosen
the surviving weights are re-fitted by the SparseGPT sweep (`reconstruct=True`).

Assumptions, stated: second order around the current weights; the Fisher is
block-diagonal per layer and diagonal across output units; gradients at different
positions of a convolution are uncorrelated and independent of the inputs (K-FAC);
``ŷ`` is one Monte-Carlo label per held-out sample (fixed seed).

References: LeCun et al. (1990), Optimal Brain Damage; Hassibi & Stork (1993), Optimal
Brain Surgeon; Martens & Grosse (2015), K-FAC; Theis et al. (2018) and Singh & Alistarh
(2020, WoodFisher), Fisher pruning; Frantar & Alistarh (2023), SparseGPT; Tishby et al.
(2000), the information bottleneck.
"""

from __future__ import annotations

import numpy as np

from keras_ibprune import estimators as est
from keras_ibprune import obs
from keras_ibprune.scores import MagnitudeScore, Score, register_score


def _activation_name(layer):
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else "linear"


class _InformationLogs:
    """``I_TY/<layer>`` (cross-fitted relevance, nats, ≤ H(Y)) and ``I_XT/<layer>`` (the
    noise-floor upper bound on compression) of each layer's per-sample output."""

    log_statistics = ("t_mean",)

    def required_statistics(self, granularity="weight", log=False):
        if granularity == "channel":  # unit scores read the per-sample outputs only
            return ("t_mean",)
        return tuple(self.statistics) + (tuple(self.log_statistics) if log else ())

    def measure(self, stats):
        s = stats.summary
        if "t_mean" not in s or stats.labels is None:
            return None
        t = s["t_mean"]
        name = stats.extra.get("name", stats.wrapper.layer.name)
        ity = est.layer_mi(t, stats.labels, self.estimator, seed=self.seed)
        ixt = est.gaussian_compression(t, self.noise_var, per_unit=False)
        self._logs[f"I_TY/{name}"] = float(ity)
        self._logs[f"I_XT/{name}"] = float(ixt)
        return ity, ixt

    def logs(self):
        return dict(self._logs)

    def reset(self):
        self._logs = {}

    def _unit_scores(self, stats):
        """Unique relevance ``u_j`` minus ``β`` times the unit's share of compression."""
        s = stats.summary
        if "t_mean" not in s or stats.labels is None:
            return MagnitudeScore().unit_scores(stats)
        tm = s["t_mean"]
        rel = est.unit_scores_mi(tm, stats.labels, self.estimator, seed=self.seed)
        comp = est.gaussian_compression(tm, self.noise_var)
        # β weighs compression in units of the layer's typical relevance.
        comp = comp / (np.mean(comp) + 1e-12) * (np.mean(np.abs(rel)) + 1e-12)
        score = rel - self.beta * comp
        var = np.var(tm, axis=0)
        dead = var <= 1e-10 * max(float(var.max()), 1e-30)
        if dead.any() and not dead.all():  # a constant unit carries nothing: rank it last
            score = np.where(dead, score[~dead].min() - 1.0, score)
        return score


@register_score("ib")
class IBScore(_InformationLogs, Score):
    """Information lost per removed weight (nats): Fisher-weighted Optimal Brain Surgeon.

    ``ΔI_ij = ½ F_j w_ij² / [H⁻¹]_ii`` (see the module doc for the derivation and its
    assumptions), one global threshold across layers (allocation ``"global"``), and the
    SparseGPT re-fit of surviving weights. Layers without an input/kernel map (attention,
    RNN, embedding, depthwise, transposed convolutions) use ``½ F_j E[z_j²] w_ij² / Σ_i
    w_ij²``: unit ``j``'s information spread over its weights by their share of energy.

    Channel granularity ranks units by their unique relevance ``u_j = I(T; Y) −
    I(T_{−j}; Y)`` (cross-fitted, `estimators.unique_relevance`) minus ``β`` times their
    noise-floor compression ``I(X; T_j)``.

    Args:
        fisher: `"model"` (labels drawn from the model: label-free Fisher) or
            `"empirical"` (held-out labels).
        damping: λ of ``H + λ mean(diag H) I``.
        diagonal_correction: use the exact diagonal Fisher ``D_ij`` instead of
            ``F_j H_ii`` in the numerator.
        reconstruct: re-fit the surviving weights after each mask update (SparseGPT).
        max_rows: rows (samples × positions) per conv layer for ``H``.
        fisher_samples: held-out samples whose gradients give ``F_j`` (None = all); the
            forward statistics always use the whole held-out batch.
        max_gram_dim: layers with more inputs keep only ``diag H`` (memory ``d_in²``):
            Optimal Brain Damage ``½ F_j w_ij² H_ii`` and no re-fit there.
        estimator: `"gaussian"` or `"binned"`, for logged information and unit scores.
        beta: weight of compression in unit scores.
        noise_var: σ² of the noise floor for ``I(X; T)``.
        seed: seed of the Monte-Carlo labels and of the cross-fitting folds.

    Example:

    ```python
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.95, 0, 4), held_out=(x_val, y_val))
    ```
    """

    needs_labels = True
    default_allocation = "global"

    def __init__(self, fisher="model", damping=0.01, diagonal_correction=False,
                 reconstruct=True, max_rows=4096, fisher_samples=None, max_gram_dim=4096,
                 estimator="gaussian", beta=0.05, noise_var=1e-2, seed=0):
        if fisher not in ("model", "empirical"):
            raise ValueError("`fisher` must be 'model' or 'empirical'. Received: "
                             f"fisher={fisher!r}")
        if not float(damping) > 0.0:
            raise ValueError(f"`damping` must be > 0. Received: damping={damping!r}")
        self.fisher, self.damping = fisher, float(damping)
        self.diagonal_correction, self.reconstruct_weights = bool(diagonal_correction), bool(
            reconstruct)
        self.max_rows, self.seed = int(max_rows), int(seed)
        self.fisher_samples = None if fisher_samples is None else int(fisher_samples)
        self.max_gram_dim = int(max_gram_dim)
        self.estimator = est.check_estimator(estimator)
        self.beta, self.noise_var = float(beta), float(noise_var)
        self._logs = {}

    @property
    def statistics(self):
        return ("x2", "gram", "fisher") + (("fisher_x2",) if self.diagonal_correction else ())

    def get_config(self):
        return {"fisher": self.fisher, "damping": self.damping,
                "diagonal_correction": self.diagonal_correction,
                "reconstruct": self.reconstruct_weights, "max_rows": self.max_rows,
                "fisher_samples": self.fisher_samples, "max_gram_dim": self.max_gram_dim,
                "estimator": self.estimator, "beta": self.beta, "noise_var": self.noise_var,
                "seed": self.seed}

    def _factorization(self, stats):
        s = stats.summary
        if "obs" not in stats.extra:
            if "gram" in s:
                stats.extra["obs"] = obs.Factorization(s["gram"], self.damping)
            elif "x2" in s:  # too many inputs to keep H: its diagonal
                stats.extra["obs"] = obs.Factorization.diagonal(s["x2"], self.damping)
        return stats.extra.get("obs")

    def __call__(self, stats):
        s = stats.summary
        fact = self._factorization(stats)
        if "fisher" not in s:  # no gradients (not the TF backend): label-free OBS
            return OBSScore.__call__(self, stats)
        fisher = s["fisher"]
        out = []
        for j, w in enumerate(stats.weights):
            w = np.asarray(w, np.float64)
            if j == 0 and fact is not None:
                curv = fisher
                if self.diagonal_correction and "fisher_x2" in s:
                    hd = s["x2"].reshape(-1)
                    curv = s["fisher_x2"] / np.maximum(hd, 1e-30)[:, None]
                out.append(obs.saliency(w, fact, curv))
            else:
                out.append(_spread(w, fisher * s["z2"]))
        return out

    def unit_scores(self, stats):
        return self._unit_scores(stats)

    def reconstruct(self, stats, masks):
        if not self.reconstruct_weights:
            return None
        fact = self._factorization(stats)
        if fact is None:
            return None
        new = [np.asarray(w) for w in stats.weights]
        new[0] = obs.reconstruct(new[0], masks[0], fact)
        return new


def _spread(w, unit_info):
    """``½ I_j w_ij² / Σ_i w_ij²``: a unit's information over its weights by energy share."""
    w2 = np.square(w)
    if w2.ndim >= 2 and w2.shape[-1] == np.shape(unit_info)[0]:
        fan = w2.reshape(-1, w2.shape[-1]).sum(axis=0)
        return 0.5 * unit_info * w2 / np.maximum(fan, 1e-30)
    scale = 0.5 * float(np.sum(unit_info))
    return scale * w2 / max(float(np.sum(w2)), 1e-30)


@register_score("obs")
class OBSScore(IBScore):
    """Label-free Optimal Brain Surgeon / SparseGPT baseline: ``½ w_ij² / [H⁻¹]_ii``.

    The increase of the layer's own output error ``E‖Δz‖²`` (not information), with the
    same SparseGPT re-fit; the scale differs between layers, so it allocates with ERK.
    Frantar & Alistarh (2023).
    """

    needs_labels = False
    default_allocation = "erk"

    @property
    def statistics(self):
        return ("x2", "gram")

    def __call__(self, stats):
        fact = self._factorization(stats)
        if fact is None:
            return [np.abs(w) for w in stats.weights]
        return [obs.saliency(w, fact) if j == 0 else np.square(w)
                for j, w in enumerate(stats.weights)]

    def unit_scores(self, stats):
        return MagnitudeScore().unit_scores(stats)


@register_score("gaussian_obd")
class GaussianOBDScore(_InformationLogs, Score):
    """The 0.1 default, kept for ablations: ``½ P κ_j w_ij² E[x_i²]`` (Gaussian channel OBD).

    ``κ_j = ½((Σ_w⁻¹)_jj − (Σ_t⁻¹)_jj)`` is the sensitivity of the Gaussian-channel
    information of the layer's output to noise in unit ``j`` (`estimators.noise_sensitivity`,
    an unbounded upper-bound model), ``E[x_i²]`` Wanda's input energy and ``P`` the number of
    output positions, treated as independent uses. Not label-aware per weight; allocation
    ``"global_erk_floor"`` (a global threshold with half the ERK density as floors), as in
    0.1. No smoothing across updates (0.1 kept an EMA in the callback, lost on restarts).

    Args:
        shrinkage: fixed covariance shrinkage of the Gaussian channel.
        max_rows: rows (samples × positions) per layer for κ.
        estimator, beta, noise_var, seed: as in `IBScore` (logs and unit scores).
    """

    needs_labels = True
    statistics = ("x2", "rows")
    default_allocation = "global_erk_floor"

    def __init__(self, shrinkage=0.05, max_rows=8192, estimator="gaussian", beta=0.05,
                 noise_var=1e-2, seed=0):
        self.shrinkage, self.max_rows = float(shrinkage), int(max_rows)
        self.estimator = est.check_estimator(estimator)
        self.beta, self.noise_var, self.seed = float(beta), float(noise_var), int(seed)
        self._logs = {}

    def get_config(self):
        return {"shrinkage": self.shrinkage, "max_rows": self.max_rows,
                "estimator": self.estimator, "beta": self.beta, "noise_var": self.noise_var,
                "seed": self.seed}

    def __call__(self, stats):
        s = stats.summary
        if "z_rows" not in s or stats.labels is None:
            return [np.abs(w) for w in stats.weights]
        softmax = _activation_name(stats.wrapper.layer) == "softmax"
        t = s["z_rows"] if softmax else s["t_rows"]
        per = len(t) // max(len(stats.labels), 1)
        labels = np.repeat(np.asarray(stats.labels), max(per, 1), axis=0)[: len(t)]
        kappa = est.noise_sensitivity(t, labels, self.shrinkage)
        out = []
        for j, w in enumerate(stats.weights):
            w2 = np.square(np.asarray(w, np.float64))
            if j == 0 and "x2" in s:
                out.append(0.5 * kappa * w2 * s["x2"][..., None] * s["positions"])
            else:
                out.append(_spread(w, kappa * t.var(axis=0)))
        return out

    def unit_scores(self, stats):
        return self._unit_scores(stats)
