import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ibprune as kib
from keras_ibprune import heldout as S

L = keras.layers


def _cnn():
    inp = keras.Input((9, 9, 2))
    h = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
    out = L.Dense(3, activation="softmax", name="out")(L.Flatten()(h))
    return kib.prune(keras.Model(inp, out))


def _xy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 9, 9, 2)).astype("float32"), np.arange(n) % 3


def test_held_out_arrays_from_arrays_dataset_and_generator():
    model = _cnn()
    x, y = _xy(50)
    xa, ya = S.held_out_arrays((x, y), size=32, model=model)
    assert xa.shape == (32, 9, 9, 2) and ya.shape == (32,)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    xb, yb = S.held_out_arrays(ds.batch(8), size=20, model=model)
    np.testing.assert_array_equal(xb, x[:20])
    xc, yc = S.held_out_arrays(ds, size=20, model=model)  # unbatched elements
    np.testing.assert_array_equal(yc, y[:20])

    def gen():
        for i in range(0, 50, 10):
            yield x[i : i + 10], y[i : i + 10]

    xd, _ = S.held_out_arrays(gen(), size=25, model=model)
    assert len(xd) == 25
    xe, ye = S.held_out_arrays(x, size=10)
    assert ye is None and len(xe) == 10


def test_infinite_dataset_and_generator_are_capped():
    x, y = _xy(8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
    xa, _ = S.held_out_arrays(ds, size=30)
    assert len(xa) == 30

    def forever():
        for i in itertools.count():
            yield x[i % 8 : i % 8 + 1], y[i % 8 : i % 8 + 1]

    xb, _ = S.held_out_arrays(forever(), size=12)
    assert len(xb) == 12


def test_bad_held_out_data():
    model = _cnn()
    x, y = _xy()
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Held-out x contains NaN.*sample 3"):
        S.held_out_arrays((bad, y), model=model)
    with pytest.raises(ValueError, match="Held-out y contains NaN"):
        S.held_out_arrays((x, np.full(len(x), np.inf)), model=model)
    with pytest.raises(ValueError, match=r"same number of samples.*len\(x\)=40, len\(y\)=39"):
        S.held_out_arrays((x, y[:-1]))
    with pytest.raises(ValueError, match=r"does not fit.*held-out x.shape=\(40, 8, 8, 2\)"):
        S.held_out_arrays((x[:, :8, :8], y), model=model)
    with pytest.raises(ValueError, match="empty"):
        S.held_out_arrays(iter([]))
    with pytest.raises(ValueError, match="held_out_size"):
        S.held_out_arrays((x, y), size=1)


def test_multi_output_targets_need_output():
    x, y = _xy()
    with pytest.raises(ValueError, match="pass `output=`"):
        S.held_out_arrays((x, [y, y]))
    _, picked = S.held_out_arrays((x, {"a": y, "b": y + 1}), output="b")
    np.testing.assert_array_equal(picked, y + 1)
    _, first = S.held_out_arrays((x, [y, -y]), output=1)
    np.testing.assert_array_equal(first, -y)


def test_check_labels():
    with pytest.raises(ValueError, match="single class.*label-free mode"):
        S.check_labels(np.zeros(10, int))
    with pytest.raises(ValueError, match=r"at least 2 samples.*classes \[2\]"):
        S.check_labels(np.array([0, 0, 1, 1, 2]))
    S.check_labels(np.array([0.1, 0.5, 0.3]))  # regression targets: nothing to check
    S.check_labels(np.eye(3)[[0, 1, 2, 0, 1, 2]])
