"""Information estimators kept for comparison and for the legacy score (numpy only).

The default estimators live in `keras_ibprune.estimators` (the cross-fitted probe bound on
``I(T; Y)`` and the Gaussian compression bound); these are the baselines they are tested
against, and what the ``estimator="binned"`` option and the ``"gaussian_obd"`` ablation
score use. They stay reachable as ``keras_ibprune.estimators.<name>``.

- `binned_mi` / `binned_layer_mi`: plug-in ``I(T; Y)`` on equal-frequency bins with the
  Miller–Madow bias correction (nats; saturates at ``log(#classes)`` on noise when bins are
  many, so prefer the probe bound).
- `hsic`: the normalized Hilbert–Schmidt independence criterion with RBF kernels, a
  dependence measure in [0, 1] — **not** an information value in nats.
- `pairwise_mi`: Gaussian unit-pair information ``−½ log(1 − ρ²)`` (redundancy).
- `noise_sensitivity`: the Gaussian-channel sensitivity of the 0.1 score (an unbounded
  upper-bound channel; ablation only).
"""

from __future__ import annotations

import numpy as np

from keras_ibprune.estimators import (
    _as_2d,
    _finite,
    _precision,
    _standardize,
    entropy,
    label_kind,
)


def pairwise_mi(t):
    """Gaussian unit-pair information ``I(T_i; T_j) = −½ log(1 − ρ_ij²)``, `(d, d)` nats.

    Exact for jointly Gaussian pairs; a redundancy diagnostic (duplicated units have large
    values). The diagonal is 0; constant units get 0.
    """
    z, kept = _standardize(t)
    d = kept.size
    out = np.zeros((d, d))
    if z.shape[1]:
        rho = np.clip(z.T @ z / len(z), -1.0 + 1e-12, 1.0 - 1e-12)
        sub = -0.5 * np.log1p(-(rho**2))
        np.fill_diagonal(sub, 0.0)
        out[np.ix_(kept, kept)] = sub
    return out


# -------------------------------------------------------------- binned (plug-in) MI
def _quantile_codes(t, bins):
    """Equal-frequency bin codes per column (invariant to monotone rescaling)."""
    t = _as_2d(t)
    ranks = np.argsort(np.argsort(t, axis=0, kind="stable"), axis=0, kind="stable")
    codes = (ranks * bins) // max(len(t), 1)
    for j in range(t.shape[1]):  # ties share a code: the code of their first rank
        col = t[:, j]
        _, first = np.unique(col, return_inverse=True)
        lowest = np.full(first.max() + 1 if first.size else 0, np.iinfo(np.int64).max)
        np.minimum.at(lowest, first, codes[:, j])
        codes[:, j] = lowest[first]
    return codes


def _plugin_mi(a, b):
    """Plug-in MI of two code vectors minus the Miller–Madow bias ``(A−1)(B−1)/(2n)``."""
    from sklearn.metrics import mutual_info_score

    n = len(a)
    if n == 0:
        return 0.0
    mi = mutual_info_score(a, b)
    bias = (len(np.unique(a)) - 1) * (len(np.unique(b)) - 1) / (2.0 * n)
    return max(mi - bias, 0.0)


def _discrete_labels(y, bins):
    kind, lab = label_kind(y)
    if kind == "continuous":
        lab = _quantile_codes(lab[:, :1], bins)[:, 0]
    return lab


def binned_mi(t, y, bins=16):
    """Per-unit plug-in ``I(T_j; Y)`` with equal-frequency bins, Miller–Madow corrected.

    Bounded by the plug-in ``min(H(T_j), H(Y))``; ≈ 0 on noise (the bias correction
    removes the ``(bins−1)(classes−1)/(2n)`` that plug-in estimates add). Continuous `y`
    is binned the same way (its first column).
    """
    codes = _quantile_codes(t, bins)
    lab = _discrete_labels(y, bins)
    return np.array([_plugin_mi(codes[:, j], lab) for j in range(codes.shape[1])])


