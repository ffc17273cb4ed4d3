import numpy as np
import pytest

from keras_ibprune import estimators as est


def _two_gaussians(n=20000, seed=0):
    """Two equiprobable classes, means ±mu, shared covariance sw: known closed form."""
    rng = np.random.default_rng(seed)
    sw = np.array([[1.0, 0.3, 0.0], [0.3, 2.0, 0.0], [0.0, 0.0, 0.5]])
    mu = np.array([1.0, 0.0, 0.5])
    y = rng.integers(0, 2, n)
    t = rng.multivariate_normal(np.zeros(3), sw, n) + np.where(y[:, None] == 1, mu, -mu)
    sb = np.outer(mu, mu)  # between-class covariance of ±mu with p = 1/2
    closed = 0.5 * np.log(np.linalg.det(sw + sb) / np.linalg.det(sw))
    return t, y, closed


def test_gaussian_mi_matches_closed_form_for_known_covariances():
    t, y, closed = _two_gaussians()
    assert est.gaussian_mi(t, y, shrinkage=0.0) == pytest.approx(closed, rel=0.03)


def test_gaussian_mi_continuous_target_joint_gaussian():
    rng = np.random.default_rng(1)
    yv = rng.normal(size=20000)
    t = (yv + rng.normal(scale=0.5, size=20000))[:, None]
    # I(T;Y) = ½ log(1 + var(Y)/var(noise)) = ½ log 5
    assert est.gaussian_mi(t, yv, shrinkage=0.0) == pytest.approx(0.5 * np.log(5.0), rel=0.03)
    assert est.label_kind(yv)[0] == "continuous"


def test_label_kinds():
    assert est.label_kind(np.array([0, 1, 2]))[0] == "classes"
    kind, lab = est.label_kind(np.eye(3)[[2, 0, 1]])
    assert kind == "classes" and lab.tolist() == [2, 0, 1]
    assert est.label_kind(np.array([[0.3, 1.5], [2.0, 1.0]]))[0] == "continuous"


def test_unique_relevance_sees_redundancy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    signal = y + 0.3 * rng.normal(size=4000)
    other = y + 0.3 * rng.normal(size=4000)  # an independent noisy view
    noise = rng.normal(size=4000)
    single = np.stack([signal, noise], 1)
    dup = np.stack([signal, signal, noise], 1)
    two_views = np.stack([signal, other, noise], 1)
    u_single = est.unique_relevance(single, y)
    u_dup = est.unique_relevance(dup, y)
    # A label-encoding unit has high relevance, a noise unit ~0.
    assert u_single[0] > 0.5 and u_single[1] < 0.01
    # Two copies of one unit both score low: each is redundant given the other...
    assert u_dup[0] < 0.1 * u_single[0] and u_dup[1] < 0.1 * u_single[0]
    # ...while the marginal relevance still calls both informative.
    marg = est.unit_relevance(dup, y)
    assert marg[0] > 0.5 and marg[1] > 0.5
    # Independent views keep some unique information.
    assert est.unique_relevance(two_views, y)[0] > 3 * u_dup[0]


def test_noise_sensitivity_is_the_derivative_of_gaussian_mi():
    t, y, _ = _two_gaussians(n=5000)
    st, sw = est.covariances(t, y, 0.05)
    kappa = est.noise_sensitivity(t, y, cov=(st, sw))
    delta = 1e-4
    for j in range(3):
        e = np.zeros((3, 3))
        e[j, j] = delta
        i0 = 0.5 * (np.linalg.slogdet(st)[1] - np.linalg.slogdet(sw)[1])
        i1 = 0.5 * (np.linalg.slogdet(st + e)[1] - np.linalg.slogdet(sw + e)[1])
        assert (i0 - i1) / delta == pytest.approx(kappa[j], rel=1e-3)
    assert np.all(kappa >= 0)


def test_compression_noise_floor_and_pairwise_mi_closed_forms():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50000, 2)) * np.array([1.0, 3.0])
    per = est.gaussian_compression(t, noise_var=0.5)
    np.testing.assert_allclose(per, 0.5 * np.log1p(np.array([1.0, 9.0]) / 0.5), rtol=0.02)
    layer = est.gaussian_compression(t, noise_var=0.5, per_unit=False)
    assert layer == pytest.approx(per.sum(), rel=0.02)  # independent units add up
    a = rng.normal(size=50000)
    b = 0.8 * a + 0.6 * rng.normal(size=50000)  # rho = 0.8
    pm = est.pairwise_mi(np.stack([a, b], 1), shrinkage=0.0)
    assert pm[0, 1] == pytest.approx(-0.5 * np.log(1 - 0.64), rel=0.03)
    assert pm[0, 0] == 0.0


def test_binned_entropy_and_mi():
    t = np.repeat(np.arange(4.0), 100)[:, None]
    assert est.binned_entropy(t, bins=4)[0] == pytest.approx(np.log(4))
    y = np.repeat(np.arange(4), 100)
    assert est.binned_mi(t, y, bins=4)[0] == pytest.approx(np.log(4))
    rng = np.random.default_rng(0)
    assert est.binned_mi(rng.normal(size=(400, 1)), y, bins=4)[0] < 0.1
    assert est.binned_layer_entropy(np.concatenate([t, t], 1), bins=4) == pytest.approx(np.log(4))
    assert est.layer_mi(t, y, "binned", bins=4) == pytest.approx(np.log(4))


def test_hsic_dependence_and_determinism():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 800)
    dep = y[:, None] + 0.2 * rng.normal(size=(800, 2))
    ind = rng.normal(size=(800, 2))
    h_dep, h_ind = est.hsic(dep, y), est.hsic(ind, y)
    assert 0.0 <= h_ind < 0.1 < h_dep <= 1.0
    assert est.hsic(dep, y) == h_dep  # fixed-seed subsample
    assert est.hsic(np.ones((50, 2)), y[:50]) == 0.0


@pytest.mark.parametrize(
    "t",
    [
        np.zeros((40, 3)),
        np.ones((40, 3)) * 1e30,
        np.full((40, 3), np.nan),
        np.array([[np.inf, 1.0, -np.inf]] * 40),
        np.ones((1, 3)),
    ],
    ids=["zeros", "huge", "nan", "inf", "one-sample"],
)
def test_estimators_finite_on_degenerate_input(t):
    y = np.arange(len(t)) % 2
    values = [
        est.gaussian_mi(t, y),
        est.unit_relevance(t, y),
        est.unique_relevance(t, y),
        est.noise_sensitivity(t, y),
        est.gaussian_compression(t),
        est.gaussian_compression(t, per_unit=False),
        est.pairwise_mi(t),
        est.binned_entropy(t),
        est.binned_mi(t, y),
        est.hsic(t, y),
        est.layer_mi(t, y, "binned"),
    ]
    for v in values:
        assert np.all(np.isfinite(v)) and np.all(np.asarray(v) >= 0)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="Unknown estimator.*Received: estimator='knn'"):
        est.check_estimator("knn")
    with pytest.raises(ValueError, match="Unknown estimator"):
        est.unit_mi(np.zeros((4, 2)), np.array([0, 1, 0, 1]), estimator="kde")
