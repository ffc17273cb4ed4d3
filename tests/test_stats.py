"""The compiled statistics pass against brute force (patches, Fisher, NaN, tracing)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _cases import MIRRORED_SETUP

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


# ------------------------------------------------- several inputs and outputs
def _two_input_two_output(dict_outputs=True):
    """Token ids (Embedding) + a numeric branch, concatenated; a class and a value head."""
    ids = keras.Input((8,), dtype="int32", name="token_ids")
    num = keras.Input((4,), name="numeric")
    e = L.GlobalAveragePooling1D()(L.Embedding(30, 8, name="emb")(ids))
    h = L.Dense(8, activation="relu", name="num_fc")(num)
    z = L.Dense(16, activation="relu", name="mix")(L.Concatenate()([e, h]))
    cls, reg = L.Dense(3, name="cls")(z), L.Dense(1, name="reg")(h)
    outputs = {"cls": cls, "reg": reg} if dict_outputs else [cls, reg]
    return keras.Model({"token_ids": ids, "numeric": num}, outputs)


def _two_input_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30, (n, 8)).astype("int32")
    num = rng.normal(size=(n, 4)).astype("float32")
    return {"token_ids": ids, "numeric": num}, {"cls": ids[:, 0] % 3, "reg": num[:, :1]}


@pytest.mark.parametrize("dict_outputs", [True, False])
@pytest.mark.slow  # >= 2.5 s on 2 cores: run by .ci/run's slow pass
def test_statistics_of_a_two_input_model_follow_the_chosen_output(dict_outputs):
    model = kib.prune(_two_input_two_output(dict_outputs))
    x, _ = _two_input_data(40)
    wrappers = S.find_wrappers(model)
    names = [w.layer.name for w in wrappers]
    by_output = {}
    for output in ("cls", "reg"):
        stats = S.StatisticsPass(model, wrappers, ("x2", "gram", "fisher"), output=output,
                                 batch_size=16)(x, None)
        by_output[output] = dict(zip(names, stats))
    num_fc = by_output["cls"]["num_fc"]
    np.testing.assert_allclose(num_fc["x2"], np.mean(x["numeric"] ** 2, axis=0),
                               rtol=1e-5)  # the numeric input reached its layer
    np.testing.assert_allclose(num_fc["gram"], x["numeric"].T @ x["numeric"] / 40, rtol=1e-4)
    for output, other in (("cls", "reg"), ("reg", "cls")):
        stats = by_output[output]
        assert np.all(stats[other]["fisher"] == 0)  # a head that does not feed `output`
        assert np.all(stats[output]["fisher"] > 0)
        assert all(np.all(np.isfinite(s["z2"])) for s in stats.values())
    assert np.all(by_output["reg"]["emb"]["fisher"] == 0)  # ids only reach "cls"
    assert np.any(by_output["cls"]["emb"]["fisher"] > 0)
    with pytest.raises(ValueError, match=r"names none of the model's outputs"):
        S.StatisticsPass(model, wrappers, ("fisher",), output="logits")


@pytest.mark.parametrize("score", ["ib", "obs", "activation"])
@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
def test_pruning_a_two_input_two_output_model_from_dict_held_out_data(score):
    model = kib.prune(_two_input_two_output())
    model.compile("adam", {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           "reg": "mse"})
    x, y = _two_input_data(120)
    before = {w.layer.name: [keras.ops.convert_to_numpy(m) for m in w.masks]
              for w in S.find_wrappers(model)}
    cb = kib.IBPruning(0.5, score=None if score == "ib" else score,
                       held_out=({k: v[:60] for k, v in x.items()}, y["cls"][:60]),
                       output="cls")
    model.fit(x, y, epochs=1, batch_size=40, verbose=0, callbacks=[cb])
    assert type(cb.score).__name__ == {"ib": "IBScore", "obs": "OBSScore",
                                       "activation": "ActivationScore"}[score]
    assert cb.pruner.current_sparsity() == pytest.approx(0.5, abs=0.02)
    changed = [name for name, w in ((w.layer.name, w) for w in S.find_wrappers(model))
               if any(np.any(keras.ops.convert_to_numpy(m) != b)
                      for m, b in zip(w.masks, before[name]))]
    assert len(changed) >= 2
    assert all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.weights)
    pred = model.predict(x, verbose=0)
    assert np.all(np.isfinite(pred["cls"])) and np.all(np.isfinite(pred["reg"]))


# ------------------------------------------ streaming, batching and sharding independence
def _assert_same_statistics(a, b, rtol=1e-5):
    for sa, sb in zip(a, b):
        assert set(sa) == set(sb), set(sa) ^ set(sb)
        for k, v in sa.items():
            if isinstance(v, np.ndarray):
                scale = np.abs(v).max() + 1e-30
                np.testing.assert_allclose(sb[k], v, rtol=rtol, atol=rtol * scale, err_msg=k)


def test_statistics_do_not_depend_on_the_batch_size():
    """Sampled conv rows and sampled labels follow each sample's global index."""
    model = _cnn()
    x, y = _xy(n=40)
    ws = S.find_wrappers(model)
    runs = [S.StatisticsPass(model, ws, S.STATISTICS, max_rows=80, batch_size=b)(x, y)
            for b in (16, 40)]
    assert runs[0][0]["z_rows"].shape == (80, 4)  # 2 of 49 positions per sample
    _assert_same_statistics(*runs)