def binned_layer_mi(t, y, bins=16):
    """Plug-in ``I(T; Y)`` over joint bin patterns of the layer, Miller–Madow corrected.

    With many units nearly every sample has its own pattern and the plug-in value
    saturates at ``H(Y)`` whatever ``T`` is (Saxe et al., 2018); the correction then
    brings it to ≈ 0. Use it for narrow layers only; `relevance` is the default.
    """
    codes = _quantile_codes(t, bins)
    _, joint = np.unique(codes, axis=0, return_inverse=True)
    lab = _discrete_labels(y, bins)
    return float(min(_plugin_mi(joint.reshape(-1), lab), entropy(lab)))


# ----------------------------------------------------------------------------- HSIC
def _rbf_gram(a):
    sq = np.sum(a * a, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
    off = d2[np.triu_indices(len(a), 1)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    return np.exp(-d2 / med)


def hsic(t, y, max_samples=512, seed=0):
    """Normalized HSIC with RBF kernels (median-heuristic bandwidth), in [0, 1]; *not* nats.

        HSIC(K, L) = tr(K H L H) / (n − 1)²,   H = I − 11ᵀ/n
        nHSIC = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

    A dependence measure (Gretton et al., 2005), not an information quantity. Class labels
    use the delta kernel. At most `max_samples` samples (a fixed random subset).
    """
    t = _as_2d(t)
    kind, lab = label_kind(y)
    n = t.shape[0]
    if n > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        t, lab = t[idx], lab[idx]
        n = max_samples
    if n < 2:
        return 0.0
    k = _rbf_gram(t)
    ell = ((lab[:, None] == lab[None, :]).astype(np.float64) if kind == "classes"
           else _rbf_gram(lab))
    h = np.eye(n) - 1.0 / n
    kc, lc = h @ k @ h, h @ ell @ h
    kl, kk, ll = np.sum(kc * lc), np.sum(kc * kc), np.sum(lc * lc)
    if kk <= 1e-12 or ll <= 1e-12:
        return 0.0
    return float(np.clip(kl / np.sqrt(kk * ll), 0.0, 1.0))


# ------------------------------------------- Gaussian channel (legacy "gaussian_obd")
def _shrink(c, shrinkage):
    d = c.shape[0]
    mu = max(float(np.trace(c)) / max(d, 1), 0.0)
    out = (1.0 - shrinkage) * c
    out[np.diag_indices(d)] += shrinkage * mu + 1e-6 * mu + 1e-12
    return out


def noise_sensitivity(t, y, shrinkage=0.05):
    """Legacy Gaussian-channel sensitivity ``κ_j = ½((Σ_w⁻¹)_jj − (Σ_t⁻¹)_jj)``, `(d,)`.

    The derivative ``−∂I/∂δ`` of the Gaussian-channel information
    ``½ log det Σ_t − ½ log det Σ_w`` (shared within-class covariance ``Σ_w``, fixed
    shrinkage towards the mean variance) with respect to noise of variance δ added to
    unit ``j``. That channel information is an *upper* bound that grows without limit
    when ``n ≈ d`` and is not scale-invariant; it is kept only for the ``"gaussian_obd"``
    ablation score. Use `relevance` / `unique_relevance` for information values.
    """
    t = _as_2d(t)
    n = max(t.shape[0], 1)
    tc = t - t.mean(axis=0)
    kind, lab = label_kind(y)
    if kind == "classes":
        _, inv = np.unique(lab, return_inverse=True)
        k = int(inv.max()) + 1 if inv.size else 1
        counts = np.bincount(inv, minlength=k).astype(np.float64)
        means = np.zeros((k, t.shape[1]))
        np.add.at(means, inv, tc)
        means /= np.maximum(counts, 1.0)[:, None]
        sigma_b = (means * counts[:, None]).T @ means / n
    else:
        yc = lab - lab.mean(axis=0)
        syy = _shrink(yc.T @ yc / n, 1e-3)
        sty = tc.T @ yc / n
        sigma_b = sty @ np.linalg.solve(syy, sty.T)
    sigma_w = _shrink(tc.T @ tc / n - sigma_b, shrinkage)
    sigma_t = 0.5 * (sigma_b + sigma_b.T) + sigma_w
    kappa = 0.5 * (np.diag(_precision(sigma_w)) - np.diag(_precision(sigma_t)))
    return np.maximum(_finite(kappa), 0.0)
