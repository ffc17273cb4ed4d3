"""Tests for keras_ibprune.gates: VIB gates, their KL term, the "vib" score, folding."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_ibprune as kib
from keras_ibprune.gates import gated_wrappers
from keras_ibprune.stats import find_wrappers


def coupled_cnn():
    """BatchNorm, a residual Add and a Concatenate, with relu and tanh producers."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    a = L.ReLU()(L.BatchNormalization(name="bn_a")(a))
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="b")(a)
    c = L.Conv2D(8, 1, name="c")(inp)
    h = L.Add(name="add")([b, c])
    d = L.Conv2D(4, 3, padding="same", activation="tanh", name="d")(h)
    h = L.Concatenate(name="cat")([h, d])
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dense(6, activation="relu", name="fc")(h)
    return keras.Model(inp, L.Dense(3, name="out")(h))


def randomize_gates(model, seed=0):
    rng = np.random.default_rng(seed)
    for w in gated_wrappers(model):
        n = w.gate.mu.shape[0]
        w.gate.mu.assign(rng.uniform(0.2, 2.0, n).astype("float32"))
        w.gate.log_sigma2.assign(rng.uniform(-6, 2, n).astype("float32"))


def x_img(n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype("float32")


def test_gated_predict_is_deterministic_and_training_is_noisy():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib")
    randomize_gates(model)
    x = x_img()
    p1, p2 = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(p1, model(x, training=False).numpy(), atol=1e-6)
    t1, t2 = model(x, training=True).numpy(), model(x, training=True).numpy()
    assert np.abs(t1 - t2).max() > 1e-3  # z = μ + σ ε in training only
    # The output layer keeps every channel: it gets no gate.
    assert sorted(w.layer.name for w in gated_wrappers(model)) == ["a", "b", "c", "d", "fc"]
    assert model.get_layer("prune_d").gate.pre  # tanh: the gate scales the pre-activation
    assert not model.get_layer("prune_b").gate.pre


def test_kl_term_is_in_model_losses():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib", gamma=0.5)
    randomize_gates(model)
    model(x_img())
    losses = [float(v) for v in model.losses]
    expected = [
        0.5 * np.sum(np.log1p(w.gate.alpha())) for w in find_wrappers(model) if w.gate is not None
    ]
    np.testing.assert_allclose(sorted(losses), sorted(expected), rtol=1e-5)
    # Masked units leave the bound; γ is per layer and settable without a rebuild.
    w = model.get_layer("prune_fc")
    w.unit_mask.assign(np.array([1, 1, 0, 0, 0, 0], "float32"))
    kib.set_gate_gamma(model, 2.0, layers=["fc"])
    model(x_img())
    expected_fc = 2.0 * np.sum(np.log1p(w.gate.alpha()[:2]))
    assert any(abs(float(v) - expected_fc) < 1e-4 * expected_fc for v in model.losses)


@pytest.mark.slow
def test_kl_drives_alpha_of_noise_units_down():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype("float32")
    y = (x[:, :8] @ rng.normal(size=8) > 0).astype("int64")  # inputs 8..15 are noise
    inp = keras.Input((16,))
    # Hidden unit j copies input j (frozen identity), so units 8..15 carry only noise.
    h = L.Dense(16, kernel_initializer="identity", use_bias=False, trainable=False, name="copy")(
        inp
    )
    out = L.Dense(2, name="out")(h)
    model = kib.prune(keras.Model(inp, out), granularity="channel", gates="vib", gamma=1e-2)
    gate = model.get_layer("prune_copy").gate
    before = gate.alpha()
    model.compile(
        keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    kl0 = float(model.losses[0]) if model.losses else None
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    model(x[:4])
    assert kl0 is None or float(model.losses[0]) < kl0
    alpha = gate.alpha()
    assert np.all(alpha[8:] < before[8:])
    # Every noise unit ends below every informative one (one ranking: "vib" score).
    assert alpha[8:].max() < alpha[:8].min()
    assert np.median(np.log(alpha[:8] + 1e-30)) - np.median(np.log(alpha[8:] + 1e-30)) > 2.0


def test_shrink_of_gated_model_matches_masked_model():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib")
    randomize_gates(model)
    cb = kib.IBPruning(kib.OneShot(0.5), score="vib", target="flops")
    cb.set_model(model)
    cb.on_train_begin()
    cb.pruner.update(1, force=True)
    assert cb.pruner._channels.removed() >= 0.5
    x = x_img(16)
    masked = model.predict(x, verbose=0)
    small = kib.shrink(model)
    assert kib.count_flops(small) < 0.5 * kib.count_flops(coupled_cnn())
    np.testing.assert_allclose(small.predict(x, verbose=0), masked, atol=1e-5)
    # The lowest-α units went first (a singleton group: the dense layer).
    fc = model.get_layer("prune_fc")
    kept, alpha = fc.unit_mask.numpy() > 0, fc.gate.alpha()
    if kept.any() and (~kept).any():
        assert alpha[~kept].max() <= alpha[kept].min()
    assert not any("gate" in v.path for v in small.weights)


def test_strip_folds_gates_into_weights():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib")
    randomize_gates(model, seed=3)
    x = x_img()
    stripped = kib.strip_pruning(model)
    assert not any("gate" in v.path for v in stripped.weights)
    assert not find_wrappers(stripped)
    assert len(stripped.weights) == len(coupled_cnn().weights)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def test_coupled_groups_are_scored_and_removed_together():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib")
    randomize_gates(model, seed=1)
    groups = {g.layers: g for g in kib.channel_groups(model)}
    assert ("prune_b", "prune_c") in groups  # Add couples b and c
    # One score per group channel: the members' α summed.
    b, c = model.get_layer("prune_b").gate, model.get_layer("prune_c").gate
    b.mu.assign(np.r_[np.full(4, 1e-3), np.ones(4)].astype("float32"))
    c.mu.assign(np.r_[np.full(4, 1e-3), np.ones(4)].astype("float32"))
    b.mu.assign(b.mu.numpy() * np.r_[1, 1, 1, 1, 1, 1, 1, 1e-3].astype("float32"))  # b alone
    pruner = kib.Pruner(model, kib.OneShot(0.25), score="vib", allocation="uniform")
    pruner.reset()
    pruner.update(1, force=True)
    kb = model.get_layer("prune_b").unit_mask.numpy()
    kc = model.get_layer("prune_c").unit_mask.numpy()
    np.testing.assert_array_equal(kb, kc)  # one decision for the coupled channels
    np.testing.assert_array_equal(kb, [0, 0, 1, 1, 1, 1, 1, 1])  # c keeps channel 7 alive
    # BatchNorm passes `a`'s gate through: one gate for conv a + bn_a, nothing on bn_a.
    assert model.get_layer("bn_a").weights and not hasattr(model.get_layer("bn_a"), "gate")
    x = x_img(8)
    np.testing.assert_allclose(
        kib.shrink(model).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def mlp():
    inp = keras.Input((12,))
    h = L.Dense(16, activation="relu", name="a")(inp)
    h = L.Dense(8, activation="tanh", name="fc")(h)
    return keras.Model(inp, L.Dense(3, name="out")(h))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:IBPruning")
def test_save_load_mid_training_resumes(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    model = kib.prune(mlp(), granularity="channel", gates="vib", gamma={"fc": 1e-2, "a": 1e-3})
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), score="vib", target="flops")
    hist = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    for key in ("vib/kl", "vib/alpha/fc", "vib/log_alpha/fc", "vib/units/fc"):
        assert key in hist.history
    path = tmp_path / "mid.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom objects
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.get_layer("prune_fc").gate_gamma == pytest.approx(1e-2)
    assert float(loaded.get_layer("prune_a").gate.gamma.numpy()) == pytest.approx(1e-3)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    cb2 = kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), score="vib", target="flops")
    hist = loaded.fit(x, y, epochs=2, initial_epoch=1, batch_size=16, verbose=0, callbacks=[cb2])
    assert hist.history["flops_removed"][-1] >= 0.5
    assert np.isfinite(hist.history["loss"]).all()


