"""Information estimators: pure numpy math on sample arrays (no Keras, no TensorFlow).

Every estimator takes samples ``t`` of shape ``(n, d)`` (rows = samples) and, where a
label is involved, ``y`` as ``(n,)`` integer classes or ``(n,)`` / ``(n, k)`` float
targets (see `label_kind`). All quantities are in **nats**. The estimators are
deterministic (a fixed ``seed`` wherever samples are subsampled), regularized, and finite
for any input: non-finite entries are replaced by 0, constant or duplicated columns are
handled by covariance shrinkage, and outputs are clipped to be finite and >= 0.

Families:

- **Gaussian** (`gaussian_mi`, `unit_relevance`, `unique_relevance`, `noise_sensitivity`,
  `gaussian_compression`, `pairwise_mi`): ``T`` given ``Y`` is modelled as Gaussian with a
  shared within-class covariance ``Σ_w`` (continuous ``Y``: jointly Gaussian ``(T, Y)``,
  ``Σ_w = Cov(T | Y)``, the residual covariance of the linear regression of ``T`` on ``Y``).
  Then ``I(T; Y) = ½ log det Σ_t − ½ log det Σ_w``. For classes this is the mutual
  information of the Gaussian channel with the same first and second moments, the
  standard closed form used for linear-discriminant information (it is exact for
  jointly Gaussian ``(T, Y)``).
- **Binned** (`binned_entropy`, `binned_mi`, `binned_layer_entropy`): equal-width
  histograms, ``H = −Σ p log p`` and plug-in ``I(T; Y) = H(T) − H(T | Y)`` (Shwartz-Ziv &
  Tishby, 2017; see Saxe et al., 2018 on how binning drives compression estimates).
- **HSIC** (`hsic`): normalized Hilbert-Schmidt independence criterion with RBF kernels
  (Gretton et al., 2005; used as an IB surrogate by Ma et al., 2020).

Shrinkage: every covariance ``Σ`` becomes ``(1 − λ) Σ + λ (tr Σ / d) I + ε I`` with
``ε = 1e-6 · tr Σ / d + 1e-12``. The total covariance is rebuilt as ``Σ_t = Σ_b + Σ_w``
from the shrunk within-class part, so ``Σ_t ⪰ Σ_w`` and every information is >= 0.

Example:

```python
t = np.random.default_rng(0).normal(size=(500, 3))
y = (t[:, 0] > 0).astype(int)
unique_relevance(t, y)        # unit 0 high, units 1-2 ~0
```
"""

from __future__ import annotations

import numpy as np

DEFAULT_SHRINKAGE = 0.05


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


def _shrink(c, shrinkage):
    d = c.shape[0]
    mu = max(float(np.trace(c)) / max(d, 1), 0.0)
    out = (1.0 - shrinkage) * c
    out[np.diag_indices(d)] += shrinkage * mu + 1e-6 * mu + 1e-12
    return out


