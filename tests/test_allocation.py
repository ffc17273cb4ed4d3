import numpy as np
import pytest

from keras_ibprune import allocation as A


def _kept(scores, alloc):
    return [round((1 - a) * s.size) for s, a in zip(scores, alloc)]


def test_registered_names_and_unknown():
    for name in ("uniform", "global", "erk", "ib"):
        assert callable(A.get(name))
    with pytest.raises(ValueError, match="Unknown allocation.*Received: allocation='wf'"):
        A.get("wf")


def test_ib_water_fills_nats_and_meets_the_target():
    rng = np.random.default_rng(0)
    # Layer "cheap" loses few nats per weight, layer "dear" many: cheap is pruned harder.
    cheap = rng.random((100, 50)) * 1e-3
    dear = rng.random((100, 50))
    small = rng.random((5, 4))
    scores = [cheap, dear, small]
    alloc = A.ib(scores, 0.6)
    total = sum(a * s.size for a, s in zip(alloc, scores)) / sum(s.size for s in scores)
    assert total == pytest.approx(0.6, abs=1e-3)
    assert alloc[0] > alloc[1]
    # ERK floor: the tiny layer keeps at least half its ERK density.
    erk = A.erk(scores, 0.6)
    assert 1 - alloc[2] >= 0.5 * (1 - erk[2]) - 1e-9


def test_ib_respects_min_density_and_pruned_entries():
    rng = np.random.default_rng(1)
    a, b = rng.random((40, 40)) * 1e-6, rng.random((40, 40))
    a[:5] = -np.inf  # already pruned: counted, never resurrected
    alloc = A.ib([a, b], 0.5, min_density=0.3, erk_floor=0.0)
    assert alloc[0] == pytest.approx(0.7, abs=1e-3)  # hits its floor
    assert sum(x * 1600 for x in alloc) == pytest.approx(1600, abs=2)


def test_thresholds_with_floors_global_equivalence():
    rng = np.random.default_rng(2)
    scores = [rng.random((30, 10)), rng.random((20, 10))]
    np.testing.assert_allclose(
        A.thresholds_with_floors(scores, 0.5, [0.0, 0.0]), A.global_threshold(scores, 0.5)
    )


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
        A.ib([np.ones((3, 3))], 1.5)
