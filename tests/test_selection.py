"""Which layers `prune` wraps: names, `"outer/inner"` paths, containers, bad names."""

import keras
import pytest
from _cases import MODEL_KINDS, ConvDenseBlock, small_cnn

import keras_ibprune as kib

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)


def _wrappers(model):
    return kib.stats.find_wrappers(model)


def test_layers_and_exclude_select_what_is_wrapped():
    model = small_cnn()
    only = kib.prune(model, layers=["fc1"])
    assert [w.layer.name for w in _wrappers(only)] == ["fc1"]
    most = kib.prune(model, exclude=["logits"])
    assert sorted(w.layer.name for w in _wrappers(most)) == ["conv", "fc1"]


def test_nothing_prunable():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Activation("relu")])
    with pytest.raises(ValueError, match="no prunable layer"):
        kib.prune(model)


def test_unknown_layer_name():
    with pytest.raises(ValueError, match="No layer named 'fc9'.*Available"):
        kib.prune(small_cnn(), layers=["fc9"])


def test_explicit_unsupported_layer():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="cannot be pruned"):
        kib.prune(model, layers=["bn"])


def test_nested_names_plain_qualified_and_container():
    model = MODEL_KINDS["custom_layer"]()
    assert [w.layer.name for w in _wrappers(kib.prune(model, layers=["fc1"]))] == ["fc1"]
    only = kib.prune(model, layers=["block/fc1"])
    assert [w.layer.name for w in _wrappers(only)] == ["fc1"]
    assert sorted(w.layer.name for w in _wrappers(kib.prune(model, layers=["block"]))) == [
        "conv",
        "fc1",
    ]
    assert [w.layer.name for w in _wrappers(kib.prune(model, exclude=["block"]))] == ["logits"]
    with pytest.raises(ValueError, match="No layer named 'block/fc9'"):
        kib.prune(model, layers=["block/fc9"])


def test_a_plain_name_selects_every_nested_layer_of_that_name():
    inp = keras.Input((8, 8, 1))
    h = ConvDenseBlock(name="a")(inp)
    h = keras.layers.Reshape((4, 4, 1))(h)
    h = ConvDenseBlock(name="b")(keras.layers.ZeroPadding2D(2)(h))
    model = keras.Model(inp, h)
    pruned = kib.prune(model, layers=["fc1"])
    assert [w.layer.name for w in _wrappers(pruned)] == ["fc1", "fc1"]
    one = kib.prune(model, layers=["b/fc1"])
    (w,) = _wrappers(one)
    assert w.name == "prune_b_fc1"


def test_a_layer_inside_a_prunable_layer_cannot_be_selected():
    inp = keras.Input((5, 8))
    model = keras.Model(inp, keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp))
    with pytest.raises(ValueError, match="inside another prunable layer"):
        kib.prune(model, layers=["mha/query"])
