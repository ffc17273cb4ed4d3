import json

import keras
import numpy as np
import pytest
from _cases import (
    LAYER_CASES,
    LAYER_IDS,
    MODEL_KINDS,
    data,
    make_input,
    pruned_model,
    randomize_masks,
    small_cnn,
)

import keras_ibprune as kib
from keras_ibprune.wrapper import PruneWrapper

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)

KINDS = list(MODEL_KINDS)


def _wrappers(model):
    return kib.stats.find_wrappers(model)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "subclassed"])
def test_prune_keeps_weights_and_predictions(kind):
    model = MODEL_KINDS[kind]()
    x, _ = data(16)
    pruned = kib.prune(model)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert _wrappers(pruned) and not _wrappers(model)
    # The original model is not touched by training the pruned one.
    before = [w.copy() for w in model.get_weights()]
    randomize_masks(pruned)
    for w in _wrappers(pruned):
        kib.masks.rezero(w)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_strip_equals_masked_predictions(kind):
    model = pruned_model(kind)
    x, _ = data(16)
    randomize_masks(model, 0.6)
    expected = model.predict(x, verbose=0)
    stripped = kib.strip_pruning(model)
    assert not _wrappers(stripped)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), expected, atol=1e-5)
    assert kib.sparsity(stripped) > 0.5


def test_reused_layer_is_one_wrapper_with_shared_masks():
    pruned = pruned_model("reused")
    shared = [w for w in _wrappers(pruned) if w.layer.name == "shared"]
    assert len(shared) == 1
    assert len(shared[0]._inbound_nodes) == 2


def test_nested_model_is_wrapped_recursively():
    pruned = pruned_model("nested")
    names = sorted(w.layer.name for w in _wrappers(pruned))
    assert names == ["conv", "fc1"]


def test_layers_and_exclude_select_what_is_wrapped():
    model = small_cnn()
    only = kib.prune(model, layers=["fc1"])
    assert [w.layer.name for w in _wrappers(only)] == ["fc1"]
    most = kib.prune(model, exclude=["logits"])
    assert sorted(w.layer.name for w in _wrappers(most)) == ["conv", "fc1"]


def test_prune_a_single_layer():
    w = kib.prune(keras.layers.Dense(3))
    assert isinstance(w, PruneWrapper)


def test_save_and_load_without_custom_objects(tmp_path):
    pruned = kib.prune(small_cnn(), granularity="weight", block_size=(1, 2))
    randomize_masks(pruned, 0.5)
    x, _ = data(8)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )
    for a, b in zip(_wrappers(loaded), _wrappers(pruned)):
        assert json.loads(json.dumps(a.get_config())) == json.loads(json.dumps(b.get_config()))
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma.numpy(), mb.numpy())


def test_stripped_model_saves_as_plain_keras(tmp_path):
    pruned = kib.prune(small_cnn())
    randomize_masks(pruned)
    stripped = kib.strip_pruning(pruned)
    stripped.save(tmp_path / "s.keras")
    text = (tmp_path / "s.keras").read_bytes()
    assert b"PruneWrapper" not in text
    loaded = keras.models.load_model(tmp_path / "s.keras")
    x, _ = data(4)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5
    )


def test_channel_strip_bakes_units():
    pruned = kib.prune(small_cnn(), granularity="channel", exclude=["logits"])
    fc1 = [w for w in _wrappers(pruned) if w.layer.name == "fc1"][0]
    um = np.ones(32, "float32")
    um[::2] = 0
    fc1.unit_mask.assign(um)
    x, _ = data(8)
    stripped = kib.strip_pruning(pruned)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5
    )


# ----------------------------------------------------------------- bad input
def test_not_a_model():
    with pytest.raises(ValueError, match="expects a keras.Model.*Received: to_prune="):
        kib.prune("model.keras")


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


def test_pruning_twice():
    pruned = kib.prune(small_cnn())
    with pytest.raises(ValueError, match="already contains PruneWrapper"):
        kib.prune(pruned)


def test_subclassed_model_gets_guidance():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="PruneWrapper"):
        kib.prune(net)


def test_functional_model_with_keras_ops_on_symbolic_tensors():
    inp = keras.Input((4,))
    a = keras.layers.Dense(3, name="a")(inp)
    b = keras.layers.Dense(3, name="b")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="c")(a + b * 2.0))
    pruned = kib.prune(model)
    assert sorted(w.layer.name for w in _wrappers(pruned)) == ["a", "b", "c"]
    randomize_masks(pruned)
    x = np.random.default_rng(0).random((3, 4)).astype("float32")
    stripped = kib.strip_pruning(pruned)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )


# ------------------------------------------------ every layer type of the table x granularity
def _single_layer_model(factory, shape, integer):
    inp = keras.Input(shape, dtype="int32" if integer else "float32")
    return keras.Model(inp, factory()(inp))


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("name,factory,shape,integer", LAYER_CASES, ids=LAYER_IDS)
def test_layer_table_config_save_load_and_strip(name, factory, shape, integer, granularity,
                                                tmp_path):
    if granularity == "channel" and not kib.registry.supports_channels(factory()):
        pytest.skip(f"{name} has no units to remove")
    model = _single_layer_model(factory, shape, integer)
    pruned = kib.prune(model, granularity=granularity)
    (wrapper,) = kib.stats.find_wrappers(pruned)
    again = PruneWrapper.from_config(wrapper.get_config())
    assert again.get_config() == wrapper.get_config()
    rng = np.random.default_rng(0)
    masks = [wrapper.unit_mask] if granularity == "channel" else wrapper.masks
    for m in masks:
        m.assign((rng.random(tuple(m.shape)) > 0.5).astype("float32"))
    x = make_input(shape, integer, n=4)
    masked = np.asarray(pruned(x))
    pruned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), masked, atol=1e-5)
    for a, b in zip(kib.stats.find_wrappers(loaded)[0].weights, wrapper.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if granularity == "weight" or getattr(factory(), "activation", None) in (
            None, keras.activations.relu, keras.activations.linear):
        stripped = kib.strip_pruning(pruned)
        assert not kib.stats.find_wrappers(stripped)
        np.testing.assert_allclose(np.asarray(stripped(x)), masked, atol=1e-5)
    assert kib.count_params(pruned) == kib.count_params(model)
    assert kib.count_flops(pruned) == kib.count_flops(model)
