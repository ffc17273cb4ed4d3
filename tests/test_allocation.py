import numpy as np
import pytest

from keras_ibprune import allocation as A


def _kept(scores, alloc):
    return [round((1 - a) * s.size) for s, a in zip(scores, alloc)]


def test_registered_names_and_unknown():
    for name in ("uniform", "global", "erk", "global_erk_floor"):
        assert A.get(name) is getattr(A, name if name != "global" else "global_threshold")
    assert A.get("ib") is A.global_threshold  # nats: water-filling = one threshold
    with pytest.raises(ValueError, match="Unknown allocation.*Received: allocation='wf'"):
        A.get("wf")


def test_global_water_fills_nats_and_meets_the_target():
    rng = np.random.default_rng(0)
    # Layer "cheap" loses few nats per weight, layer "dear" many: cheap is pruned harder.
    cheap = rng.random((100, 50)) * 1e-3
    dear = rng.random((100, 50))
    small = rng.random((5, 4))
    scores = [cheap, dear, small]
    alloc = A.global_threshold(scores, 0.6)
    total = sum(a * s.size for a, s in zip(alloc, scores)) / sum(s.size for s in scores)
    assert total == pytest.approx(0.6, abs=1e-3)
    assert alloc[0] > alloc[1]
    # The legacy ERK floor: the tiny layer keeps at least half its ERK density.
    floored = A.global_erk_floor(scores, 0.6)
    erk = A.erk(scores, 0.6)
    assert 1 - floored[2] >= 0.5 * (1 - erk[2]) - 1e-9


def test_floors_respect_min_density_and_pruned_entries():
    rng = np.random.default_rng(1)
    a, b = rng.random((40, 40)) * 1e-6, rng.random((40, 40))
    a[:5] = -np.inf  # already pruned: counted, never resurrected
    alloc = A.global_erk_floor([a, b], 0.5, min_density=0.3, erk_floor=0.0)
    assert alloc[0] == pytest.approx(0.7, abs=1e-3)  # hits its floor
    assert sum(x * 1600 for x in alloc) == pytest.approx(1600, abs=2)


def test_global_threshold_matches_a_sort_of_all_scores():
    rng = np.random.default_rng(2)
    scores = [rng.random((30, 10)), rng.random((20, 10)) * 0.5, rng.random(7)]
    flat = np.concatenate([s.ravel() for s in scores])
    cut = np.sort(flat)[int(round(0.55 * flat.size)) - 1]  # oracle: brute-force sort
    expected = [float(np.mean(s <= cut)) for s in scores]
    np.testing.assert_allclose(A.global_threshold(scores, 0.55), expected)


def test_erk_and_uniform():
    scores = [np.ones((5, 5, 1, 20)), np.ones((800, 500)), np.ones((500, 10))]
    u = A.uniform(scores, 0.9, min_density=0.2)
    assert u == [0.8, 0.8, 0.8]
    e = A.erk(scores, 0.9)
    n = np.array([s.size for s in scores])
    assert np.sum(np.array(e) * n) / n.sum() == pytest.approx(0.9, abs=1e-6)
    assert e[1] > 0.9 and e[1] > e[2] >= e[0]  # the big fc layer is the sparsest


def test_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        A.global_erk_floor([np.ones((3, 3))], 1.5)
