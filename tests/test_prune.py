import json
import warnings

import keras
import numpy as np
import pytest
from _cases import (
    CALL_CASES,
    CALL_IDS,
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
from keras_ibprune.nested import NestedPruneWrapper
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
def test_layer_table_config_save_load_and_strip(
    name, factory, shape, integer, granularity, tmp_path
):
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
        None,
        keras.activations.relu,
        keras.activations.linear,
    ):
        stripped = kib.strip_pruning(pruned)
        assert not kib.stats.find_wrappers(stripped)
        np.testing.assert_allclose(np.asarray(stripped(x)), masked, atol=1e-5)
    assert kib.count_params(pruned) == kib.count_params(model)
    assert kib.count_flops(pruned) == kib.count_flops(model)


@pytest.mark.parametrize("name,factory,shape,call", CALL_CASES, ids=CALL_IDS)
def test_keyword_calls_prune_save_load_and_strip(name, factory, shape, call, tmp_path):
    inp = keras.Input(shape)
    model = keras.Model(inp, call(factory(), inp))
    pruned = kib.prune(model)
    (wrapper,) = _wrappers(pruned)
    randomize_masks(pruned, 0.5)
    x = make_input(shape)
    masked = np.asarray(pruned(x))
    pruned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), masked, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kib.strip_pruning(pruned)(x)), masked, atol=1e-5)


# ------------------------------------------------- layers inside custom layers (any depth)
def test_layers_inside_a_custom_layer_are_wrapped_in_place():
    model = MODEL_KINDS["custom_layer"]()
    pruned = kib.prune(model, exclude=["logits"])
    (holder,) = [la for la in pruned.layers if isinstance(la, NestedPruneWrapper)]
    block = holder.layer
    assert isinstance(block.conv, PruneWrapper) and isinstance(block.head[0], PruneWrapper)
    assert sorted(w.layer.name for w in _wrappers(pruned)) == ["conv", "fc1"]
    # Same variables, same values as the original block; the original is untouched.
    np.testing.assert_array_equal(
        block.conv.layer.kernel.numpy(), model.get_layer("block").conv.kernel.numpy()
    )
    assert not _wrappers(model)
    x, _ = data(8)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    randomize_masks(pruned, 0.5)
    fc1 = block.head[0]
    zeroed = fc1.layer.kernel.numpy() * fc1.masks[0].numpy()
    oracle = kib.strip_pruning(pruned).get_layer(index=1).head[0].kernel.numpy()
    np.testing.assert_array_equal(oracle, zeroed)


def test_nested_wrappers_save_and_load(tmp_path):
    pruned = pruned_model("custom_layer")
    assert len(_wrappers(pruned)) == 2
    randomize_masks(pruned, 0.5)
    x, _ = data(8)
    pruned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )
    assert [w.name for w in _wrappers(loaded)] == [w.name for w in _wrappers(pruned)]
    for a, b in zip(_wrappers(loaded), _wrappers(pruned)):
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma.numpy(), mb.numpy())


