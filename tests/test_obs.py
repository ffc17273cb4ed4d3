"""Optimal Brain Surgeon saliencies and the SparseGPT reconstruction on random layers."""

import numpy as np
import pytest

from keras_ibprune import obs


def _layer(d_in=12, units=5, n=400, seed=0, mix=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    if mix:
        x = x @ rng.normal(size=(d_in, d_in))  # correlated inputs
    return x, rng.normal(size=(d_in, units)), x.T @ x / n


def _loss(x, w, new):
    """Mean over samples of ½‖x (new - w)‖² per unit, `(units,)`."""
    return 0.5 * np.mean((x @ (new - w)) ** 2, axis=0)


def test_single_weight_removal_costs_exactly_its_saliency():
    x, w, h = _layer()
    fact = obs.Factorization(h, damping=1e-12)
    sal = obs.saliency(w, fact)
    mask = np.ones_like(w)
    mask[0, 2] = 0  # the first input: the sweep's update is the exact OBS update
    new = obs.reconstruct(w, mask, fact)
    assert new[0, 2] == 0.0
    assert _loss(x, w, new)[2] == pytest.approx(sal[0, 2], rel=1e-6)
    # Other units are untouched.
    np.testing.assert_array_equal(np.delete(new, 2, axis=1), np.delete(w, 2, axis=1))


def test_reconstruction_between_zeroing_and_the_exact_refit():
    x, w, h = _layer(d_in=40, units=6, n=2000)
    fact = obs.Factorization(h, damping=0.01)
    mask = (np.random.default_rng(1).random(w.shape) > 0.3).astype("float32")
    new = obs.reconstruct(w, mask, fact, block=16)
    assert np.all(new[mask == 0] == 0.0)
    exact = np.zeros_like(w)  # oracle: every unit's survivors re-fitted jointly
    for u in range(w.shape[1]):
        k = mask[:, u] > 0
        g = fact.gram
        exact[k, u] = w[k, u] + np.linalg.solve(g[np.ix_(k, k)], g[np.ix_(k, ~k)] @ w[~k, u])
    lz, ls, le = (_loss(x, w, v).sum() for v in (w * mask, new, exact))
    assert le < ls < 0.9 * lz


def test_block_size_does_not_change_the_result():
    _, w, h = _layer(d_in=30, units=4)
    fact = obs.Factorization(h)
    mask = (np.random.default_rng(2).random(w.shape) > 0.5).astype("float32")
    np.testing.assert_allclose(obs.reconstruct(w, mask, fact, block=7),
                               obs.reconstruct(w, mask, fact, block=128), rtol=1e-10)


def test_saliency_prefers_redundant_inputs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=2000)
    x = np.stack([a, a + 0.01 * rng.normal(size=2000), rng.normal(size=2000)], 1)
    w = np.ones((3, 1))
    sal = obs.saliency(w, obs.Factorization(x.T @ x / len(x), damping=1e-6))[:, 0]
    # Equal weights, equal input energy: the near-duplicate inputs are cheap to remove.
    assert sal[0] < 0.01 * sal[2] and sal[1] < 0.01 * sal[2]


def test_dead_inputs_and_curvature():
    x, w, h = _layer(d_in=6, units=3, mix=False)
    h[:, 1] = h[1, :] = 0.0  # an input that is always zero
    fact = obs.Factorization(h, damping=0.01)
    assert np.all(np.isfinite(fact.hinv)) and np.all(np.isfinite(fact.upper))
    sal = obs.saliency(w, fact, curvature=np.array([1.0, 2.0, 0.0]))
    assert np.all(sal[:, 2] == 0.0)
    np.testing.assert_allclose(sal[:, 1], 2 * obs.saliency(w, fact)[:, 1])
    assert np.all(sal[1, :2] < 0.05 * np.median(sal[[0, 2, 3, 4, 5], :2]))
