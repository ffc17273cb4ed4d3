"""Per-sample noise by global index and float64 totals with capped per-sample rows."""

import numpy as np
import pytest

from keras_ibprune.accumulate import SampleNoise, Totals


def test_noise_is_a_function_of_the_global_index():
    for gaussian in (False, True):
        whole = SampleNoise(3, gaussian, width=2)(0, 100)
        parts = SampleNoise(3, gaussian, width=2)
        shard = np.concatenate([parts(a, b) for a, b in ((40, 70), (0, 40), (70, 100))])
        order = np.r_[40:70, 0:40, 70:100]
        np.testing.assert_array_equal(shard, whole[order])
    u = np.random.default_rng(3).random(100).astype("float32")
    np.testing.assert_array_equal(SampleNoise(3)(0, 100), u)  # the historical draws


def test_totals_sum_in_float64_and_cap_rows():
    tot = Totals(1, sample_cap=5)
    for start in (0, 4, 8):
        part = {
            "z2": np.float32(1e8) * np.ones(2, np.float32),
            "rows_all": np.float32(4),
            "t_mean": np.arange(start, start + 4, dtype=np.float32)[:, None],
            "z_rows": np.zeros((8, 2), np.float32),
            "positions": np.int32(2),
        }
        tot.add([part], start, 4)
    tot.sums[0]["z2"][0] += 1.0  # float32 would lose it
    assert tot.sums[0]["z2"][0] == 3e8 + 1.0 and tot.samples == 5
    assert tot.rows[0]["t_mean"][-1].ravel().tolist() == [4.0]  # samples 0..4 only
    assert sum(len(r) for r in tot.rows[0]["z_rows"]) == 10  # 2 rows per sample
    assert not tot.wants_rows(8) and tot.wants_rows(4)


@pytest.mark.parametrize("gaussian", [False, True])
def test_noise_at_strided_indices_is_the_noise_of_those_samples(gaussian):
    noise = SampleNoise(3, gaussian=gaussian, width=2)
    full = SampleNoise(3, gaussian=gaussian, width=2)(0, 40)
    index = np.arange(5, 40, 3)  # the samples of pipeline 2 of 3 after the first
    np.testing.assert_array_equal(noise.at(index), full[index])
    np.testing.assert_array_equal(noise.at(np.arange(7, 12)), full[7:12])
    assert noise.at(np.arange(0)).shape[0] == 0