def test_unsupported_weighted_layers_are_named_in_a_warning():
    inp = keras.Input((3, 6, 6, 2))
    h = keras.layers.ConvLSTM2D(4, 3, name="clstm")(inp)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    with pytest.warns(UserWarning, match=r"'clstm' \(ConvLSTM2D, 864 weights\)"):
        pruned = kib.prune(model)
    assert [w.layer.name for w in _wrappers(pruned)] == ["out"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kib.prune(model, exclude=["clstm"])  # left dense on purpose: no warning
    assert not [w for w in caught if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------ tfmot's layer / list forms
def test_prune_a_list_of_layers_gives_a_list_of_wrappers():
    layers = [keras.layers.Dense(3), keras.layers.Conv2D(2, 3)]
    wrapped = kib.prune(layers, granularity="weight")
    assert isinstance(wrapped, list) and [w.layer for w in wrapped] == layers
    assert all(isinstance(w, PruneWrapper) for w in wrapped)
    model = keras.Sequential([keras.Input((6,)), *kib.prune([keras.layers.Dense(4)])])
    assert len(_wrappers(model)) == 1


def test_prune_layer_in_a_clone_function_like_tfmot():
    model = small_cnn()

    def apply(layer):
        return kib.prune(layer) if isinstance(layer, keras.layers.Dense) else layer

    pruned = keras.models.clone_model(model, clone_function=apply)
    assert sorted(w.layer.name for w in _wrappers(pruned)) == ["fc1", "logits"]
    x, _ = data(4)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize(
    "to_prune,kwargs,match",
    [
        ([keras.layers.Dense(2), "dense"], {}, "list must hold keras layers.*Received"),
        ([keras.Sequential([keras.layers.Dense(2)])], {}, "prune models one by one"),
        (keras.layers.Dense(2), {"exclude": ["x"]}, "select layers of a model.*Received"),
    ],
)
def test_layer_forms_bad_input(to_prune, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kib.prune(to_prune, **kwargs)


@pytest.mark.slow
def test_keras_hub_bert_classifier_prunes_attention_and_feed_forward(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    with pytest.warns(UserWarning, match="'bert_backbone/position_embedding'"):
        pruned = kib.prune(model)
    inner = {}
    for w in _wrappers(pruned):
        inner.setdefault(type(w.layer).__name__, []).append(w.name)
    # Both encoder blocks: attention (query/key/value/output EinsumDense kernels) and FF.
    assert len(inner["MultiHeadAttention"]) == 2
    attention = [w for w in _wrappers(pruned) if type(w.layer).__name__ == "MultiHeadAttention"]
    for w in attention:
        assert [v.path.split("/")[-2] for v in w.prunable_weights] == [
            "query",
            "key",
            "value",
            "attention_output",
        ]
    ff = [n for n in inner["Dense"] if "feedforward" in n]
    assert len(ff) == 4
    masked = sum(int(np.prod(v.shape)) for w in _wrappers(pruned) for v in w.prunable_weights)
    assert masked == 20736  # of 22,050: all but biases, norms and position embeddings
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 100, (8, 16)),
        "segment_ids": np.zeros((8, 16), "int32"),
        "padding_mask": np.ones((8, 16), "int32"),
    }
    y = rng.integers(0, 2, 8)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), score="magnitude")
    pruned.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert kib.sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    for w in attention + [w for w in _wrappers(pruned) if w.name in ff]:
        assert 0.4 < 1 - np.mean([m.numpy().mean() for m in w.masks]) < 0.6, w.name
    expected = pruned.predict(x, verbose=0)
    stripped = kib.strip_pruning(pruned)
    assert not _wrappers(stripped)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), expected, atol=1e-5)
    pruned.save(tmp_path / "bert.keras")
    loaded = keras.models.load_model(tmp_path / "bert.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-5)
    assert len(_wrappers(loaded)) == len(_wrappers(pruned))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: keras.layers.Bidirectional(keras.layers.LSTM(4)), (5, 3)),
        (lambda: keras.layers.TimeDistributed(keras.layers.Dense(4)), (5, 3)),
    ],
    ids=["bidirectional", "time_distributed"],
)
@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
def test_keras_wrapper_layers_are_entered(make, shape, tmp_path):
    inp = keras.Input(shape)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(make()(inp)))
    pruned = kib.prune(model, exclude=["out"])
    assert _wrappers(pruned)
    randomize_masks(pruned, 0.5)
    x = make_input(shape)
    masked = pruned.predict(x, verbose=0)
    assert np.abs(masked - model.predict(x, verbose=0)).max() > 1e-4  # masks act
    np.testing.assert_allclose(kib.strip_pruning(pruned).predict(x, verbose=0), masked, atol=1e-5)
    pruned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), masked, atol=1e-6)


def test_pattern_applies_to_dense_and_conv_only():
    inp = keras.Input((6, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    out = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h))
    with pytest.warns(UserWarning, match=r"unstructured masks instead: \['mha'\]"):
        pruned = kib.prune(keras.Model(inp, out), pattern="2:4")
    by_name = {w.layer.name: w for w in kib.stats.find_wrappers(pruned)}
    assert by_name["fc"].pattern == (2, 4) and by_name["mha"].pattern is None
    with pytest.raises(ValueError, match="applies to Dense and Conv1D/2D/3D.*Received: layer="):
        kib.PruneWrapper(keras.layers.MultiHeadAttention(2, 4), pattern="2:4")
