"""Callback-level tests of the information-bottleneck default (`IBPruning` + `IBScore`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_ibprune as kib
from keras_ibprune.scores import IBScore
from keras_ibprune.summary import plot_information_plane

L = keras.layers


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    return x[:600], d.target[:600].astype("int64")


def _cnn(outputs=10, activation="softmax"):
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = L.MaxPooling2D()(h)
    h = L.Flatten()(h)
    h = L.Dense(32, activation="relu", name="fc1")(h)
    out = L.Dense(outputs, activation=activation, name="logits")(h)
    return keras.Model(inp, out, name="cnn")


def _fit(model, cb, x, y, epochs=3, loss="sparse_categorical_crossentropy"):
    model.compile(keras.optimizers.Adam(3e-3), loss)
    return model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[cb])


def _masks(model):
    return [m.numpy() for w in kib.stats.find_wrappers(model) for m in w.masks]


def test_ib_default_reaches_target_and_logs_information(digits, tmp_path):
    x, y = digits
    model = kib.prune(_cnn())
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 2), held_out=(x[:256], y[:256]))
    csv = tmp_path / "log.csv"
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0,
                        callbacks=[cb, keras.callbacks.CSVLogger(str(csv))])
    assert isinstance(cb.pruner.score, IBScore) and cb.pruner.allocation == "ib"
    assert kib.sparsity(model) == pytest.approx(0.8, abs=2e-3)
    h = history.history
    for layer in ("conv", "fc1", "logits"):
        assert len(h[f"I_TY/{layer}"]) == 3 and len(h[f"I_XT/{layer}"]) == 3
        assert all(np.isfinite(h[f"I_TY/{layer}"])) and min(h[f"I_XT/{layer}"]) >= 0
        assert f"sparsity/{layer}" in h
    assert "I_TY/fc1" in csv.read_text().splitlines()[0]
    # Every output unit keeps at least one incoming weight.
    logits_mask = _masks(model)[-1]
    assert np.all(logits_mask.sum(axis=0) >= 1)
    # The IB allocation differs from uniform: the layers end up at different sparsities.
    assert len({round(v, 2) for k, v in cb.pruner.logs().items() if "sparsity/" in k}) > 1
    ax = plot_information_plane(history)
    assert len(ax.lines) == 3


def test_ib_is_deterministic(digits):
    x, y = digits
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        model = kib.prune(_cnn())
        _fit(model, kib.IBPruning(kib.PolynomialDecay(0.0, 0.7, 0, 2),
                                  held_out=(x[:200], y[:200])), x, y, epochs=2)
        runs.append(_masks(model))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_label_free_mode_uses_the_dense_teacher(digits):
    x, y = digits
    model = kib.prune(_cnn())
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0)
    teacher = np.argmax(model.predict(x[:200], verbose=0), axis=1)
    cb = kib.IBPruning(kib.OneShot(0.6), held_out=(x[:200], None))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    np.testing.assert_array_equal(cb.pruner._data[1], teacher)
    assert kib.sparsity(model) == pytest.approx(0.6, abs=2e-3)


def test_regression_targets(digits):
    x, _ = digits
    target = x.reshape(len(x), -1)[:, :8].sum(1, keepdims=True).astype("float32")
    model = kib.prune(_cnn(outputs=1, activation=None))
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=(x[:200], target[:200]))
    h = _fit(model, cb, x, target, epochs=1, loss="mse")
    assert kib.sparsity(model) == pytest.approx(0.5, abs=2e-3)
    assert h.history["I_TY/fc1"][0] > 0


def test_multi_output_model_and_tf_dataset(digits):
    x, y = digits
    inp = keras.Input((8, 8, 1))
    h = L.Dense(16, activation="relu", name="fc")(L.Flatten()(inp))
    a = L.Dense(10, activation="softmax", name="cls")(h)
    b = L.Dense(1, name="reg")(h)
    model = kib.prune(keras.Model(inp, [a, b]))
    model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    reg = y.astype("float32")[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, (y, reg))).batch(50).repeat()
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=ds, held_out_size=150, output=0)
    model.fit(x, (y, reg), epochs=1, verbose=0, callbacks=[cb])
    assert len(cb.pruner._data[0]) == 150
    assert kib.sparsity(model) == pytest.approx(0.5, abs=2e-3)
    # Both output layers keep every unit connected.
    for w in kib.stats.find_wrappers(model)[1:]:
        assert np.all(w.masks[0].numpy().sum(axis=0) >= 1)


def test_exclude_keeps_a_layer_dense(digits):
    x, y = digits
    model = kib.prune(_cnn())
    cb = kib.IBPruning(kib.OneShot(0.7), held_out=(x[:200], y[:200]), exclude=["conv"])
    _fit(model, cb, x, y, epochs=1)
    logs = cb.pruner.logs()
    assert logs["sparsity/conv"] == 0.0 and logs["sparsity/fc1"] > 0.5
    with pytest.raises(ValueError, match="`exclude` names no wrapped layer"):
        _fit(kib.prune(_cnn()), kib.IBPruning(kib.OneShot(0.5), held_out=(x, y),
                                                exclude=["nope"]), x, y, epochs=1)


def test_channel_granularity_uses_ib_unit_scores(digits):
    x, y = digits
    model = kib.prune(_cnn(), granularity="channel")
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=(x[:200], y[:200]), allocation="uniform")
    _fit(model, cb, x, y, epochs=1)
    kept = [w.unit_mask.numpy().mean() for w in kib.stats.find_wrappers(model)]
    assert kept[0] == pytest.approx(0.5) and kept[1] == pytest.approx(0.5)


def test_default_without_held_out_warns_and_uses_magnitude(digits):
    x, y = digits
    model = kib.prune(_cnn())
    with pytest.warns(UserWarning, match="needs held-out data"):
        _fit(model, kib.IBPruning(kib.OneShot(0.5)), x, y, epochs=1)
    assert kib.sparsity(model) == pytest.approx(0.5, abs=2e-3)


@pytest.mark.parametrize(
    "held_out,match",
    [
        ("nan", r"Held-out x contains NaN"),
        ("mismatch", r"same number of samples"),
        ("rare", r"at least 2 samples"),
        ("single", r"single class.*label-free mode"),
        ("shape", r"does not fit the input"),
    ],
)
def test_bad_input_errors_at_train_begin(digits, held_out, match):
    x, y = digits
    xs, ys = x[:100].copy(), y[:100].copy()
    if held_out == "nan":
        xs[7, 2, 2, 0] = np.inf
    elif held_out == "mismatch":
        ys = ys[:90]
    elif held_out == "rare":
        ys[:] = np.arange(100) % 2
        ys[0] = 5
    elif held_out == "single":
        ys[:] = 3
    elif held_out == "shape":
        xs = np.zeros((100, 28, 28, 1), "float32")
    model = kib.prune(_cnn())
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=(xs, ys))
    with pytest.raises(ValueError, match=match):
        _fit(model, cb, x, y, epochs=1)
    assert kib.sparsity(model) == 0.0  # raised before any mask changed


def test_unknown_names():
    with pytest.raises(ValueError, match="Unknown allocation"):
        kib.IBPruning(kib.OneShot(0.5), allocation="waterfill")
    with pytest.raises(ValueError, match="Unknown estimator"):
        kib.IBPruning(kib.OneShot(0.5), score=IBScore(estimator="knn"))
    with pytest.raises(ValueError, match="keep_connected"):
        kib.Pruner(kib.prune(_cnn()), 0.5, score="magnitude", keep_connected="some")


def test_plot_information_plane_without_entries():
    with pytest.raises(ValueError, match="No information-plane entries"):
        plot_information_plane({"loss": [1.0]})


def test_ib_default_on_embedding_attention_and_lstm():
    inp = keras.Input((6,))
    e = L.Embedding(30, 8, name="emb")(inp)
    a = L.MultiHeadAttention(2, 4, name="mha")(e, e)
    r = L.LSTM(5, name="lstm")(a)
    model = kib.prune(keras.Model(inp, L.Dense(3, activation="softmax", name="out")(r)))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, (120, 6)), rng.integers(0, 3, 120)
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.7, 0, 1), held_out=(x, y))
    h = _fit(model, cb, x, y, epochs=2)
    assert kib.sparsity(model) == pytest.approx(0.7, abs=2e-3)
    assert {"I_TY/mha", "I_XT/lstm", "I_TY/emb"} <= set(h.history)