def covariances(t, y, shrinkage=DEFAULT_SHRINKAGE):
    """Shrunk total and within-class (conditional) covariances of `t` given `y`.

    Classes: ``Σ_w = (1/n) Σ_c Σ_{i∈c} (t_i − μ_c)(t_i − μ_c)ᵀ``; continuous ``y``:
    ``Σ_w = Σ_t − Σ_ty Σ_y⁻¹ Σ_yt``. ``Σ_b = Σ_t − Σ_w`` (PSD) is kept and
    ``Σ_t := Σ_b + shrink(Σ_w)``.

    Args:
        t: `(n, d)` samples.
        y: labels (see `label_kind`).
        shrinkage: λ in [0, 1].

    Returns:
        `(sigma_t, sigma_w)`, two `(d, d)` float64 arrays.
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
    sigma_tot = tc.T @ tc / n
    sigma_w = _shrink(sigma_tot - sigma_b, shrinkage)
    sigma_b = 0.5 * (sigma_b + sigma_b.T)
    return sigma_b + sigma_w, sigma_w


def _logdet(c):
    return _chol(c, inverse=False)[0]


def _chol(c, inverse=True):
    """`(log det c, diag(c⁻¹))` of a symmetric positive-definite matrix via Cholesky."""
    try:
        low = np.linalg.cholesky(c)
    except np.linalg.LinAlgError:  # pragma: no cover - shrinkage keeps c definite
        w, v = np.linalg.eigh(c)
        w = np.maximum(w, 1e-300)
        return float(np.sum(np.log(w))), (v**2) @ (1.0 / w) if inverse else None
    logdet = 2.0 * float(np.sum(np.log(np.diag(low))))
    if not inverse:
        return logdet, None
    try:  # LAPACK potri: the inverse from the Cholesky factor (scipy ships with sklearn)
        from scipy.linalg import lapack

        inv, info = lapack.dpotri(low, lower=1)
        if info == 0:
            return logdet, np.diag(inv).copy()
    except ImportError:  # pragma: no cover
        pass
    linv = np.linalg.inv(low)
    return logdet, np.sum(linv * linv, axis=0)


def gaussian_layer(t, y, shrinkage=DEFAULT_SHRINKAGE, cov=None):
    """All Gaussian relevance quantities of a layer from one pair of factorizations.

    Returns:
        dict with `mi` (``I(T; Y)``), `unique` (``u_j``, see `unique_relevance`) and
        `kappa` (``κ_j``, see `noise_sensitivity`), all finite and >= 0.
    """
    st, sw = cov if cov is not None else covariances(t, y, shrinkage)
    ld_t, it = _chol(st)
    ld_w, iw = _chol(sw)
    return {
        "mi": float(_clean_out(0.5 * (ld_t - ld_w))),
        "unique": _clean_out(0.5 * np.log(iw / it)),
        "kappa": _clean_out(0.5 * (iw - it)),
    }


def _clean_out(v):
    return np.maximum(_finite(v), 0.0)


def gaussian_mi(t, y, shrinkage=DEFAULT_SHRINKAGE):
    """Layer relevance ``I(T; Y) = ½ (log det Σ_t − log det Σ_w)`` in nats (scalar)."""
    st, sw = covariances(t, y, shrinkage)
    return float(_clean_out(0.5 * (_logdet(st) - _logdet(sw))))


def unit_relevance(t, y, shrinkage=DEFAULT_SHRINKAGE):
    """Marginal relevance of every unit, ``I(T_j; Y) = ½ log(Σ_t,jj / Σ_w,jj)``, `(d,)`."""
    st, sw = covariances(t, y, shrinkage)
    return _clean_out(0.5 * np.log(np.diag(st) / np.diag(sw)))


def unique_relevance(t, y, shrinkage=DEFAULT_SHRINKAGE, cov=None):
    """Unique relevance ``u_j = I(T; Y) − I(T_{−j}; Y)`` for all units at once, `(d,)`.

    Closed form under the Gaussian model (``det Σ / det Σ_{−j} = 1 / (Σ⁻¹)_jj``):

        u_j = ½ log( (Σ_w⁻¹)_jj / (Σ_t⁻¹)_jj ).

    Two copies of one informative unit both get ``u ≈ 0``: each is redundant given the
    other. `cov` takes precomputed `(sigma_t, sigma_w)`.
    """
    return gaussian_layer(t, y, shrinkage, cov)["unique"]


def noise_sensitivity(t, y, shrinkage=DEFAULT_SHRINKAGE, cov=None):
    """Label information lost per unit of noise variance added to unit j, `(d,)`.

    Adding independent noise of variance δ to ``T_j`` changes both covariances by
    ``δ e_j e_jᵀ``; since ``∂ log det Σ / ∂Σ_jj = (Σ⁻¹)_jj``,

        −∂I(T; Y)/∂δ = κ_j = ½ ((Σ_w⁻¹)_jj − (Σ_t⁻¹)_jj) >= 0   [nats / variance].

    Like `unique_relevance` it is joint (a redundant copy makes the unit robust).
    """
    return gaussian_layer(t, y, shrinkage, cov)["kappa"]


def gaussian_compression(t, noise_var=1e-2, per_unit=True):
    """Compression ``I(X; T)`` of a deterministic layer with a Gaussian noise floor.

    A deterministic map has infinite ``I(X; T)`` for continuous ``X``; as in Saxe et al.
    (2018) and Kolchinsky et al. (2019) we measure ``T + ε``, ``ε ~ N(0, σ² I)``:

        per unit:  I(X; T_j) = ½ log(1 + var(T_j) / σ²)
        layer:     I(X; T)   = ½ log det(I + Σ_t / σ²)

    Args:
        t: `(n, d)` samples.
        noise_var: σ², in the units of `t`.
        per_unit: return the `(d,)` per-unit values, else the layer scalar.
    """
    t = _as_2d(t)
    s2 = max(float(noise_var), 1e-12)
    if per_unit:
        return _clean_out(0.5 * np.log1p(t.var(axis=0) / s2))
    tc = t - t.mean(axis=0)
    c = tc.T @ tc / (max(len(t), 1) * s2)
    c[np.diag_indices(len(c))] += 1.0
    return float(_clean_out(0.5 * _logdet(c)))


def pairwise_mi(t, shrinkage=DEFAULT_SHRINKAGE):
    """Gaussian unit-pair information ``I(T_i; T_j) = −½ log(1 − ρ_ij²)``, `(d, d)`.

    A redundancy diagnostic: duplicated units have large pairwise information. The
    diagonal is set to 0.
    """
    t = _as_2d(t)
    tc = t - t.mean(axis=0)
    c = _shrink(tc.T @ tc / max(len(t), 1), shrinkage)
    s = np.sqrt(np.diag(c))
    rho = np.clip(c / np.outer(s, s), -1.0 + 1e-12, 1.0 - 1e-12)
    out = -0.5 * np.log1p(-(rho**2))
    np.fill_diagonal(out, 0.0)
    return _clean_out(out)


# ------------------------------------------------------------------ binned estimators
def _bin(t, bins):
    t = _as_2d(t)
    lo, hi = t.min(axis=0), t.max(axis=0)
    width = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(((t - lo) / width * bins).astype(np.int64), 0, bins - 1)


def _entropy_of_codes(codes):
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def binned_entropy(t, bins=30):
    """Per-column histogram entropy ``H(T_j) = −Σ_b p_b log p_b`` (nats), `(d,)`.

    Equal-width bins between each column's min and max; a constant column has ``H = 0``.
    """
    codes = _bin(t, bins)
    return np.array([_entropy_of_codes(codes[:, j]) for j in range(codes.shape[1])])


def binned_layer_entropy(t, bins=30):
    """Entropy of the binned layer vector ``H(T)`` (each distinct bin pattern a symbol).

    For a deterministic network this is the binned ``I(X; T)`` (Shwartz-Ziv & Tishby, 2017).
    """
    codes = _bin(t, bins)
    _, inv = np.unique(codes, axis=0, return_inverse=True)
    return _entropy_of_codes(inv.reshape(-1))


def binned_mi(t, y, bins=30):
    """Plug-in ``I(T_j; Y) = H(T_j) − Σ_c p(c) H(T_j | Y=c)`` per column, `(d,)`.

    Continuous `y` is binned with the same number of bins (its first column).
    """
    codes = _bin(t, bins)
    kind, lab = label_kind(y)
    if kind == "continuous":
        lab = _bin(lab[:, :1], bins)[:, 0]
    h = np.array([_entropy_of_codes(codes[:, j]) for j in range(codes.shape[1])])
    cond = np.zeros_like(h)
    for c in np.unique(lab):
        sel = codes[lab == c]
        cond += len(sel) / len(lab) * np.array(
            [_entropy_of_codes(sel[:, j]) for j in range(sel.shape[1])]
        )
    return _clean_out(h - cond)


# --------------------------------------------------------------------------- HSIC
def _rbf_gram(a):
    sq = np.sum(a * a, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
    off = d2[np.triu_indices(len(a), 1)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    return np.exp(-d2 / med)


def hsic(t, y, max_samples=512, seed=0):
    """Normalized HSIC with RBF kernels (median-heuristic bandwidth), in [0, 1].

        HSIC(K, L) = tr(K H L H) / (n − 1)²,   H = I − 11ᵀ/n
        nHSIC = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

    Class labels use the delta kernel ``L_ab = [y_a = y_b]``. At most `max_samples`
    samples (a fixed random subset). A constant `t` or `y` gives 0.
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
    if kind == "classes":
        ell = (lab[:, None] == lab[None, :]).astype(np.float64)
    else:
        ell = _rbf_gram(lab)
    h = np.eye(n) - 1.0 / n
    kc, lc = h @ k @ h, h @ ell @ h
    kl, kk, ll = np.sum(kc * lc), np.sum(kc * kc), np.sum(lc * lc)
    if kk <= 1e-12 or ll <= 1e-12:
        return 0.0
    return float(np.clip(kl / np.sqrt(kk * ll), 0.0, 1.0))


