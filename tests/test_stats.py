
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ibprune as kib
from keras_ibprune import stats as S

L = keras.layers


def _cnn(padding="valid", strides=1):
    inp = keras.Input((9, 9, 2))
    h = L.Conv2D(4, 3, padding=padding, strides=strides, activation="relu", name="conv")(inp)
    h = L.Flatten()(h)
    out = L.Dense(3, activation="softmax", name="out")(h)
    return kib.prune(keras.Model(inp, out))


def _xy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 9, 9, 2)).astype("float32"), np.arange(n) % 3


@pytest.mark.parametrize("padding,strides", [("valid", 1), ("same", 1), ("same", 2)])
def test_summarize_conv_patch_energy_matches_brute_force(padding, strides):
    model = _cnn(padding, strides)
    x, y = _xy()
    wrappers = S.find_wrappers(model)
    # Keep every position: the patch energy must equal the brute-force E[x_patch^2].
    summ = S.summarize(model, x, y, wrappers, batch_size=16, max_rows=10**6)
    conv = summ[0]
    assert conv["kind"] == "conv" and conv["x2"].shape == (3, 3, 2)
    patches = tf.image.extract_patches(
        x, [1, 3, 3, 1], [1, strides, strides, 1], [1, 1, 1, 1], padding.upper()
    ).numpy()
    brute = (patches.reshape(-1, 3, 3, 2) ** 2).mean(axis=0)
    np.testing.assert_allclose(conv["x2"], brute, rtol=1e-4)
    ho = patches.shape[1] * patches.shape[2]
    assert conv["positions"] == ho and conv["z"].shape == (len(x) * ho, 4)
    assert conv["t_mean"].shape == (len(x), 4)
    np.testing.assert_array_equal(conv["labels"], y[conv["rows"]])
    dense = summ[1]
    assert dense["kind"] == "dense" and dense["z"].shape == (len(x), 3)
    flat = conv["t_mean"]  # outputs are non-negative (relu)
    assert np.all(flat >= 0)


def test_summarize_subsamples_positions_deterministically():
    model = _cnn()
    x, y = _xy()
    ws = S.find_wrappers(model)
    a = S.summarize(model, x, y, ws, max_rows=80, seed=3)[0]
    b = S.summarize(model, x, y, ws, max_rows=80, seed=3)[0]
    assert len(a["z"]) == 80  # 2 positions per sample
    np.testing.assert_array_equal(a["z"], b["z"])


def test_nan_activations_name_the_layer():
    model = _cnn()
    x, y = _xy()
    w = S.find_wrappers(model)[0]
    w.layer.kernel.assign(np.full(w.layer.kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match="Layer 'conv' produced NaN"):
        S.summarize(model, x, y, S.find_wrappers(model))


def test_collect_puts_summaries_in_extra():
    model = _cnn()
    x, y = _xy()
    stats = S.collect(model, S.find_wrappers(model), held_out=(x, y), summaries=True)
    assert stats[0].extra["summary"]["kind"] == "conv" and stats[0].inputs is None
    assert stats[1].labels.shape == (40,)
