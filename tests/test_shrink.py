"""Tests for keras_ibprune.shrink: exactness on coupled graphs, rounding, and errors."""

import keras
import numpy as np
import pytest
from _cases import LAYER_CASES, make_input
from keras import layers as L
from keras import ops

from keras_ibprune.flops import count_flops, count_params
from keras_ibprune.graph import channel_groups
from keras_ibprune.prune import prune as kib_prune
from keras_ibprune.registry import supports_channels
from keras_ibprune.shrink import check_widths, shrink

CHANNEL_CASES = [c for c in LAYER_CASES if supports_channels(c[1]()) and not c[3]]


def masked_predict(model, keep, x):
    """Oracle: runs `model` with the outputs of the layers in `keep` multiplied by masks."""
    masks = {k: ops.convert_to_tensor(np.asarray(v, "float32")) for k, v in keep.items()}

    def fn(op):
        if op.name in masks:
            return lambda *a, **kw: op(*a, **kw) * masks[op.name]
        return op

    func = model._functional if isinstance(model, keras.Sequential) else model
    out = func._run_through_graph(ops.convert_to_tensor(x), operation_fn=fn)
    return ops.convert_to_numpy(out)


def drop(n, removed):
    k = np.ones(n, bool)
    k[list(removed)] = False
    return k


def randomize_bn(model, seed=0, beta=0.0):
    rng = np.random.default_rng(seed)
    for la in model.layers:
        if isinstance(la, L.BatchNormalization):
            c = la.gamma.shape[0]
            la.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(beta, 0.5, c),
                    rng.normal(0, 0.5, c),
                    rng.uniform(0.5, 2, c),
                ]
            )


def residual_cnn():
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 3))
    c1 = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    r1 = L.ReLU()(L.BatchNormalization(name="bn1")(c1))
    c2 = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(r1)
    c3 = L.Conv2D(8, 1, name="c3")(r1)
    add = L.Add(name="add")([c2, c3])
    dw = L.DepthwiseConv2D(3, padding="same", name="dw")(add)
    c4 = L.Conv2D(6, 1, activation="relu", name="c4")(dw)
    cat = L.Concatenate(name="cat")([add, c4])
    p = L.MaxPooling2D()(L.Dropout(0.1)(cat))
    c5 = L.Conv2D(5, 3, padding="valid", name="c5")(p)
    d1 = L.Dense(7, activation="relu", name="d1")(L.Flatten()(c5))
    out = L.Dense(3, name="out")(d1)
    model = keras.Model(inp, out)
    randomize_bn(model)
    return model


KEEP = {
    "c1": drop(8, [1, 4]),
    "c2": drop(8, [0, 3, 5]),  # 5 is kept by c3: coupled, so it stays (zeroed in c2)
    "c3": drop(8, [0, 3]),
    "c4": drop(6, [2]),
    "c5": drop(5, [0, 1]),
    "d1": drop(7, [3]),
}


