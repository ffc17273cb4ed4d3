import numpy as np
import pytest

from keras_ibprune import masks

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_exact_count(sparsity):
    s = np.random.default_rng(0).random((37, 11))
    m = masks.topk_mask(s, sparsity)
    assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    assert int((m == 0).sum()) == round(sparsity * s.size)
    # The kept entries are exactly the largest scores.
    if 0 < sparsity:
        assert s[m == 1].min() >= s[m == 0].max()


def test_monotone_keeps_pruned_pruned():
    rng = np.random.default_rng(1)
    s1, s2 = rng.random(100), rng.random(100)
    m1 = masks.topk_mask(s1, 0.5)
    m2 = masks.topk_mask(s2, 0.7, prev_mask=m1)
    assert np.all(m2[m1 == 0] == 0) and int((m2 == 0).sum()) == 70
    # Lowering the target never revives weights.
    m3 = masks.topk_mask(s2, 0.2, prev_mask=m2)
    np.testing.assert_array_equal(m3, m2)
    free = masks.topk_mask(s2, 0.2, prev_mask=m2, monotone=False)
    assert int((free == 0).sum()) == 20


def test_ties_nan_and_inf_are_deterministic():
    s = np.array([1.0, np.nan, 1.0, np.inf, -np.inf, 1.0, 2.0])
    a = masks.topk_mask(s, 3 / 7)
    b = masks.topk_mask(s.copy(), 3 / 7)
    np.testing.assert_array_equal(a, b)
    assert not np.isnan(a).any()
    # NaN and +-inf rank lowest, then ties by position.
    np.testing.assert_array_equal(a, [1, 0, 1, 0, 0, 1, 1])


def test_block_masks_are_whole_blocks():
    s = np.random.default_rng(2).random((8, 12))
    m = masks.topk_mask(s, 0.5, block_size=(1, 4))
    blocks = m.reshape(8, 3, 4)
    assert np.all(blocks.min(-1) == blocks.max(-1))
    assert (m == 0).mean() == 0.5
    conv = np.random.default_rng(3).random((3, 3, 2, 8))
    mc = masks.topk_mask(conv, 0.75, block_size=(2, 4))
    assert mc.shape == conv.shape
    # 18 x 8 matrix -> 9 x 2 blocks of (2, 4); exactly round(0.75 * 18) blocks are zero.
    assert (mc == 0).sum() == round(0.75 * 18) * 8


def test_mask_sparsity():
    assert masks.mask_sparsity([np.ones(3), np.zeros(1)]) == 0.25
    assert masks.mask_sparsity([]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_selection_matches_a_stable_sort(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    s[rng.random(200) < 0.1] = -np.inf
    for sparsity in (0.05, 0.3, 0.77, 1.0):
        k = min(round(sparsity * s.size), s.size - 1)  # one entry always survives
        expected = np.ones(s.size, np.float32)
        expected[np.argsort(s, kind="stable")[:k]] = 0
        np.testing.assert_array_equal(masks.topk_mask(s, sparsity), expected)


def test_topk_never_empties_a_tensor():
    s = np.random.default_rng(0).normal(size=(4, 3))
    m = masks.topk_mask(s, 0.99)
    assert m.sum() == 1 and m.ravel()[np.argmax(s)] == 1  # the best one survives
    # Monotone: everything else already pruned still leaves one entry.
    prev = np.zeros((4, 3), np.float32)
    prev[0, 0] = 1
    assert masks.topk_mask(s, 0.99, prev_mask=prev).sum() == 1


@pytest.mark.parametrize("block", [None, (2, 1)])
def test_topk_keeps_forced_entries_even_above_target(block):
    s = np.arange(24, dtype=float).reshape(8, 3)
    keep = np.zeros((8, 3), bool)
    keep[0, :] = True  # the lowest score of every column must stay
    m = masks.topk_mask(s, 0.99, block_size=block, keep=keep)
    assert np.all(m[0] == 1)
    assert m.sum() == (3 if block is None else 6)  # nothing else survives


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_pattern_keeps_the_n_best_of_every_group(n, m):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(18, 5))  # 18 inputs: 4 full groups of 4 + one of 2 (for m=4)
    mask = masks.topk_mask(s, 1 - n / m, pattern=(n, m))
    for c in range(s.shape[1]):
        for g0 in range(0, 18, m):
            grp, keep = s[g0:g0 + m, c], mask[g0:g0 + m, c]
            assert keep.sum() == min(len(grp), n)
            # the survivors are the group's best scores
            assert grp[keep == 1].min() >= grp[keep == 0].max(initial=-np.inf)
    # beyond 1 - n/m the pattern caps the sparsity
    np.testing.assert_array_equal(masks.topk_mask(s, 0.99, pattern=(n, m)), mask)


def test_pattern_ramp_is_monotone_and_ends_exactly_n_m():
    rng = np.random.default_rng(1)
    mask = np.ones((16, 3), np.float32)
    for target in (0.1, 0.3, 0.5):
        new = masks.topk_mask(rng.normal(size=(16, 3)), target, prev_mask=mask, pattern=(2, 4))
        assert np.all(new[mask == 0] == 0)
        assert (new == 0).sum() == round(target * 48)
        mask = new
    assert np.all(mask.reshape(4, 4, 3).sum(axis=1) == 2)


def test_pattern_never_revives_pruned_entries():
    s = np.arange(8, dtype=float).reshape(8, 1)
    prev = np.zeros((8, 1), np.float32)
    prev[5] = 1  # 7 of 8 pruned before the pattern: more than 4 - 2 per group
    m = masks.topk_mask(s, 0.5, prev_mask=prev, pattern=(2, 4))
    np.testing.assert_array_equal(m, prev)
