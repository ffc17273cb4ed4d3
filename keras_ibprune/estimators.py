"""Information estimators: numpy math on samples (no Keras, no TensorFlow).

Every estimator takes samples ``t`` of shape ``(n, d)`` (rows = samples) and, where a
label is involved, ``y`` as ``(n,)`` integer classes, ``(n, k)`` one-hot / probability rows
(classes by argmax) or ``(n,)`` / ``(n, k)`` float targets (see `label_kind`). All
information values are in **nats**, deterministic for a fixed ``seed``, finite for any
input (non-finite entries become 0) and scale-invariant per unit (units are standardized
first; constant units carry nothing).

Relevance ``I(T; Y)`` — a cross-fitted variational lower bound (Barber & Agakov, 2003; Xu
et al., 2020, "usable information"):

    I(T; Y) = H(Y) − H(Y | T)  ≥  H(Y) − CE(q),   CE(q) = E[−log q(y | t)]

for any probe ``q``. The probe is fitted on one half of the samples and its cross-entropy
measured on the other half (and vice versa), so overfitting makes the estimate *smaller*,
never larger: on pure noise it is ≈ 0 even when ``n ≈ d``. It is clipped to
``[0, Ĥ(Y)]`` (classes), so it can never exceed the label entropy.

- classes: ``q`` is the posterior of a Gaussian mixture with a shared covariance (linear
  discriminant analysis), ``t | y=c ~ N(μ_c, Σ_w)``; ``Σ_w`` is shrunk with the
  Oracle-Approximating-Shrinkage estimator (OAS, Chen et al., 2010) on standardized units.
  Exact in the limit when the data are such a mixture.
- continuous targets: ``q`` is the linear-Gaussian regression of ``y`` on ``t`` (OAS-shrunk
  ``Σ_t``), ``Î = ½ log det Σ_y − ½ log det Σ_res``; exact for jointly Gaussian
  ``(T, Y)``: ``−½ log(1 − ρ²)`` for one correlated pair.

`unique_relevance` gives every unit's ``I(T; Y) − I(T_{−j}; Y)`` from the same probe (the
probe without unit ``j`` is a rank-one update of the precision matrix).

Compression ``I(X; T)`` of a deterministic layer is infinite for continuous ``X``; with a
Gaussian noise floor ``T + ε``, ``ε ~ N(0, σ² I)``, the Gaussian with the same covariance
maximizes entropy, so ``½ log det(I + Σ_t / σ²)`` is an **upper bound** on
``I(X; T + ε)`` (`gaussian_compression`; Kolchinsky et al., 2019).

The baselines — binned plug-in estimators with the Miller–Madow correction (`binned_mi`),
the normalized HSIC dependence measure (`hsic`, in [0, 1], *not* nats), Gaussian pairwise
information (`pairwise_mi`) and the legacy ``"gaussian_obd"`` sensitivity
(`noise_sensitivity`) — live in `keras_ibprune.baseline_estimators` and stay reachable
here under the same names.

Example:

```python
rng = np.random.default_rng(0)
y = rng.integers(0, 2, 1000)
t = np.c_[y + rng.normal(size=1000), rng.normal(size=1000)]   # unit 0 informative
relevance(t, y)             # ~0.2 nats, <= H(Y) = log 2
unique_relevance(t, y)      # unit 0 >> unit 1 (~0)
```
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

ESTIMATORS = ("gaussian", "binned")


# ------------------------------------------------------------------------ basics
def _finite(a, dtype=np.float64):
    a = np.asarray(a, dtype=dtype)
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return a


def _as_2d(t):
    t = _finite(t)
    if t.ndim == 1:
        t = t[:, None]
    return t.reshape(t.shape[0], -1)


def label_kind(y):
    """Returns `("classes", int labels)` or `("continuous", float (n, k) targets)`.

    Integer/bool arrays are classes; 2-D non-negative float arrays whose rows sum to 1
    (one-hot or probabilities) are classes by argmax; other floats are continuous.
    """
    y = np.asarray(y)
    if y.dtype.kind in "iub":
        return "classes", y.reshape(-1).astype(np.int64)
    y = _finite(y)
    if y.ndim == 2 and y.shape[1] > 1 and np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0):
        return "classes", np.argmax(y, axis=1).astype(np.int64)
    return "continuous", y.reshape(len(y), -1)


def entropy(y):
    """Plug-in entropy ``H(Y) = −Σ p̂_c log p̂_c`` of class labels (nats)."""
    _, counts = np.unique(np.asarray(y).reshape(-1), return_counts=True)
    p = counts / max(counts.sum(), 1)
    return float(-np.sum(p * np.log(p)))


def _standardize(t):
    """Units scaled to mean 0, variance 1; constant units dropped. Returns `(z, kept)`."""
    t = _as_2d(t)
    sd = t.std(axis=0)
    kept = sd > 1e-12 * max(float(np.max(np.abs(t), initial=0.0)), 1e-300)
    z = (t[:, kept] - t[:, kept].mean(axis=0)) / sd[kept]
    return z, kept


def _folds(lab, seed, n_folds=2):
    """Deterministic stratified folds: a seeded permutation within every class."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(lab), dtype=np.int64)
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % n_folds
    return fold