def x_like(model, n=4, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def widths(model):
    return {
        la.name: la.weights[0].shape[-1]
        for la in model.layers
        if isinstance(la, (L.Conv2D, L.Dense))
    }


def test_residual_cnn_is_exact_and_smaller():
    model = residual_cnn()
    x = x_like(model)
    small = shrink(model, keep=KEEP)
    diff = np.abs(small.predict(x, verbose=0) - masked_predict(model, KEEP, x)).max()
    assert diff <= 1e-4
    w = widths(small)
    assert (w["c1"], w["c2"], w["c3"], w["c4"], w["c5"], w["d1"], w["out"]) == (6, 6, 6, 5, 3, 6, 3)
    assert small.get_layer("bn1").gamma.shape == (6,)
    assert small.get_layer("dw").kernel.shape == (3, 3, 6, 1)
    assert small.get_layer("d1").kernel.shape == (2 * 2 * 3, 6)  # Flatten positions mapped
    # parameter formula: c1 3*3*3*6+6, bn 4*6, c2 3*3*6*6+6, c3 6*6+6, dw 9*6+6,
    # c4 6*5+5, c5 3*3*11*3+3, d1 12*6+6, out 6*3+3
    expected = 168 + 24 + 330 + 42 + 60 + 35 + 300 + 78 + 21
    assert small.count_params() == expected == count_params(model, effective=True, keep=KEEP)
    assert not any(isinstance(la, keras.Sequential) for la in small.layers)


def test_nonzero_constants_through_bn_fold_exactly():
    """Removed channels leave BN(0) = constant: folded into bias or a carrier channel."""
    model = residual_cnn()
    randomize_bn(model, seed=3, beta=3.0)  # relu(BN(0)) > 0: the padded c2 needs a carrier
    keep = {"c1": drop(8, [0, 2, 5])}
    x = x_like(model, seed=1)
    small = shrink(model, keep=keep)
    assert np.abs(small.predict(x, verbose=0) - masked_predict(model, keep, x)).max() <= 1e-4
    assert widths(small)["c1"] == 6  # 5 kept + 1 carrier for the 'same'-padded c2


def test_round_to_keeps_back_units_and_stays_exact():
    model = residual_cnn()
    x = x_like(model, seed=2)
    small = shrink(model, keep=KEEP, round_to=4)
    assert np.abs(small.predict(x, verbose=0) - masked_predict(model, KEEP, x)).max() <= 1e-4
    w = widths(small)
    assert (w["c1"], w["c2"], w["c3"], w["c4"], w["c5"], w["d1"]) == (8, 8, 8, 6, 4, 7)
    for k in ("c1", "c2", "c5"):
        assert w[k] % 4 == 0


def test_sequential_dense_and_separable_transpose_consumers():
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(6, 3, padding="same", activation="relu", name="a"),
            L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw"),
            L.SeparableConv2D(5, 3, padding="same", activation="tanh", name="sep"),
            L.Conv2DTranspose(4, 3, strides=2, name="up"),
            L.Reshape((13 * 13, 4), name="rs"),
            L.GlobalAveragePooling1D(),
            L.Dense(2, name="out"),
        ]
    )
    keep = {"a": drop(6, [1, 2]), "sep": drop(5, [4]), "up": drop(4, [0])}
    x = x_like(model)
    small = shrink(model, keep=keep)
    assert np.abs(small.predict(x, verbose=0) - masked_predict(model, keep, x)).max() <= 1e-4
    assert small.get_layer("dw").kernel.shape == (3, 3, 4, 2)
    assert small.get_layer("sep").pointwise_kernel.shape == (1, 1, 8, 4)
    assert small.get_layer("rs").output.shape == (None, 169, 3)


