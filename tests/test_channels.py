import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune.channels import ChannelPolicy
from keras_ibprune.stats import LayerStats, find_wrappers

L = keras.layers


def lenet():
    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv1"),
            L.MaxPooling2D(),
            L.Conv2D(16, 3, activation="relu", name="conv2"),
            L.Flatten(),
            L.Dense(32, activation="relu", name="fc1"),
            L.Dense(10, name="fc2"),
        ]
    )


def residual():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    a = L.BatchNormalization(name="bn_a")(a)
    a = L.ReLU()(a)
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="b")(a)
    c = L.Conv2D(8, 1, name="c")(inp)
    h = L.Add()([b, c])
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(4, name="out")(h))


def _scores(wrappers, seed=0):
    rng = np.random.default_rng(seed)
    return {w.name: rng.random(w.unit_mask.shape[0]) for w in wrappers}


def _kept(model):
    return {w.layer.name: int(w.unit_mask.numpy().sum()) for w in find_wrappers(model)}


def test_units_target_is_exact_and_outputs_are_never_pruned():
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    ChannelPolicy(pruned, ws, target="units").update(0.5, _scores(ws))
    assert _kept(pruned) == {"conv1": 4, "conv2": 8, "fc1": 16, "fc2": 10}


@pytest.mark.parametrize("target", ["flops", "params"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_cost_targets_are_met(target, allocation):
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    count = kib.count_flops if target == "flops" else kib.count_params
    ChannelPolicy(pruned, ws, target=target, allocation=allocation).update(0.6, _scores(ws))
    removed = 1 - count(pruned, effective=True) / count(pruned)
    assert 0.6 <= removed < 0.75
    small = kib.shrink(pruned)
    assert count(small) == count(pruned, effective=True)


def test_coupled_channels_are_removed_together_and_shrink_is_exact():
    pruned = kib.prune(residual(), granularity="channel")
    ws = find_wrappers(pruned)
    ChannelPolicy(pruned, ws, target="units").update(0.5, _scores(ws))
    masks = {w.layer.name: w.unit_mask.numpy() for w in ws}
    np.testing.assert_array_equal(masks["b"], masks["c"])
    assert masks["b"].sum() == 4 and masks["out"].sum() == 4
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    small = kib.shrink(pruned)
    np.testing.assert_allclose(small.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-4)


def test_round_to_and_min_width():
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    ChannelPolicy(pruned, ws, target="units", round_to=4, min_width=6).update(0.8, _scores(ws))
    kept = _kept(pruned)
    assert kept["conv1"] == 8  # floor 6 -> rounded up to 8
    assert kept["conv2"] % 4 == 0 and kept["fc1"] % 4 == 0
    with pytest.raises(ValueError, match="min_width.*larger than layer"):
        ChannelPolicy(pruned, ws, min_width=9)


def test_monotone_removed_units_stay_removed():
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    policy = ChannelPolicy(pruned, ws, target="units")
    policy.update(0.25, _scores(ws, 0))
    first = {w.name: w.unit_mask.numpy().copy() for w in ws}
    policy.update(0.5, _scores(ws, 1))
    for w in ws:
        assert np.all(w.unit_mask.numpy()[first[w.name] == 0] == 0)


def test_removing_every_unit_is_an_error():
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    with pytest.raises(ValueError, match="would remove every unit"):
        ChannelPolicy(pruned, ws, target="units").update(0.95, _scores(ws))
    with pytest.raises(ValueError, match="would remove every unit"):
        ChannelPolicy(pruned, ws, target="flops").update(0.9999, _scores(ws))


def test_bad_target():
    pruned = kib.prune(lenet(), granularity="channel")
    with pytest.raises(ValueError, match="target.*Received: target='latency'"):
        ChannelPolicy(pruned, find_wrappers(pruned), target="latency")


def _stats(wrapper, outputs=None):
    return LayerStats(
        wrapper=wrapper,
        weights=[v.numpy() for v in wrapper.prunable_weights],
        masks=[],
        outputs=outputs,
    )


def test_unit_scores_l1_bn_gamma_apoz():
    pruned = kib.prune(residual(), granularity="channel")
    a = next(w for w in find_wrappers(pruned) if w.layer.name == "a")
    k = np.ones_like(a.layer.kernel.numpy())
    k[..., 2] = 0.1
    a.layer.kernel.assign(k)
    l1 = kib.scores.get("l1").unit_scores(_stats(a))
    assert np.argmin(l1) == 2
    bn = pruned.get_layer("bn_a")
    gamma = np.linspace(1, 2, 8).astype("float32")
    gamma[5] = 0.01
    bn.gamma.assign(gamma)
    assert np.argmin(kib.scores.get("bn_gamma").unit_scores(_stats(a))) == 5
    out = np.abs(np.random.default_rng(0).standard_normal((50, 8))) + 0.1
    out[:, 3] = 0.0
    apoz = kib.scores.get("apoz").unit_scores(_stats(a, outputs=out))
    assert np.argmin(apoz) == 3 and apoz[3] == 0.0


def test_callback_flops_target_then_shrink():
    x = np.random.default_rng(0).standard_normal((96, 16, 16, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 96)
    pruned = kib.prune(lenet(), granularity="channel")
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kib.IBPruning(
        kib.PolynomialDecay(0.0, 0.75, 0, 2), held_out=(x, y), target="flops", exclude=["fc1"]
    )
    history = pruned.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[cb])
    assert history.history["flops_removed"][-1] >= 0.75
    assert _kept(pruned)["fc1"] == 32  # excluded
    small = kib.shrink(pruned)
    assert kib.count_flops(lenet()) / kib.count_flops(small) >= 4.0
    np.testing.assert_allclose(small.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-4)


def test_flops_target_needs_channel_wrappers():
    pruned = kib.prune(lenet())
    pruner = kib.Pruner(pruned, kib.OneShot(0.5), score="magnitude", target="flops")
    with pytest.raises(ValueError, match="granularity='channel'"):
        pruner.reset()


def constant_into_padded_separable():
    """Issue repro: conv -> BN(beta=0.5) -> ReLU -> padded SeparableConv2D."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = L.ReLU()(L.BatchNormalization(beta_initializer=keras.initializers.Constant(0.5))(x))
    x = L.SeparableConv2D(16, 3, padding="same", activation="relu", name="sep")(x)
    x = L.Conv2D(16, 1, activation="relu", name="pw")(x)
    return keras.Model(inp, L.Dense(3, name="out")(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_flops_logged_are_the_shrunk_models(allocation):
    """Units whose removed value is a constant a padded SeparableConv reads are kept by
    shrink; the policy counts them as kept and removes units that really go."""
    pruned = kib.prune(constant_into_padded_separable(), granularity="channel")
    ws = find_wrappers(pruned)
    policy = ChannelPolicy(pruned, ws, target="flops", allocation=allocation)
    policy.update(0.4, _scores(ws))
    small = kib.shrink(pruned)
    dense = kib.count_flops(pruned)
    assert kib.count_flops(small) == kib.count_flops(pruned, effective=True)
    assert policy.removed() == pytest.approx(1 - kib.count_flops(small) / dense)
    assert policy.removed() >= 0.4
    assert _kept(pruned)["conv"] == 8  # none of conv's units would really go


def test_comparable_scores_are_not_normalized_per_layer():
    # Raw scores (VIB α) rank units across layers: fc1's scores are all far below conv2's,
    # so a global units target takes fc1's units first; per-layer normalization would not.
    pruned = kib.prune(lenet(), granularity="channel")
    ws = find_wrappers(pruned)
    scores = {w.name: np.linspace(1.0, 2.0, w.unit_mask.shape[0]) for w in ws}
    scores["prune_fc1"] = scores["prune_fc1"] * 1e-3
    policy = ChannelPolicy(pruned, ws, target="units", allocation="global")
    policy.update(0.2, scores, normalize=False)
    assert _kept(pruned)["fc1"] < 32 and _kept(pruned)["conv2"] == 16
    pruned2 = kib.prune(lenet(), granularity="channel")
    ws2 = find_wrappers(pruned2)
    ChannelPolicy(pruned2, ws2, target="units", allocation="global").update(
        0.2, {w2.name: scores[w.name] for w, w2 in zip(ws, ws2)})
    assert _kept(pruned2)["conv2"] < 16
