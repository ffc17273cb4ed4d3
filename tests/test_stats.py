"""The compiled statistics pass against brute force (patches, Fisher, NaN, tracing)."""

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


def _brute(model, x, y, strides, padding):
    """Patches and per-position gradients of log p(y|x) w.r.t. the conv pre-activation."""
    conv, dense = [w.layer for w in S.find_wrappers(model)]
    patches = tf.image.extract_patches(x, [1, 3, 3, 1], [1, strides, strides, 1],
                                       [1, 1, 1, 1], padding.upper()).numpy()
    p2 = patches.reshape(len(x), -1, 18)
    z = tf.constant(p2 @ conv.kernel.numpy().reshape(18, 4) + conv.bias.numpy())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        logits = tf.reshape(tf.nn.relu(z), (len(x), -1)) @ dense.kernel + dense.bias
        tape.watch(logits)
        ll = tf.reduce_sum(tf.gather(tf.nn.log_softmax(logits), y, batch_dims=1))
    return p2, tape.gradient(ll, z).numpy(), tape.gradient(ll, logits).numpy()


@pytest.mark.parametrize("padding,strides", [("valid", 1), ("same", 1), ("same", 2)])
def test_gram_and_fisher_match_brute_force(padding, strides):
    model = _cnn(padding, strides)
    x, y = _xy()
    ws = S.find_wrappers(model)
    sp = S.StatisticsPass(model, ws, S.STATISTICS, fisher="empirical", max_rows=10**6,
                          batch_size=16)
    conv, out = sp(x, y)
    p2, g, g_out = _brute(model, x, y, strides, padding)
    rows = p2.reshape(-1, 18)
    assert conv["kind"] == "conv" and conv["positions"] == p2.shape[1]
    np.testing.assert_allclose(conv["x2"], (rows**2).mean(0).reshape(3, 3, 2), rtol=1e-4)
    np.testing.assert_allclose(conv["gram"], rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
    fisher = (g**2).sum(axis=1).mean(axis=0)  # summed over positions, mean over samples
    np.testing.assert_allclose(conv["fisher"], fisher, rtol=1e-4, atol=1e-8)
    fx2 = np.einsum("npi,npj->ij", p2**2, g**2) / len(x)
    np.testing.assert_allclose(conv["fisher_x2"], fx2, rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(out["fisher"], (g_out**2).mean(0), rtol=1e-4)
    assert conv["t_mean"].shape == (len(x), 4) and np.all(conv["t_mean"] >= 0)
    assert out["kind"] == "dense" and out["gram"].shape == (p2.shape[1] * 4,) * 2


def test_model_fisher_is_the_expected_fisher_of_the_prediction():
    model = _cnn()
    x, _ = _xy(n=3000, seed=1)
    out = S.StatisticsPass(model, S.find_wrappers(model), ("fisher",), seed=0)(x, None)[1]
    p = model.predict(x, verbose=0)
    # For softmax logits E_{y~p}[(e_y - p)_j^2] = p_j (1 - p_j).
    np.testing.assert_allclose(out["fisher"], (p * (1 - p)).mean(0), rtol=0.06)


def test_row_subsampling_is_fixed_and_bounded():
    model = _cnn()
    x, y = _xy()
    sp = S.StatisticsPass(model, S.find_wrappers(model), ("gram", "rows"), max_rows=80)
    a, b = sp(x, y)[0], sp(x, y)[0]
    assert a["z_rows"].shape == (80, 4)  # 2 of 49 positions per sample
    np.testing.assert_array_equal(a["gram"], b["gram"])
    np.testing.assert_array_equal(a["z_rows"], b["z_rows"])


def test_traced_once_and_reused():
    model = _cnn()
    x, y = _xy(n=64)
    sp = S.StatisticsPass(model, S.find_wrappers(model), ("gram", "fisher"), batch_size=32)
    sp(x, y)
    sp(x * 2, y)
    assert [f.experimental_get_tracing_count() for f in sp._fns.values()] == [1]


def test_fisher_on_a_subset_and_gram_cap():
    model = _cnn()
    x, y = _xy(n=64)
    ws = S.find_wrappers(model)
    full = S.StatisticsPass(model, ws, ("gram", "fisher"), fisher="empirical",
                            batch_size=16)(x[:16], y[:16])
    part = S.StatisticsPass(model, ws, ("gram", "fisher"), fisher="empirical", batch_size=16,
                            fisher_samples=16, max_gram_dim=20)(x, y)
    # The Fisher comes from the first 16 samples only; the forward statistics from all 64.
    np.testing.assert_allclose(part[0]["fisher"], full[0]["fisher"], rtol=1e-5)
    assert part[0]["gram"].shape == (18, 18) and "gram" not in part[1]  # 196 inputs > 20
    assert part[1]["x2"].shape == (196,)


def test_nan_activations_name_the_layer():
    model = _cnn()
    x, y = _xy()
    w = S.find_wrappers(model)[0]
    w.layer.kernel.assign(np.full(w.layer.kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match="Layer 'conv' produced NaN"):
        S.StatisticsPass(model, S.find_wrappers(model), ("gram",))(x, y)


def test_unknown_statistics_and_fisher_are_errors():
    model = _cnn()
    with pytest.raises(ValueError, match="Unknown statistics.*'hessian'"):
        S.StatisticsPass(model, S.find_wrappers(model), ("hessian",))
    with pytest.raises(ValueError, match="fisher.*Received: fisher='true'"):
        S.StatisticsPass(model, S.find_wrappers(model), ("gram",), fisher="true")


def test_capture_returns_full_activations():
    model = _cnn()
    x, _ = _xy()
    (xi, z, t), _ = S.capture(model, x, S.find_wrappers(model), batch_size=16)
    assert xi.shape == (40, 9, 9, 2) and z.shape == t.shape == (40, 7, 7, 4)
    np.testing.assert_allclose(t, np.maximum(z, 0.0))


_BACKEND_RUN = """
import sys
import numpy as np, keras
import keras_ibprune as kib
rng = np.random.default_rng(0)
x = rng.normal(size=(120, 8, 8, 1)).astype("float32")
y = rng.integers(0, 4, 120)
inp = keras.Input((8, 8, 1))
h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
h = keras.layers.Dense(8, activation="relu", name="fc")(keras.layers.Flatten()(h))
model = keras.Model(inp, keras.layers.Dense(4, activation="softmax", name="out")(h))
if sys.argv[2] != "-":
    model.load_weights(sys.argv[2])
else:
    model.save_weights(sys.argv[3])
pruned = kib.prune(model)
ws = kib.stats.find_wrappers(pruned)
st = kib.stats.StatisticsPass(pruned, ws, ("gram", "fisher"), fisher="empirical",
                              max_rows=10**6, batch_size=60)(x, y)
np.savez(sys.argv[1], *[s["fisher"] for s in st], *[s["gram"] for s in st])
"""


@pytest.mark.slow
def test_jax_backend_gives_the_same_statistics(tmp_path):
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_BACKEND_RUN)

    def run(backend, out, load, save="-"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        r = subprocess.run([sys.executable, str(script), str(out), str(load), str(save)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    weights = tmp_path / "w.weights.h5"
    run("tensorflow", tmp_path / "tf.npz", "-", weights)
    run("jax", tmp_path / "jax.npz", weights)
    a, b = np.load(tmp_path / "tf.npz"), np.load(tmp_path / "jax.npz")
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-7 * np.abs(a[k]).max())
    assert all(np.abs(a[k]).max() > 0 for k in a.files)
