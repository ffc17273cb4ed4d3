"""The information scores: nats that predict the real loss, the default in `fit`, resume."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

import keras_ibprune as kib
from keras_ibprune import obs
from keras_ibprune import stats as S
from keras_ibprune.information import GaussianOBDScore, IBScore
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
    return [m.numpy() for w in S.find_wrappers(model) for m in w.masks]


def test_saliency_predicts_the_information_actually_lost():
    """ΔI_ij = ½ F_j w_ij² / [H⁻¹]_ii against the measured E KL(p_W ‖ p_W') per weight."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1000)
    x = (rng.normal(size=(1000, 8)) + 1.5 * np.eye(3, 8)[y]).astype("float32")
    inp = keras.Input((8,))
    h = L.Dense(8, activation="relu", name="h")(inp)
    model = keras.Model(inp, L.Dense(3, activation="softmax", name="o")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=15, verbose=0)
    pruned = kib.prune(model)
    ws = S.find_wrappers(pruned)
    stats = S.StatisticsPass(pruned, ws, ("gram", "fisher"), batch_size=1000)(x, y)
    p0 = pruned(x).numpy()
    for w, s in zip(ws, stats):
        fact = obs.Factorization(s["gram"], damping=1e-6)
        k = w.layer.kernel.numpy()
        predicted = obs.saliency(k, fact, s["fisher"])
        actual = np.zeros_like(predicted)
        for i, j in np.ndindex(*k.shape):  # remove one weight, OBS-update its unit
            k2 = k.astype(np.float64).copy()
            k2[:, j] -= k[i, j] / fact.hinv[i, i] * fact.hinv[:, i]
            k2[i, j] = 0.0
            w.layer.kernel.assign(k2.astype("float32"))
            p1 = pruned(x).numpy()
            actual[i, j] = np.mean(np.sum(p0 * (np.log(p0 + 1e-12) - np.log(p1 + 1e-12)), 1))
        w.layer.kernel.assign(k)
        assert spearmanr(predicted.ravel(), actual.ravel())[0] > 0.97, w.name
        assert spearmanr(np.abs(k).ravel(), actual.ravel())[0] < 0.95  # magnitude is not
        # The scale is right: nats predicted ~ nats lost.
        assert 0.8 < np.median(predicted / np.maximum(actual, 1e-12)) < 1.25, w.name


@pytest.mark.jax
def test_ib_default_reaches_target_with_one_global_threshold(digits, tmp_path):
    x, y = digits
    model = kib.prune(_cnn())
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 2), held_out=(x[:256], y[:256]),
                       log_information=True, layer_logs="epoch")
    csv = tmp_path / "log.csv"
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0,
                        callbacks=[cb, keras.callbacks.CSVLogger(str(csv))])
    assert isinstance(cb.pruner.score, IBScore) and cb.pruner.allocation == "global"
    assert kib.sparsity(model) == pytest.approx(0.8, abs=2e-3)
    h = history.history
    for layer in ("conv", "fc1", "logits"):
        assert len(h[f"I_TY/{layer}"]) == 3 and len(h[f"I_XT/{layer}"]) == 3
        assert all(0 <= v <= np.log(10) for v in h[f"I_TY/{layer}"])  # bounded by H(Y)
    assert "I_TY/fc1" in csv.read_text().splitlines()[0]
    assert np.all(_masks(model)[-1].sum(axis=0) >= 1)  # every output unit stays connected
    layer_sparsity = {round(v, 2) for k, v in cb.pruner.logs().items() if "sparsity/" in k}
    assert len(layer_sparsity) > 1  # nats allocate unevenly across layers
    assert len(plot_information_plane(history).lines) == 3


def test_information_logs_only_when_asked(digits):
    x, y = digits
    model = kib.prune(_cnn())
    h = _fit(model, kib.IBPruning(kib.OneShot(0.5), held_out=(x[:200], y[:200])), x, y, 2)
    assert not [k for k in h.history if k.startswith("I_")]


def test_reconstruction_keeps_zeros_and_beats_plain_masking(digits):
    x, y = digits
    model = _cnn()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=4, verbose=0)
    losses = {}
    for rec in (True, False):
        pruned = kib.prune(model)
        pruned.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
        pruner = kib.Pruner(pruned, kib.ConstantSparsity(0.8),
                            score=IBScore(reconstruct=rec), held_out=(x[:300], y[:300]))
        pruner.reset()
        pruner.update(1, force=True)
        for w in S.find_wrappers(pruned):
            assert np.all(w.layer.kernel.numpy()[w.masks[0].numpy() == 0] == 0.0)
        losses[rec] = pruned.evaluate(x[300:], y[300:], verbose=0)
    assert losses[True] < losses[False]


@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
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


