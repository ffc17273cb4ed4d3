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


def unique_gates(model):
    out = []
    for w in gated_wrappers(model):
        if all(w.gate is not g for g in out):
            out.append(w.gate)
    return out


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
    expected = [0.5 * np.sum(np.log1p(g.alpha())) for g in unique_gates(model)]  # b, c: one
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
    # One gate for b and c: one α per group channel, one decision for both layers.
    b, c = model.get_layer("prune_b").gate, model.get_layer("prune_c").gate
    assert b is c
    b.mu.assign(np.r_[np.full(4, 1e-3), np.ones(3), 1e-4].astype("float32"))
    b.log_sigma2.assign(np.zeros(8, "float32"))
    pruner = kib.Pruner(model, kib.OneShot(0.25), score="vib", allocation="uniform")
    pruner.reset()
    pruner.update(1, force=True)
    kb = model.get_layer("prune_b").unit_mask.numpy()
    kc = model.get_layer("prune_c").unit_mask.numpy()
    np.testing.assert_array_equal(kb, kc)  # one decision for the coupled channels
    np.testing.assert_array_equal(kb, [0, 1, 1, 1, 1, 1, 1, 0])  # the two lowest α
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


# ------------------------------------------------------ residual Add: one gate per unit
def residual_mlp():
    """Two Dense branches (relu and linear) summed by a residual Add, then a head."""
    inp = keras.Input((6,))
    a = L.Dense(8, activation="relu", name="a")(inp)
    b = L.Dense(8, activation="relu", name="b")(a)
    c = L.Dense(8, name="c")(inp)
    h = L.Add(name="add")([b, c])
    return keras.Model(inp, L.Dense(3, name="out")(h))


@pytest.mark.parametrize("build", [residual_mlp, coupled_cnn])
def test_residual_add_members_share_one_gate(build):
    model = kib.prune(build(), granularity="channel", gates="vib")
    b, c = model.get_layer("prune_b"), model.get_layer("prune_c")
    assert b.gate is c.gate and b.gate.mu is c.gate.mu
    n_gated = 2 if build is residual_mlp else 4  # a, {b, c} (+ d, fc in the CNN)
    for weights in (model.weights, model.trainable_weights):
        paths = [v.path for v in weights]
        assert len(paths) == len(set(paths))
        assert sum("gate_mu" in p for p in paths) == n_gated
    assert sum("gate_mu" in v.path for v in c.weights) == 0  # c references b's gate
    assert c.get_config()["gate_shared_with"] == "prune_b"


def test_shared_gate_kl_counted_once_per_unit():
    model = kib.prune(residual_mlp(), granularity="channel", gates="vib", gamma=0.5)
    randomize_gates(model)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    model(x)
    a, b = model.get_layer("prune_a").gate, model.get_layer("prune_b").gate
    expected = [0.5 * np.sum(np.log1p(g.alpha())) for g in (a, b)]  # b's units once
    assert unique_gates(model) == [a, b]
    np.testing.assert_allclose(sorted(float(v) for v in model.losses), sorted(expected), rtol=1e-5)
    logs = kib.gates.logs(find_wrappers(model))
    np.testing.assert_allclose(logs["vib/kl"], sum(expected) / 0.5, rtol=1e-5)


def test_shared_gate_alpha_counts_once_in_global_ranking():
    model = kib.prune(residual_mlp(), granularity="channel", gates="vib")
    a, b = model.get_layer("prune_a"), model.get_layer("prune_b")
    b.gate.mu.assign(np.ones(8, "float32"))  # α = 1 on every b/c channel
    b.gate.log_sigma2.assign(np.zeros(8, "float32"))
    a.gate.mu.assign(np.r_[np.full(4, 1.5**0.5), np.full(4, 10.0)].astype("float32"))
    a.gate.log_sigma2.assign(np.zeros(8, "float32"))  # α = 1.5 on four units of a
    pruner = kib.Pruner(model, kib.OneShot(0.1), score="vib", allocation="global")
    pruner.reset()
    pruner.update(1, force=True)
    # Two channels go: those of the b/c group (α 1 < 1.5), not a's (summed α would be 2).
    np.testing.assert_array_equal(a.unit_mask.numpy(), np.ones(8))
    assert b.unit_mask.numpy().sum() == 6


def twin_branches():
    """b and c both copy the input (identity kernels): their gated outputs are `x ⊙ z`."""
    inp = keras.Input((8,))
    eye = keras.initializers.Identity()
    b = L.Dense(8, kernel_initializer=eye, name="b")(inp)
    c = L.Dense(8, kernel_initializer=eye, name="c")(inp)
    h = L.Add(name="add")([b, c])
    return keras.Model(inp, L.Dense(3, name="out")(h))