def test_channel_groups_couplings():
    inp = keras.Input((4, 4, 3))
    a = L.Conv2D(2, 1, name="a")(inp)
    b = L.Conv2D(3, 1, name="b")(inp)
    c = L.Conv2D(5, 1, name="c")(inp)
    s = L.Add()([L.Concatenate()([a, b]), c])
    d = L.Conv2D(4, 1, name="d")(L.BatchNormalization()(s))
    out = L.Dense(2, name="out")(L.GlobalMaxPooling2D()(d))
    groups = {g.layers: g for g in channel_groups(keras.Model(inp, out))}
    g = groups[("a", "b", "c")]
    assert g.size == 5 and g.prunable.all()
    np.testing.assert_array_equal(g.members["c"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(g.members["b"], [2, 3, 4])
    keep = g.expand([True, False, True, True, False])
    np.testing.assert_array_equal(keep["b"], [True, True, False])
    assert g.reduce({"a": [1.0, 2.0], "c": [1.0] * 5}).tolist() == [2.0, 3.0, 1.0, 1.0, 1.0]
    assert groups[("d",)].prunable.all()
    assert not groups[("out",)].prunable.any() and "model output" in groups[("out",)].reason


@pytest.mark.jax
def test_prune_wrappers_channel_masks():
    prune_mod = pytest.importorskip("keras_ibprune.prune")
    model = residual_cnn()
    pruned = prune_mod.prune(model, granularity="channel")
    inner = {la.layer.name: la for la in pruned.layers if hasattr(la, "unit_mask")}
    groups = [g for g in channel_groups(pruned) if inner["c2"].name in g.layers]
    assert set(groups[0].layers) == {inner[n].name for n in ("c2", "c3", "dw")}
    for name, mask in {**KEEP, "c2": KEEP["c3"], "dw": KEEP["c3"]}.items():
        inner[name].unit_mask.assign(mask.astype("float32"))
    x = x_like(model, seed=5)
    small = shrink(pruned)
    assert np.abs(small.predict(x, verbose=0) - pruned.predict(x, verbose=0)).max() <= 1e-4
    assert widths(small)["c2"] == 6 and small.get_layer("dw").kernel.shape[-2] == 6


def test_weight_masks_only_is_an_error():
    prune_mod = pytest.importorskip("keras_ibprune.prune")
    pruned = prune_mod.prune(residual_cnn(), granularity="weight")
    with pytest.raises(ValueError, match="granularity='channel'.*only weight masks"):
        shrink(pruned)
    with pytest.raises(ValueError, match="without PruneWrappers"):
        shrink(residual_cnn())


@pytest.mark.jax
def test_unsupported_coupling_names_the_layer():
    inp = keras.Input((5,))
    h = L.Dense(4, name="h")(inp)
    y = L.Lambda(lambda t: t[:, ::-1], name="flip")(h)
    model = keras.Model(inp, L.Dense(2)(y))
    with pytest.raises(ValueError, match="'flip'"):
        shrink(model, keep={"h": drop(4, [0])})
    group = [g for g in channel_groups(model) if g.layers == ("h",)][0]
    assert not group.prunable.any() and "flip" in group.reason


@pytest.mark.jax
def test_model_output_and_bad_masks():
    model = residual_cnn()
    with pytest.raises(ValueError, match="model output"):
        shrink(model, keep={"out": drop(3, [0])})
    with pytest.raises(ValueError, match="would remove every unit of layer 'c4'"):
        shrink(model, keep={"c4": np.zeros(6, bool)})
    with pytest.raises(ValueError, match="min_width.*larger than layer 'c4'"):
        shrink(model, keep={"c4": drop(6, [0])}, min_width=9)
    with pytest.raises(ValueError, match="fewer than min_width"):
        check_widths({"c4": drop(6, [0, 1, 2])}, min_width=4)
    with pytest.raises(ValueError, match="'bn1'"):
        shrink(model, keep={"bn1": drop(8, [0])})
    with pytest.raises(ValueError, match="shape"):
        shrink(model, keep={"c4": drop(5, [0])})


@pytest.mark.jax
def test_kept_masked_unit_needs_zero_activation():
    inp = keras.Input((4,))
    a = L.Dense(4, activation="sigmoid", name="a")(inp)
    b = L.Dense(4, name="b")(inp)
    model = keras.Model(inp, L.Dense(1)(L.Add()([a, b])))
    with pytest.raises(ValueError, match="not zero at zero"):
        shrink(model, keep={"a": drop(4, [0]), "b": drop(4, [])})
    small = shrink(model, keep={"a": drop(4, [0]), "b": drop(4, [0])})
    assert small.get_layer("a").kernel.shape == (4, 3)


def test_tflite_export():
    tf = pytest.importorskip("tensorflow")
    model = residual_cnn()
    small = shrink(model, keep=KEEP, round_to=2)
    converter = tf.lite.TFLiteConverter.from_keras_model(small)
    blob = converter.convert()
    interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    x = x_like(model, n=1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    ref = small.predict(x, verbose=0)
    assert np.abs(interp.get_tensor(out["index"]) - ref).max() <= 1e-4


def test_spatial_concat_reshape_and_nested_models():
    inp = keras.Input((4, 4, 2))
    a = L.Conv2D(4, 1, activation="relu", name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(inp)
    s = L.Concatenate(axis=1)([a, b])  # couples a and b channel by channel
    r = L.Reshape((32, 4), name="rs")(L.ZeroPadding2D(0)(s))
    out = L.Dense(2, name="out")(L.Flatten()(r))
    model = keras.Model(inp, out)
    keep = {"a": drop(4, [1]), "b": drop(4, [1])}
    x = x_like(model)
    small = shrink(model, keep=keep)
    assert np.abs(small.predict(x, verbose=0) - masked_predict(model, keep, x)).max() <= 1e-4
    assert small.get_layer("out").kernel.shape == (32 * 3, 2)
    # A reshape that splits channels across positions cannot be analysed.
    mixed = keras.Model(inp, L.Dense(1)(L.Reshape((32, 2))(a)))
    with pytest.raises(ValueError, match="mixes channels"):
        shrink(mixed, keep={"a": drop(4, [0])})
    # Layers inside a nested model cannot be named; the nested model is kept whole.
    outer_in = keras.Input((4, 4, 2))
    h = L.Conv2D(3, 1, name="h")(outer_in)
    nested = keras.Model(outer_in, L.Conv2D(3, 1, name="inner_conv")(h))
    top = keras.Model(inp, L.Dense(1)(L.Flatten()(nested(L.Conv2D(2, 1, name="pre")(inp)))))
    with pytest.raises(ValueError, match="nested models are not supported"):
        shrink(top, keep={"h": drop(3, [0])})
    with pytest.raises(ValueError, match="cannot analyse"):
        shrink(top, keep={"pre": drop(2, [0])})
    same = shrink(top, keep={})
    x = x_like(top)
    assert np.abs(same.predict(x, verbose=0) - top.predict(x, verbose=0)).max() <= 1e-5


@pytest.mark.parametrize(
    "name,factory,shape,integer", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES]
)
def test_layer_table_shrink_is_exact_and_counts_match(name, factory, shape, integer):
    import keras_ibprune as kib

    inp = keras.Input(shape)
    h = factory()(inp)
    model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)))
    pruned = kib.prune(model, granularity="channel", exclude=["head"])
    (w,) = [w for w in kib.stats.find_wrappers(pruned) if w.layer.name != "head"]
    n = w.unit_mask.shape[0]
    keep = np.ones(n, "float32")
    keep[np.random.default_rng(0).permutation(n)[: n // 2]] = 0.0
    w.unit_mask.assign(keep)
    x = make_input(shape, integer, n=4)
    if name.startswith("depthwise"):  # its units are the input's channels: never removable
        with pytest.raises(ValueError, match="it is a model input"):
            shrink(pruned)
        return
    small = shrink(pruned)
    np.testing.assert_allclose(small.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5)
    assert kib.count_flops(small) == kib.count_flops(pruned, effective=True)
    assert kib.count_params(small) < kib.count_params(model)


# ------------------------------------------------- grouped convs, ops, per-channel layers
def grouped_model(groups=16, width=16, beta=None):
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(width, 1, name="a")(inp)
    if beta is not None:
        x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    x = L.Conv2D(width, 3, groups=groups, padding="same", name="g")(x)
    x = L.Conv2D(6, 1, name="pw")(x)
    model = keras.Model(inp, L.Dense(3, name="d")(L.GlobalAveragePooling2D()(x)))
    if beta is not None:
        randomize_bn(model, beta=beta)
    return model


def test_grouped_conv_shrinks_without_crash_and_exactly():
    """Issue repro: Conv2D(16,1) -> Conv2D(16,3,groups=16) -> ...: IndexError before."""
    model = grouped_model()
    pruned = kib_prune(model, granularity="channel")
    x = x_like(model)
    np.testing.assert_allclose(
        shrink(pruned).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
    keep = {"a": drop(16, [1, 5, 9]), "g": drop(16, [1, 5, 7])}  # 7: kept by a, zeroed
    small = shrink(model, keep=keep)
    g = small.get_layer("g")
    assert (g.filters, g.groups, g.kernel.shape[-2]) == (14, 14, 1)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), masked_predict(model, keep, x), atol=1e-5
    )


def test_general_groups_go_whole_and_constants_fold_through_them():
    keep = {"a": drop(8, [2, 3, 4])}  # group 1 whole, half of group 2 (kept, zeroed)
    # beta=-3: removed channels leave 0 after ReLU; g's bias then folds into pw.
    # beta=+0.8: they leave constants that g's zero padding turns non-constant: kept.
    for beta, widths in ((-3.0, (6, 3, 6)), (0.8, (8, 4, 8))):
        model = grouped_model(groups=4, width=8, beta=beta)  # 2 in / 2 out per group
        x = x_like(model)
        small = shrink(model, keep=keep)
        g = small.get_layer("g")
        assert (g.filters, g.groups, small.get_layer("a").filters) == widths
        np.testing.assert_allclose(
            small.predict(x, verbose=0), masked_predict(model, keep, x), atol=1e-5
        )
        assert count_flops(small) == count_flops(model, effective=True, keep=keep)


def test_ops_and_per_channel_layers_shrink_exactly():
    from test_graph import LayerScale

    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 3))
    a = L.BatchNormalization(name="bn")(L.Conv2D(8, 1, name="a")(inp))
    a = LayerScale(8, name="ls")(a)
    hard_sigmoid = L.ReLU(6.0)(a + 3.0) * (1.0 / 6.0)
    y = L.Multiply()([a, hard_sigmoid]) * np.linspace(0.5, 1.5, 8).astype("float32")
    out = L.Conv2D(2, 3, padding="same", name="out")(y)
    model = keras.Model(inp, out)
    randomize_bn(model, beta=0.5)
    model.get_layer("ls").set_weights([np.linspace(2.0, 0.5, 8).astype("float32")])
    keep = {"a": drop(8, [1, 4, 6])}
    small = shrink(model, keep=keep)
    # One removed channel is kept back as the carrier of the others' constants (padding).
    assert small.get_layer("ls").dim == 6 and small.get_layer("out").kernel.shape[-2] == 6
    assert count_flops(small) == count_flops(model, effective=True, keep=keep)
    x = x_like(model)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), masked_predict(model, keep, x), atol=1e-5
    )


