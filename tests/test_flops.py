"""Tests for keras_ibprune.flops against hand-computed numbers."""

import keras
import numpy as np
import pytest
from keras import layers as L

from keras_ibprune.flops import count_flops, count_params, unit_flops, unit_params
from keras_ibprune.shrink import shrink


def test_dense_by_hand():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")])
    assert count_flops(model) == 2 * 4 * 3 + 3
    assert count_params(model) == 4 * 3 + 3 == model.count_params()
    assert count_flops(model, per_layer=True) == {"d": 27}


def test_conv2d_by_hand():
    inp = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3, name="conv")(inp)  # 6x6x4 output
    z = L.Conv2D(2, 1, use_bias=False, name="pw")(y)
    model = keras.Model(inp, z)
    table = count_flops(model, per_layer=True)
    assert table["conv"] == 2 * (6 * 6 * 4) * (3 * 3 * 3) + 6 * 6 * 4
    assert table["pw"] == 2 * (6 * 6 * 2) * 4
    assert count_params(model) == (3 * 3 * 3 * 4 + 4) + 4 * 2


def test_other_layers_by_hand():
    inp = keras.Input((8, 8, 4))
    a = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(inp)
    b = L.BatchNormalization(name="bn")(a)
    c = L.SeparableConv2D(5, 3, padding="same", name="sep")(b)
    d = L.MaxPooling2D(2, name="pool")(c)
    e = L.Add(name="add")([d, d])
    f = L.Conv2DTranspose(3, 2, strides=2, name="tr")(e)
    g = L.GlobalAveragePooling2D(name="gap")(f)
    model = keras.Model(inp, g)
    t = count_flops(model, per_layer=True)
    assert t["dw"] == 2 * 64 * 8 * 9 + 64 * 8
    assert t["bn"] == 2 * 64 * 8
    assert t["sep"] == 2 * (64 * 9 * 8 + 64 * 8 * 5) + 64 * 5
    assert t["pool"] == 16 * 5 * 4 and t["add"] == 16 * 5
    assert t["tr"] == 2 * 16 * 4 * 5 * 3 + 64 * 3
    assert t["gap"] == 64 * 3
    assert count_params(model) == model.count_params()


def test_params_match_keras_for_other_layers():
    inp = keras.Input((6,), dtype="int32")
    e = L.Embedding(20, 8)(inp)
    r = L.LSTM(5, return_sequences=True)(e)
    m = L.MultiHeadAttention(2, 4)(r, r)
    out = L.Dense(1)(L.GRU(3)(m))
    model = keras.Model(inp, out)
    assert count_params(model) == model.count_params()
    t = count_flops(model, per_layer=True)
    lstm = [k for k in t if k.startswith("lstm")][0]
    assert t[lstm] == 2 * 6 * 4 * 5 * (8 + 5) + 6 * 4 * 5
    assert count_flops(model) > 0


def test_effective_counts_match_shrunk_model_and_unit_costs():
    inp = keras.Input((4,))
    h = L.Dense(5, activation="relu", name="h")(inp)
    out = L.Dense(3, name="out")(h)
    model = keras.Model(inp, out)
    keep = {"h": np.array([1, 0, 1, 1, 0], bool)}
    small = shrink(model, keep=keep)
    assert count_params(model, effective=True, keep=keep) == small.count_params() == 27
    assert (
        count_flops(model, effective=True, keep=keep)
        == count_flops(small)
        == 2 * 12 + 3 + 2 * 9 + 3
    )
    assert unit_flops(model) == {"h": 2 * 4 + 1 + 2 * 3}
    assert unit_params(model) == {"h": 4 + 1 + 3}


def test_wrapped_model_counts_through_inner_layer():
    prune_mod = pytest.importorskip("keras_ibprune.prune")
    inp = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
    out = L.Dense(2, name="out")(L.Flatten()(y))
    model = keras.Model(inp, out)
    pruned = prune_mod.prune(model, granularity="channel")
    assert count_params(pruned) == model.count_params()
    assert count_flops(pruned) == count_flops(model)
    wrapper = [la for la in pruned.layers if getattr(la, "layer", None) is not None][0]
    wrapper.unit_mask.assign(np.array([1, 0, 1, 1], "float32"))
    expected = (3 * 3 * 3 * 3 + 3) + (6 * 6 * 3 * 2 + 2)
    assert count_params(pruned, effective=True) == expected == shrink(pruned).count_params()


def test_unknown_shape_is_an_error():
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, L.Conv2D(2, 3)(inp))
    with pytest.raises(ValueError, match="static shapes"):
        count_flops(model)


def test_subclassed_models():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = L.Dense(4)
            self.b = L.Dense(2)

        def call(self, x):
            return self.b(self.a(x))

    net = Net()
    net(np.zeros((1, 3), "float32"))
    assert count_params(net) == net.count_params() == 3 * 4 + 4 + 4 * 2 + 2
    with pytest.raises(ValueError, match="subclassed"):
        count_flops(net)


def test_effective_counts_keep_what_shrink_keeps():
    """Issue repro: a removed unit's constant (BN beta -> ReLU) read by a padded
    SeparableConv2D keeps the unit: the estimate is the dense count, like the model."""
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="c")(inp)
    x = L.ReLU()(L.BatchNormalization(beta_initializer=keras.initializers.Constant(0.5))(x))
    x = L.SeparableConv2D(8, 3, padding="same", name="s")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    keep = {"c": np.arange(8) % 2 == 0}
    small = shrink(model, keep=keep)
    assert count_flops(model, effective=True, keep=keep) == count_flops(small)
    assert count_flops(small) == count_flops(model)
    assert count_params(model, effective=True, keep=keep) == small.count_params()


def test_grouped_conv_counts_and_folded_bias():
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 1, name="a")(inp)
    x = L.ReLU()(L.BatchNormalization(beta_initializer=keras.initializers.Constant(0.5))(x))
    g = L.Conv2D(8, 1, groups=4, use_bias=False, name="g")(x)
    model = keras.Model(inp, L.Conv2D(2, 1, use_bias=False, name="o")(g))  # o gains a bias
    table = count_flops(model, per_layer=True)
    assert table["g"] == 2 * 8 * 8 * 8 * 2
    keep = {"a": np.array([1, 1, 0, 0, 1, 1, 1, 0], bool)}
    small = shrink(model, keep=keep)
    assert small.get_layer("g").groups == 3
    assert count_flops(model, effective=True, keep=keep) == count_flops(small)
    assert count_params(model, effective=True, keep=keep) == small.count_params()