def test_plot_units_kept():
    hist = {"vib/units/fc": [6, 5, 3], "vib/log_alpha/fc": [5.0, 2.0, 1.0], "loss": [1, 1, 1]}
    ax = kib.plot_units_kept(hist)
    assert ax.get_ylabel() == "units kept" and len(ax.lines) == 1
    with pytest.raises(ValueError, match="vib/units"):
        kib.plot_units_kept({"loss": [1.0]})


def test_bad_arguments():
    with pytest.raises(ValueError, match="granularity='channel'"):
        kib.prune(coupled_cnn(), gates="vib")
    with pytest.raises(ValueError, match="Received: gates='ib'"):
        kib.prune(coupled_cnn(), granularity="channel", gates="ib")
    with pytest.raises(ValueError, match="non-negative"):
        kib.prune(coupled_cnn(), granularity="channel", gates="vib", gamma=-1)
    with pytest.raises(ValueError, match="not gated"):
        kib.prune(coupled_cnn(), granularity="channel", gates="vib", gamma={"nope": 1.0})
    with pytest.raises(ValueError, match="only"):
        kib.prune(coupled_cnn(), granularity="channel", gamma=1.0)
    plain = kib.prune(coupled_cnn(), granularity="channel")
    with pytest.raises(ValueError, match="gates='vib'"):
        p = kib.Pruner(plain, kib.OneShot(0.5), score="vib")
        p.reset()
        p.update(1, force=True)
    with pytest.raises(ValueError, match="no VIB gates"):
        kib.set_gate_gamma(plain, 1.0)