ESTIMATORS = ("gaussian", "binned", "hsic")


def check_estimator(name):
    """Validates an estimator name (`"gaussian"`, `"binned"`, `"hsic"`)."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator. Expected one of {ESTIMATORS}. Received: estimator={name!r}"
        )
    return name


def unit_mi(t, y, estimator="gaussian", bins=30, shrinkage=DEFAULT_SHRINKAGE):
    """Per-unit ``I(T_j; Y)`` with the chosen estimator (HSIC: per-unit nHSIC)."""
    check_estimator(estimator)
    if estimator == "gaussian":
        return unit_relevance(t, y, shrinkage)
    if estimator == "binned":
        return binned_mi(t, y, bins)
    t = _as_2d(t)
    return np.array([hsic(t[:, j : j + 1], y, max_samples=256) for j in range(t.shape[1])])


def layer_mi(t, y, estimator="gaussian", bins=30, shrinkage=DEFAULT_SHRINKAGE):
    """Layer ``I(T; Y)`` with the chosen estimator (binned: joint-code plug-in)."""
    check_estimator(estimator)
    if estimator == "gaussian":
        return gaussian_mi(t, y, shrinkage)
    if estimator == "hsic":
        return hsic(t, y)
    codes = _bin(t, bins)
    _, inv = np.unique(codes, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    kind, lab = label_kind(y)
    if kind == "continuous":
        lab = _bin(lab[:, :1], bins)[:, 0]
    cond = sum(
        np.mean(lab == c) * _entropy_of_codes(inv[lab == c]) for c in np.unique(lab)
    )
    return float(max(_entropy_of_codes(inv) - cond, 0.0))
