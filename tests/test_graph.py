"""Tests for the channel analysis (keras_ibprune.graph / layer_kinds / groups): which layer
and `keras.ops` kinds keep channels apart, couple them, or lock them (with the reason)."""

import keras
import numpy as np
from keras import layers as L
from keras import ops

from keras_ibprune.graph import channel_groups
from keras_ibprune.layer_kinds import is_channelwise


class LayerScale(L.Layer):
    """ConvNeXt-style per-channel scale; its width is in the config (like keras' own)."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, _):
        self.gamma = self.add_weight(shape=(self.dim,), initializer="ones")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


class ChannelMix(L.Layer):
    """Weights of shape (C,) but mixes channels: must not be taken for per-channel."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w + ops.mean(x, axis=-1, keepdims=True)


def _group(model, name):
    return next(g for g in channel_groups(model) if name in g.layers)


def test_keras_ops_with_constants_keep_channels():
    """MobileNetV3's hard_sigmoid `ReLU(6)(x + 3) * (1/6)`: channels are not locked."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    hs = L.ReLU(6.0)(a + 3.0) * (1.0 / 6.0)
    y = L.Multiply()([a, hs]) * np.linspace(0.5, 1.5, 8).astype("float32")
    y = ops.cast(ops.clip(ops.relu6(y - 1.0), 0.1, 5.0), "float32")
    model = keras.Model(inp, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(y)))
    assert _group(model, "a").prunable.all()


def test_two_tensor_op_couples_like_add():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(inp)
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(a + b))
    group = _group(model, "a")
    assert group.layers == ("a", "b") and group.size == 4 and group.prunable.all()


def test_ops_that_mix_or_broadcast_channels_lock_them_with_reason():
    inp = keras.Input((6, 6, 3))
    w = L.Conv2D(4, 1, name="w")(inp)
    mixed = ops.matmul(w, np.eye(4, dtype="float32"))  # not elementwise
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(mixed))
    group = _group(model, "w")
    assert not group.prunable.any() and "cannot analyse" in group.reason
    one = L.Conv2D(1, 1, name="one")(inp)
    wide = one * np.arange(4, dtype="float32")  # broadcasts 1 channel to 4
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(wide))
    assert not _group(model, "one").prunable.any()


def test_grouped_conv_couples_each_group():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    g = L.Conv2D(4, 3, groups=4, padding="same", name="g")(a)  # 2 inputs -> 1 output
    model = keras.Model(inp, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(g)))
    group = _group(model, "a")
    assert group.size == 4 and group.prunable.all()
    np.testing.assert_array_equal(group.members["a"], [0, 0, 1, 1, 2, 2, 3, 3])


def test_layer_normalization_locks_its_inputs_with_the_reason():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    y = L.LayerNormalization(name="ln")(a)
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(y))
    group = _group(model, "a")
    assert not group.prunable.any()
    assert "'ln'" in group.reason and "statistics" in group.reason


def test_per_channel_layers_by_probe_or_hook():
    scale = LayerScale(4)
    scale.build((None, 4))
    assert is_channelwise(scale, 4, 4)
    mix = ChannelMix()
    mix.build((None, 4))
    assert not is_channelwise(mix, 2, 4)

    class Hooked(L.Layer):
        channelwise = True

        def call(self, x):
            return ops.tanh(x)

    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    y = Hooked()(LayerScale(4, name="ls")(a))
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(y))
    assert _group(model, "a").prunable.all()
    b = L.Conv2D(4, 1, name="b")(inp)
    model = keras.Model(inp, L.Conv2D(2, 1, name="out")(ChannelMix(name="mix")(b)))
    assert "'mix'" in _group(model, "b").reason


def test_mobilenet_v3_small_channels_are_not_locked():
    """62 % of channels were locked by hard_sigmoid's `x + 3` and `* (1/6)` op nodes."""
    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10, include_preprocessing=False
    )
    groups = channel_groups(model)
    total = sum(g.size for g in groups)
    locked = sum(int((~g.prunable).sum()) for g in groups)
    assert locked / total < 0.01
    assert [g.layers for g in groups if g.reason] == [("logits",)]  # read by the softmax
