"""Optimal Brain Surgeon on one layer: saliencies and the reconstruction of survivors.

A Dense or convolution layer computes ``z_j = Σ_i w_ij x_i`` over input rows ``x``
(im2col rows for a convolution). Changing the weights of output unit ``j`` by ``δw_j``
changes the layer's contribution to a quadratic loss by ``½ c_j δw_jᵀ H δw_j`` with
``H = E[x xᵀ]`` and a per-unit curvature ``c_j`` (the Fisher information ``F_j`` for the
``"ib"`` score; 1 for the plain ``"obs"`` score, i.e. the layer's output error). Removing
``w_ij`` and re-fitting the other weights of unit ``j`` optimally costs (Hassibi & Stork,
1993)

    L_ij = ½ c_j w_ij² / [H⁻¹]_ii

and the optimal update of the others is ``δw_j = −(w_ij / [H⁻¹]_ii) H⁻¹ e_i``. Many weights
are removed at once with the column sweep of SparseGPT (Frantar & Alistarh, 2023): inputs
are visited in order, the pruned weights of input ``i`` are set to zero and their error
is spread over the inputs not yet visited through the Cholesky factor of ``H⁻¹``. The sweep
is exact for each input given the ones before it, costs ``O(d_in² · units)``, and leaves
every masked weight at exactly zero. ``H`` is damped, ``H + λ mean(diag H) I``.
"""

from __future__ import annotations

import numpy as np


class Factorization:
    """One layer's damped input Gram matrix, factorized once.

    With ``J`` the order-reversing permutation, ``J H J = L Lᵀ`` (Cholesky) gives
    ``H = R Rᵀ`` with ``R = J L J`` upper triangular, so ``U = R⁻¹`` is the upper Cholesky
    factor of ``H⁻¹ = Uᵀ U`` that the sweep needs, and ``[H⁻¹]_ii = Σ_k U_ki²``: one
    Cholesky and one triangular inverse, no explicit inverse.

    Args:
        gram: `(d_in, d_in)` matrix ``E[x xᵀ]``.
        damping: λ, relative to the mean diagonal.
    """

    def __init__(self, gram, damping=0.01):
        from scipy.linalg import lapack

        h = np.array(gram, dtype=np.float64)
        h = 0.5 * (h + h.T)
        d = len(h)
        mean = float(np.mean(np.diag(h))) if d else 0.0
        h[np.diag_indices(d)] += float(damping) * mean + 1e-10 * max(mean, 1e-30) + 1e-30
        self.gram = h
        low, info = lapack.dpotrf(np.ascontiguousarray(h[::-1, ::-1]), lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"Gram matrix not positive definite (info={info}).")
        r = np.triu(low[::-1, ::-1])  # H = R Rᵀ, R upper
        u, info = lapack.dtrtri(r, lower=0)
        if info != 0:  # pragma: no cover - the damping keeps R invertible
            raise np.linalg.LinAlgError(f"Singular Cholesky factor (info={info}).")
        self.upper = np.triu(u)
        self.hinv_diag = np.sum(self.upper**2, axis=0)

    @classmethod
    def diagonal(cls, x2, damping=0.01):
        """Diagonal stand-in when the Gram matrix is too large to keep: ``H ≈ diag(E[x²])``
        (Optimal Brain Damage); no `upper`, so no re-fit."""
        self = cls.__new__(cls)
        d = np.asarray(x2, np.float64).reshape(-1)
        mean = float(d.mean()) if d.size else 0.0
        self.gram = None
        self.upper = None
        self.hinv_diag = 1.0 / (d + float(damping) * mean + 1e-10 * max(mean, 1e-30) + 1e-30)
        return self

    @property
    def hinv(self):
        """``H⁻¹ = Uᵀ U`` (built on request; the scores need only its diagonal)."""
        return self.upper.T @ self.upper


def saliency(kernel, fact, curvature=None):
    """``L_ij = ½ c_j w_ij² / [H⁻¹]_ii`` for a `(..., units)` kernel; same shape.

    Args:
        kernel: the layer's kernel; its leading axes flatten to ``d_in`` in the same order
            as the Gram matrix's rows (Dense: inputs; Conv: ``(kh, kw, c_in)``).
        fact: the layer's `Factorization`.
        curvature: ``c_j`` per unit, `(units,)`, or per weight, `(d_in, units)`; None = 1.
    """
    w = np.asarray(kernel, np.float64)
    w2 = w.reshape(-1, w.shape[-1]) ** 2
    c = 1.0 if curvature is None else np.asarray(curvature, np.float64)
    return (0.5 * c * w2 / fact.hinv_diag[:, None]).reshape(w.shape)


def reconstruct(kernel, mask, fact, block=128):
    """SparseGPT sweep: zero the masked weights and re-fit the survivors.

    Args:
        kernel: `(..., units)` kernel (current weights; already-pruned ones are zero).
        mask: 0/1 array of the kernel's shape (0 = removed).
        fact: the layer's `Factorization`.
        block: inputs processed per lazy batch update.

    Returns:
        The new kernel (float of the input dtype), exactly zero where `mask` is 0.
    """
    shape, dtype = np.shape(kernel), np.asarray(kernel).dtype
    if fact.upper is None:  # diagonal stand-in: the optimal re-fit is no change
        return (np.asarray(kernel) * (np.asarray(mask) != 0)).astype(dtype)
    w = np.array(kernel, dtype=np.float64).reshape(-1, shape[-1])
    drop = np.asarray(mask).reshape(w.shape) == 0
    u = fact.upper
    d = w.shape[0]
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        wb = w[b0:b1]
        err = np.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            e = np.where(drop[b0 + i], wb[i] / ub[i, i], 0.0)
            wb[i] = np.where(drop[b0 + i], 0.0, wb[i])
            if i + 1 < b1 - b0:
                wb[i + 1 :] -= np.outer(ub[i, i + 1 :], e)
            err[i] = e
        w[b0:b1] = wb
        if b1 < d:
            w[b1:] -= u[b0:b1, b1:].T @ err
    w[drop] = 0.0
    return w.reshape(shape).astype(dtype)