@pytest.mark.parametrize("form", ["unbatched", "batched_7", "callable"])
@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
def test_a_streamed_dataset_gives_the_statistics_of_the_arrays(form):
    from keras_ibprune.stream import HeldOutStream

    model = _cnn()
    x, y = _xy(n=50)
    ws = S.find_wrappers(model)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    source = {"unbatched": ds, "batched_7": ds.batch(7),
              "callable": lambda: ((x[i:i + 9], y[i:i + 9]) for i in range(0, 50, 9))}[form]
    stream = HeldOutStream(source, model)
    n, labels = stream.scan()
    assert n == 50 and np.array_equal(labels, y)
    needs = S.STATISTICS
    ref = S.StatisticsPass(model, ws, needs, max_rows=120, batch_size=16)(x, y)
    got = S.StatisticsPass(model, ws, needs, max_rows=120, batch_size=16)(stream, labels)
    _assert_same_statistics(ref, got)


def test_streamed_per_sample_statistics_are_capped():
    model = _cnn()
    x, y = _xy(n=50)
    ws = S.find_wrappers(model)
    sp = S.StatisticsPass(model, ws, ("gram", "t_mean", "rows"), max_rows=100, batch_size=16,
                          sample_cap=20)
    out = sp(x, y)
    full = S.StatisticsPass(model, ws, ("gram", "t_mean", "rows"), max_rows=100)(x, y)
    assert out[0]["samples"] == 20 and out[0]["t_mean"].shape == (20, 4)
    np.testing.assert_allclose(out[0]["t_mean"], full[0]["t_mean"][:20], rtol=1e-5)
    np.testing.assert_allclose(out[0]["z_rows"], full[0]["z_rows"][:40], rtol=1e-5)
    np.testing.assert_allclose(out[0]["gram"], full[0]["gram"], rtol=1e-5,  # all 50
                               atol=1e-6 * np.abs(full[0]["gram"]).max())


def test_bad_strategy_is_an_error():
    model = _cnn()
    with pytest.raises(ValueError, match="None or a tf.distribute.Strategy"):
        S.StatisticsPass(model, S.find_wrappers(model), ("gram",), strategy="mirrored")


_MIRRORED = MIRRORED_SETUP + """
from keras_ibprune import stats as S
assert strategy.num_replicas_in_sync == 2
keras.utils.set_random_seed(0)
with strategy.scope():
    model = kib.prune(small_cnn())
    model.build((None, 8, 8, 1))
ws = S.find_wrappers(model)
for fisher in ("model", "empirical"):
    ref = S.StatisticsPass(model, ws, S.STATISTICS, fisher=fisher, max_rows=200,
                           batch_size=64)(x, y)
    sharded = S.StatisticsPass(model, ws, S.STATISTICS, fisher=fisher, max_rows=200,
                               batch_size=64, strategy=strategy)
    got = sharded(x, y)
    calls = [f.experimental_get_tracing_count() for f in sharded._fns.values()]
    worst = 0.0
    for a, b in zip(ref, got):
        assert set(a) == set(b), set(a) ^ set(b)
        for k, v in a.items():
            if isinstance(v, np.ndarray):
                assert v.shape == b[k].shape, (k, v.shape, b[k].shape)
                worst = max(worst, float(np.abs(v - b[k]).max() / (np.abs(v).max() + 1e-30)))
    print("RESULT", fisher, worst < 1e-5, worst, calls)
"""


@pytest.mark.slow
def test_mirrored_strategy_shards_give_the_single_device_statistics(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert "RESULT model True" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "RESULT empirical True" in r.stdout, r.stdout + r.stderr[-3000:]


def test_mixed_precision_statistics_are_accumulated_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = kib.prune(keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(), keras.layers.Dense(10, dtype="float32")]))
        x = np.random.default_rng(0).normal(size=(512, 8, 8, 1)).astype("float32") * 30
        stats = S.StatisticsPass(model, S.find_wrappers(model), ("gram", "x2"))(x, None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    gram = stats[1]["gram"]  # the Dense layer's 576 x 576 input Gram (ReLU: rank-deficient)
    eig = np.linalg.eigvalsh(gram)
    assert eig.min() >= -1e-5 * eig.max()  # positive semi-definite up to float32 rounding
    # float16 sums of 512 squares of ~30-scale inputs would overflow past 65504
    assert np.all(np.isfinite(gram)) and np.all(np.isfinite(stats[1]["x2"]))