@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
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


@pytest.mark.parametrize("fisher", ["model", "empirical"])
def test_regression_targets(digits, fisher):
    x, _ = digits
    target = x.reshape(len(x), -1)[:, :8].sum(1, keepdims=True).astype("float32")
    model = kib.prune(_cnn(outputs=1, activation=None))
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=(x[:200], target[:200]),
                       score=IBScore(fisher=fisher), log_information=True)
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
    for w in S.find_wrappers(model)[1:]:  # both output layers keep every unit connected
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
    cb = kib.IBPruning(kib.OneShot(0.5), held_out=(x[:200], y[:200]))
    _fit(model, cb, x, y, epochs=1)
    kept = [w.unit_mask.numpy().mean() for w in S.find_wrappers(model)]
    assert kept[0] == pytest.approx(0.5) and kept[1] == pytest.approx(0.5)


def test_legacy_gaussian_obd_score_still_available(digits):
    x, y = digits
    model = kib.prune(_cnn())
    cb = kib.IBPruning(kib.OneShot(0.7), score="gaussian_obd", held_out=(x[:200], y[:200]))
    _fit(model, cb, x, y, epochs=1)
    assert isinstance(cb.pruner.score, GaussianOBDScore)
    assert cb.pruner.allocation == "global_erk_floor"
    assert kib.sparsity(model) == pytest.approx(0.7, abs=2e-3)


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
        ("shape", r"held-out x does not fit the model input"),
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


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="Unknown allocation"):
        kib.IBPruning(kib.OneShot(0.5), allocation="waterfill")
    with pytest.raises(ValueError, match="Unknown estimator"):
        IBScore(estimator="knn")
    with pytest.raises(ValueError, match="`fisher` must be.*Received: fisher='true'"):
        IBScore(fisher="true")
    with pytest.raises(ValueError, match="`damping` must be > 0"):
        IBScore(damping=0)
    with pytest.raises(ValueError, match="keep_connected"):
        kib.Pruner(kib.prune(_cnn()), 0.5, score="magnitude", keep_connected="some")


def test_plot_information_plane_without_entries():
    with pytest.raises(ValueError, match="No information-plane entries"):
        plot_information_plane({"loss": [1.0]})


@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
def test_ib_default_on_embedding_attention_and_lstm():
    inp = keras.Input((6,))
    e = L.Embedding(30, 8, name="emb")(inp)
    a = L.MultiHeadAttention(2, 4, name="mha")(e, e)
    r = L.LSTM(5, name="lstm")(a)
    model = kib.prune(keras.Model(inp, L.Dense(3, activation="softmax", name="out")(r)))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, (120, 6)), rng.integers(0, 3, 120)
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.7, 0, 1), held_out=(x, y),
                       log_information=True)
    h = _fit(model, cb, x, y, epochs=2)
    assert kib.sparsity(model) == pytest.approx(0.7, abs=2e-3)
    assert {"I_TY/mha", "I_XT/lstm", "I_TY/emb"} <= set(h.history)


_RUN = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, keras, tensorflow as tf
    import keras_ibprune as kib
    tf.config.experimental.enable_op_determinism()
    backup, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    y = (x[:, :4].sum((1, 2, 3)) > 0).astype("int64") + 2 * (x[:, 4:].mean((1, 2, 3)) > 0)
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Dense(16, activation="relu", name="fc")(keras.layers.Flatten()(h))
    model = kib.prune(keras.Model(inp, keras.layers.Dense(4, activation="softmax")(h)))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    cbs = [kib.IBPruning(kib.PolynomialDecay(0.0, 0.9, 0, 5), held_out=(x[:128], y[:128])),
           keras.callbacks.BackupAndRestore(backup), Kill()]
    model.fit(x, y, batch_size=32, epochs=6, verbose=0, shuffle=False, callbacks=cbs)
    np.savez(out, *[m.numpy() for w in kib.stats.find_wrappers(model) for m in w.masks])
""")


@pytest.mark.slow
def test_sigkill_and_backup_and_restore_give_the_same_masks(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

    def run(backup, out, kill_at):
        return subprocess.run([sys.executable, str(script), str(tmp_path / backup),
                               str(tmp_path / out), str(kill_at)], env=env,
                              capture_output=True, text=True, timeout=300)

    assert run("a", "full.npz", -1).returncode == 0
    killed = run("b", "never.npz", 2)
    assert killed.returncode == -9 and not (tmp_path / "never.npz").exists()
    resumed = run("b", "resumed.npz", -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, res = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert len(full.files) == 3
    for k in full.files:
        np.testing.assert_array_equal(full[k], res[k])
    assert 0.89 < 1 - np.mean(np.concatenate([full[k].ravel() for k in full.files])) < 0.91
