"""Estimators against ground truth: closed forms, Monte Carlo, null data, invariances."""

import numpy as np
import pytest
from scipy.special import logsumexp

from keras_ibprune import estimators as est


def _mixture(n, means, seed):
    """Equiprobable classes, t | y=c ~ N(means[c], I)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(means), n)
    return means[y] + rng.normal(size=(n, means.shape[1])), y


def _mixture_mi_monte_carlo(means, n=200000, seed=1):
    """I(T; Y) = H(Y) − E[−log p(y|t)] with the true posterior (no estimator involved)."""
    t, y = _mixture(n, means, seed)
    logits = -0.5 * ((t[:, None, :] - means[None]) ** 2).sum(-1)
    return np.log(len(means)) - np.mean(logsumexp(logits, 1) - logits[np.arange(n), y])


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_jointly_gaussian_with_known_correlation(rho):
    rng = np.random.default_rng(0)
    a = rng.normal(size=4000)
    b = rho * a + np.sqrt(1 - rho**2) * rng.normal(size=4000)
    truth = -0.5 * np.log(1 - rho**2)
    assert est.label_kind(b)[0] == "continuous"
    assert est.relevance(a[:, None], b) == pytest.approx(truth, abs=0.03 + 0.05 * truth)


def test_gaussian_mixture_matches_monte_carlo():
    means = np.random.default_rng(3).normal(size=(4, 5))
    truth = _mixture_mi_monte_carlo(means)
    t, y = _mixture(3000, means, seed=0)
    value = est.relevance(t, y)
    # A cross-fitted bound: slightly below the truth, never above it by more than noise.
    assert truth - 0.06 < value < truth + 0.02
    assert value <= est.entropy(y)


@pytest.mark.parametrize("n,d", [(1024, 500), (512, 500), (1024, 20)])
def test_pure_noise_is_zero_even_when_n_is_close_to_d(n, d):
    rng = np.random.default_rng(0)
    t, y = rng.normal(size=(n, d)), rng.integers(0, 10, n)
    assert est.relevance(t, y) < 0.02
    assert est.unique_relevance(t, y).max() < 0.05  # no noise unit claims information


def test_never_exceeds_label_entropy():
    y = np.repeat(np.arange(10), 50)
    t = np.eye(10)[y] * 100.0 + 0.01 * np.random.default_rng(0).normal(size=(500, 10))
    h = est.entropy(y)
    assert est.relevance(t, y) <= h + 1e-12
    assert est.relevance(t, y) == pytest.approx(np.log(10), abs=0.05)  # separable: ~ H(Y)
    assert est.binned_layer_mi(t, y) <= h + 1e-12


def test_scale_invariance_per_unit():
    means = np.random.default_rng(4).normal(size=(3, 4))
    t, y = _mixture(1500, means, seed=1)
    scales = np.array([1e-3, 1.0, 50.0, 1e4])
    assert est.relevance(t * scales, y) == pytest.approx(est.relevance(t, y), rel=1e-6)
    np.testing.assert_allclose(est.unique_relevance(t * scales, y),
                               est.unique_relevance(t, y), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(est.binned_mi(t * scales, y), est.binned_mi(t, y))


def test_duplicated_unit_adds_nothing_and_is_redundant():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    signal = y + 0.5 * rng.normal(size=3000)
    noise = rng.normal(size=3000)
    single = np.stack([signal, noise], 1)
    dup = np.stack([signal, signal, noise], 1)
    u_single = est.unique_relevance(single, y)
    u_dup = est.unique_relevance(dup, y)
    assert est.relevance(dup, y) == pytest.approx(est.relevance(single, y), abs=0.01)
    assert u_single[0] > 0.15 and abs(u_single[1]) < 0.01
    # Each copy is redundant given the other: its unique information is ~0.
    assert abs(u_dup[0]) < 0.05 * u_single[0] and abs(u_dup[1]) < 0.05 * u_single[0]
    # The marginal relevance still calls both informative.
    marg = est.unit_relevance(dup, y)
    assert marg[0] > 0.15 and marg[1] > 0.15


def test_unique_relevance_equals_dropping_the_unit():
    means = np.random.default_rng(5).normal(size=(3, 4))
    t, y = _mixture(1200, means, seed=2)
    u = est.unique_relevance(t, y)
    full = est.relevance(t, y)
    for j in range(4):
        without = est.relevance(np.delete(t, j, axis=1), y)
        # Same probe without unit j (the rank-one downdate equals refitting without it).
        assert u[j] == pytest.approx(full - without, abs=2e-3)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    t, y = rng.normal(size=(300, 6)), rng.integers(0, 3, 300)
    t[:, 0] += y
    assert est.relevance(t, y, seed=1) == est.relevance(t, y, seed=1)
    np.testing.assert_array_equal(est.unique_relevance(t, y, 2), est.unique_relevance(t, y, 2))


def test_compression_bound_and_pairwise_closed_forms():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50000, 2)) * np.array([1.0, 3.0])
    per = est.gaussian_compression(t, noise_var=0.5)
    np.testing.assert_allclose(per, 0.5 * np.log1p(np.array([1.0, 9.0]) / 0.5), rtol=0.02)
    layer = est.gaussian_compression(t, noise_var=0.5, per_unit=False)
    assert layer == pytest.approx(per.sum(), rel=0.02)  # independent units add up
    a = rng.normal(size=50000)
    b = 0.8 * a + 0.6 * rng.normal(size=50000)  # rho = 0.8
    pm = est.pairwise_mi(np.stack([a, b], 1))
    assert pm[0, 1] == pytest.approx(-0.5 * np.log(1 - 0.64), rel=0.03)
    assert pm[0, 0] == 0.0


def test_binned_is_bias_corrected_on_noise_and_exact_on_codes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1000)
    assert np.all(est.binned_mi(rng.normal(size=(1000, 3)), y) < 0.01)
    assert est.binned_layer_mi(rng.normal(size=(1000, 20)), y) < 0.01  # saturated -> ~0
    t = np.repeat(np.arange(4.0), 250)[:, None]
    y4 = np.repeat(np.arange(4), 250)
    bias = 9 / 2000  # Miller–Madow: (4 - 1)(4 - 1) / 2n
    assert est.binned_mi(t, y4, bins=4)[0] == pytest.approx(np.log(4) - bias)


def test_hsic_dependence_and_determinism():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 800)
    dep = y[:, None] + 0.2 * rng.normal(size=(800, 2))
    ind = rng.normal(size=(800, 2))
    h_dep, h_ind = est.hsic(dep, y), est.hsic(ind, y)
    assert 0.0 <= h_ind < 0.1 < h_dep <= 1.0
    assert est.hsic(dep, y) == h_dep
    assert est.hsic(np.ones((50, 2)), y[:50]) == 0.0


def test_noise_sensitivity_is_the_derivative_of_the_channel_information():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    t = rng.normal(size=(5000, 3)) + np.outer(2 * y - 1, [1.0, 0.0, 0.5])
    kappa = est.noise_sensitivity(t, y, shrinkage=0.0)
    tc = t - t.mean(0)
    means = np.stack([tc[y == c].mean(0) for c in (0, 1)])
    sw = sum(((tc[y == c] - means[c]).T @ (tc[y == c] - means[c])) for c in (0, 1)) / len(t)
    st = tc.T @ tc / len(t)
    delta = 1e-4
    for j in range(3):
        e = np.zeros((3, 3))
        e[j, j] = delta
        i0 = 0.5 * (np.linalg.slogdet(st)[1] - np.linalg.slogdet(sw)[1])
        i1 = 0.5 * (np.linalg.slogdet(st + e)[1] - np.linalg.slogdet(sw + e)[1])
        assert (i0 - i1) / delta == pytest.approx(kappa[j], rel=2e-3)


@pytest.mark.parametrize(
    "t",
    [np.zeros((40, 3)), np.ones((40, 3)) * 1e30, np.full((40, 3), np.nan),
     np.array([[np.inf, 1.0, -np.inf]] * 40), np.ones((2, 3))],
    ids=["zeros", "huge", "nan", "inf", "two-samples"],
)
def test_estimators_finite_on_degenerate_input(t):
    y = np.arange(len(t)) % 2
    for v in (est.relevance(t, y), est.unit_relevance(t, y), est.unique_relevance(t, y),
              est.noise_sensitivity(t, y), est.gaussian_compression(t),
              est.gaussian_compression(t, per_unit=False), est.pairwise_mi(t),
              est.binned_mi(t, y), est.binned_layer_mi(t, y), est.hsic(t, y)):
        assert np.all(np.isfinite(v))
    assert 0.0 <= est.relevance(t, y) <= est.entropy(y)


def test_unknown_estimator_names_hsic_as_not_nats():
    with pytest.raises(ValueError, match="Unknown estimator.*HSIC.*Received: estimator='hsic'"):
        est.check_estimator("hsic")