def test_layer_normalization_channels_cannot_be_removed():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    model = keras.Model(inp, L.Conv2D(2, 1)(L.LayerNormalization(name="ln")(a)))
    with pytest.raises(ValueError, match="Cannot remove units of layer 'a'.*'ln'"):
        shrink(model, keep={"a": drop(4, [0])})


def _randomize_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    randomize_bn(model, seed=seed, beta=0.3)
    for la in model.layers:
        if isinstance(la, L.LayerNormalization):
            c = la.gamma.shape[0]
            la.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0.3, 0.5, c)])
        elif type(la).__name__ == "LayerScale":
            la.set_weights([rng.uniform(0.5, 1.5, la.weights[0].shape)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, size",
    [("MobileNetV3Small", 64), ("NASNetMobile", 32), ("ConvNeXtTiny", 32)],
)
def test_applications_shrink_exactly_with_the_flops_the_policy_logged(name, size):
    from keras_ibprune.channels import ChannelPolicy
    from keras_ibprune.stats import find_wrappers

    keras.utils.set_random_seed(0)
    extra = {"include_preprocessing": False} if name.startswith("MobileNetV3") else {}
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, **extra
    )
    _randomize_norms(model)  # non-zero constants behind removed channels
    pruned = kib_prune(model, granularity="channel")
    ws = find_wrappers(pruned)
    rng = np.random.default_rng(0)
    policy = ChannelPolicy(pruned, ws, target="flops", allocation="global")
    policy.update(0.3, {w.name: rng.random(w.unit_mask.shape[0]) for w in ws})
    small = shrink(pruned)
    dense = count_flops(model)
    assert count_flops(small) == count_flops(pruned, effective=True)
    assert policy.removed() == pytest.approx(1 - count_flops(small) / dense)
    assert policy.removed() >= 0.3
    x = x_like(model, n=2)
    want = pruned.predict(x, verbose=0)
    np.testing.assert_allclose(small.predict(x, verbose=0), want, atol=1e-4 * np.abs(want).max())