def test_shared_gate_draws_identical_noise_in_training():
    model = kib.prune(twin_branches(), granularity="channel", gates="vib")
    b, c = model.get_layer("prune_b"), model.get_layer("prune_c")
    b.gate.log_sigma2.assign(np.zeros(8, "float32"))  # σ = 1: visible noise
    probe = keras.Model(model.inputs, [b.output, c.output])  # the branches' gated outputs
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    seen = []
    for _ in range(2):  # every step a new ε, the same for b and c
        ob, oc = (t.numpy() for t in probe(x, training=True))
        assert np.abs(ob - x).max() > 1e-2  # noisy
        np.testing.assert_array_equal(ob, oc)
        seen.append(ob)
    assert np.abs(seen[0] - seen[1]).max() > 1e-2
    np.testing.assert_array_equal(b.gate_seed.state.numpy(), c.gate_seed.state.numpy())
    ob, oc = (t.numpy() for t in probe(x, training=False))
    np.testing.assert_allclose(ob, x, atol=1e-6)  # mean gates (μ = 1)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_shared_gate_survives_save_and_load(tmp_path):
    model = kib.prune(twin_branches(), granularity="channel", gates="vib", gamma=0.25)
    randomize_gates(model, seed=2)
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    path = tmp_path / "shared.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom objects
    b, c = loaded.get_layer("prune_b"), loaded.get_layer("prune_c")
    assert b.gate is c.gate
    assert len(loaded.weights) == len(model.weights)
    assert sum("gate_mu" in v.path for v in loaded.weights) == 1
    for v, u in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(v), np.asarray(u))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    loaded(x)
    np.testing.assert_allclose(
        [float(v) for v in loaded.losses], [0.25 * np.sum(np.log1p(b.gate.alpha()))], rtol=1e-5
    )
    ob, oc = (t.numpy() for t in keras.Model(loaded.inputs, [b.output, c.output])(x, training=True))
    np.testing.assert_array_equal(ob, oc)


def test_shared_gate_shrink_and_strip():
    model = kib.prune(coupled_cnn(), granularity="channel", gates="vib")
    randomize_gates(model, seed=4)
    b, c = model.get_layer("prune_b"), model.get_layer("prune_c")
    assert b.gate is c.gate
    kb0, kc0 = b.layer.kernel.numpy(), c.layer.kernel.numpy()
    x = x_img(8)
    stripped = kib.strip_pruning(model)
    mu = b.gate.mean()
    np.testing.assert_allclose(stripped.get_layer("b").kernel.numpy(), kb0 * mu, rtol=1e-6)
    np.testing.assert_allclose(stripped.get_layer("c").kernel.numpy(), kc0 * mu, rtol=1e-6)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
    pruner = kib.Pruner(model, kib.OneShot(0.5), score="vib", allocation="uniform")
    pruner.reset()
    pruner.update(1, force=True)
    kept = b.unit_mask.numpy() > 0
    np.testing.assert_array_equal(kept, c.unit_mask.numpy() > 0)
    alpha = b.gate.alpha()  # the unit's single SNR decides
    assert (~kept).sum() == 4 and alpha[~kept].max() <= alpha[kept].min()
    np.testing.assert_allclose(
        kib.shrink(model).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize("owner_first", [True, False])
def test_shared_gate_links_when_wired_in_either_order(owner_first):
    inp = keras.Input((8,))
    b = kib.PruneWrapper(L.Dense(8, name="b"), granularity="channel", gates="vib")
    c = kib.PruneWrapper(
        L.Dense(8, name="c"), granularity="channel", gates="vib", gate_shared_with="prune_b"
    )
    first, second = (b, c) if owner_first else (c, b)
    h1, h2 = first(inp), second(inp)
    model = keras.Model(inp, L.Dense(2)(L.Add()([h1, h2])))
    assert c.gate is b.gate
    assert sum("gate_mu" in v.path for v in model.weights) == 1
    with pytest.raises(ValueError, match="gate_shared_with"):
        kib.PruneWrapper(L.Dense(8), granularity="channel", gate_shared_with="prune_b")
    lone = kib.PruneWrapper(L.Dense(8), granularity="channel", gates="vib", gate_shared_with="x")
    with pytest.raises(ValueError, match="not linked"):
        lone(np.ones((2, 8), "float32"))


def test_shared_gate_placement_follows_each_layer_activation():
    inp = keras.Input((6,))
    b = L.Dense(8, activation="relu", name="b")(inp)  # the owner: gate after the ReLU
    c = L.Dense(8, activation="tanh", name="c")(inp)  # a member: gate before its tanh
    model = kib.prune(
        keras.Model(inp, L.Dense(3, name="out")(L.Add()([b, c]))),
        granularity="channel",
        gates="vib",
    )
    randomize_gates(model, seed=5)
    pb, pc = model.get_layer("prune_b"), model.get_layer("prune_c")
    assert pb.gate is pc.gate and not pb.gate_pre and pc.gate_pre
    x = np.random.default_rng(0).normal(size=(6, 6)).astype("float32")
    np.testing.assert_allclose(
        kib.strip_pruning(model).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