def _oas(resid):
    """OAS-shrunk covariance of already-centred residuals (scikit-learn), made definite."""
    from sklearn.covariance import oas

    d = resid.shape[1]
    if resid.shape[0] < 2:
        return np.eye(d)
    cov, _ = oas(resid, assume_centered=True)
    cov[np.diag_indices(d)] += 1e-6 * max(float(np.trace(cov)) / d, 1e-12)
    return cov


def _precision(cov):
    """Inverse of a symmetric positive-definite matrix via Cholesky (scipy LAPACK)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    try:
        return cho_solve(cho_factor(cov, lower=True), np.eye(len(cov)))
    except (LinAlgError, ValueError):  # indefinite from round-off: clip the spectrum
        w, v = np.linalg.eigh(_finite(0.5 * (cov + cov.T)))
        w = np.maximum(w, 1e-12 * max(float(np.abs(w).max(initial=0.0)), 1e-300))
        return (v / w) @ v.T


# ---------------------------------------------------------- relevance I(T; Y), classes
def _lda_fit(z, lab, classes):
    k = len(classes)
    onehot = (lab[:, None] == classes[None, :]).astype(np.float64)
    counts = onehot.sum(axis=0)
    means = (onehot.T @ z) / np.maximum(counts, 1.0)[:, None]
    prec = _precision(_oas(z - means[np.searchsorted(classes, lab)]))
    log_prior = np.log((counts + 1.0) / (counts.sum() + k))  # Laplace: absent classes live
    return means, prec, log_prior


def _lda_terms(z_fit, lab_fit, z_eval, classes):
    means, prec, log_prior = _lda_fit(z_fit, lab_fit, classes)
    a = means @ prec  # (k, d): a_c = P μ_c
    b = z_eval @ prec  # (m, d): P t
    logits = b @ means.T - 0.5 * np.sum(a * means, axis=1) + log_prior
    return logits, a, b, np.diag(prec)


def _ce(logits, idx):
    return logsumexp(logits, axis=1) - logits[np.arange(len(idx)), idx]


def _class_relevance(t, lab, seed, per_unit, chunk=64):
    z, kept = _standardize(t)
    classes, idx = np.unique(lab, return_inverse=True)
    h = entropy(lab)
    unique = np.zeros(kept.size)
    if z.shape[1] == 0 or len(classes) < 2:
        return 0.0, unique
    fold = _folds(idx, seed)
    ce = np.zeros(len(idx))
    ce_drop = np.zeros((len(idx), z.shape[1])) if per_unit else None
    for f in (0, 1):
        fit, ev = fold != f, fold == f
        if not ev.any() or not fit.any():
            continue
        logits, a, b, pdiag = _lda_terms(z[fit], idx[fit], z[ev], np.arange(len(classes)))
        ce[ev] = _ce(logits, idx[ev])
        if per_unit:  # probe without unit j: P_{-j} = P − P e_j e_jᵀ P / P_jj
            for j0 in range(0, z.shape[1], chunk):
                j1 = min(j0 + chunk, z.shape[1])
                aj, bj, pj = a[:, j0:j1], b[:, j0:j1], pdiag[j0:j1]
                delta = (bj[:, None, :] * aj[None] - 0.5 * aj[None] ** 2) / pj  # (m, k, J)
                lj = logits[:, :, None] - delta
                ce_drop[ev, j0:j1] = (logsumexp(lj, axis=1)
                                      - lj[np.arange(lj.shape[0]), idx[ev]])
    info = float(np.clip(h - ce.mean(), 0.0, h))
    if per_unit:  # difference of cross-entropies: meaningful even where info clips at 0
        unique[kept] = ce_drop.mean(axis=0) - ce.mean()
    return info, unique


# ------------------------------------------------------- relevance I(T; Y), continuous
def _regression_relevance(t, y, seed, per_unit):
    z, kept = _standardize(t)
    yz, _ = _standardize(y)
    unique = np.zeros(kept.size)
    if z.shape[1] == 0 or yz.shape[1] == 0:
        return 0.0, unique
    fold = _folds(np.zeros(len(z), np.int64), seed)
    resid = np.zeros_like(yz)
    resid_drop = np.zeros((z.shape[1],) + yz.shape) if per_unit else None
    for f in (0, 1):
        fit, ev = fold != f, fold == f
        zf, yf = z[fit], yz[fit]
        mz, my = zf.mean(axis=0), yf.mean(axis=0)
        prec = _precision(_oas(zf - mz))
        coef = prec @ ((zf - mz).T @ (yf - my) / len(zf))  # (d, k)
        ze = z[ev] - mz
        pred = ze @ coef
        resid[ev] = yz[ev] - my - pred
        if per_unit:
            pz = ze @ prec  # (m, d)
            pdiag = np.diag(prec)
            for j in range(z.shape[1]):  # coef_{-j} = coef − P e_j (e_jᵀ coef) / P_jj
                pred_j = pred - np.outer(pz[:, j], coef[j]) / pdiag[j]
                resid_drop[j, ev] = yz[ev] - my - pred_j
    corr = np.corrcoef(yz, rowvar=False).reshape(yz.shape[1], yz.shape[1])

    def info_of(r):
        _, ld_res = np.linalg.slogdet(r.T @ r / len(r) + 1e-12 * np.eye(r.shape[1]))
        _, ld_y = np.linalg.slogdet(corr + 1e-12 * np.eye(len(corr)))
        return max(0.5 * (ld_y - ld_res), 0.0)

    info = info_of(resid)
    if per_unit:
        unique[kept] = info - np.array([info_of(r) for r in resid_drop])
    return float(info), unique


def relevance(t, y, seed=0):
    """Layer relevance ``I(T; Y)`` in nats: cross-fitted probe bound (see module doc).

    Classes: in ``[0, Ĥ(Y)]``; ≈ 0 for noise whatever ``n / d``; invariant to rescaling
    any unit. Continuous ``y``: the linear-Gaussian bound (exact for jointly Gaussian).

    Args:
        t: `(n, d)` samples of the layer.
        y: labels or targets (see `label_kind`).
        seed: seed of the stratified two-fold split.
    """
    kind, lab = label_kind(y)
    if kind == "classes":
        return _class_relevance(t, lab, seed, per_unit=False)[0]
    return _regression_relevance(t, lab, seed, per_unit=False)[0]


def unique_relevance(t, y, seed=0):
    """Unique relevance ``u_j = I(T; Y) − I(T_{−j}; Y)`` of every unit, `(d,)` nats.

    Both terms use the same cross-fitted probe; the probe without unit ``j`` shares the
    fitted means and covariance (``Σ⁻¹`` of the other units is the rank-one downdate
    ``P − P e_j e_jᵀ P / P_jj``), so all ``d`` values cost about one extra evaluation.
    Two copies of one informative unit both get ``u ≈ 0`` (each is redundant given the
    other). Values can be slightly negative: removing a noise unit can make the probe
    generalize better. Constant units get 0.
    """
    kind, lab = label_kind(y)
    if kind == "classes":
        return _class_relevance(t, lab, seed, per_unit=True)[1]
    return _regression_relevance(t, lab, seed, per_unit=True)[1]


def unit_relevance(t, y, seed=0):
    """Marginal relevance ``I(T_j; Y)`` of every unit alone, `(d,)` nats (same probe)."""
    t = _as_2d(t)
    return np.array([relevance(t[:, j : j + 1], y, seed) for j in range(t.shape[1])])


# ---------------------------------------------------------------- compression I(X; T)
def gaussian_compression(t, noise_var=1e-2, per_unit=True):
    """Upper bound on the compression ``I(X; T + ε)`` of a layer with a noise floor.

    ``ε ~ N(0, σ² I)``; a Gaussian of the same covariance maximizes entropy, hence

        per unit:  I(X; T_j + ε_j) ≤ ½ log(1 + var(T_j) / σ²)
        layer:     I(X; T + ε)     ≤ ½ log det(I + Σ_t / σ²)

    Unlike the relevance, this depends on the scale of ``t`` through ``σ²`` by design (the
    noise floor is an absolute resolution).

    Args:
        t: `(n, d)` samples.
        noise_var: σ², in the units of `t`.
        per_unit: return the `(d,)` per-unit values, else the layer scalar.
    """
    t = _as_2d(t)
    s2 = max(float(noise_var), 1e-12)
    if per_unit:
        return np.maximum(0.5 * np.log1p(t.var(axis=0) / s2), 0.0)
    tc = t - t.mean(axis=0)
    c = tc.T @ tc / (max(len(t), 1) * s2)
    c[np.diag_indices(len(c))] += 1.0
    sign, logdet = np.linalg.slogdet(c)
    return float(max(0.5 * logdet, 0.0)) if sign > 0 else 0.0
# ------------------------------------------------------------------ estimator choice
def check_estimator(name):
    """Validates an information estimator name (`"gaussian"` or `"binned"`)."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator. Expected one of {ESTIMATORS} (information in nats; HSIC "
            f"is a dependence measure: use `estimators.hsic`). Received: estimator={name!r}"
        )
    return name


def layer_mi(t, y, estimator="gaussian", seed=0):
    """Layer ``I(T; Y)`` (nats): `relevance` or `binned_layer_mi`."""
    check_estimator(estimator)
    if estimator == "gaussian":
        return relevance(t, y, seed)
    from keras_ibprune.baseline_estimators import binned_layer_mi

    return binned_layer_mi(t, y)


def unit_scores_mi(t, y, estimator="gaussian", seed=0):
    """Per-unit relevance used to rank units: unique (gaussian) or marginal binned."""
    check_estimator(estimator)
    if estimator == "gaussian":
        return unique_relevance(t, y, seed)
    from keras_ibprune.baseline_estimators import binned_mi

    return binned_mi(t, y)


_BASELINES = ("binned_mi", "binned_layer_mi", "hsic", "pairwise_mi", "noise_sensitivity")


def __getattr__(name):
    """`estimators.binned_mi` & co. live in `baseline_estimators` (imported on use)."""
    if name in _BASELINES:
        from keras_ibprune import baseline_estimators

        return getattr(baseline_estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

