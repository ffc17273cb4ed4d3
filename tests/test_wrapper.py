import keras
import numpy as np
import pytest
from _cases import CALL_CASES, CALL_IDS, LAYER_CASES, LAYER_IDS, make_input

import keras_ibprune as kib
from keras_ibprune.wrapper import PruneWrapper

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)

L = keras.layers


def _twin(factory, shape, integer):
    """A built plain layer and a wrapped copy holding the same weights."""
    plain = factory()
    x = make_input(shape, integer)
    plain(x)
    wrapped = PruneWrapper(factory())
    wrapped(x)
    wrapped.layer.set_weights(plain.get_weights())
    return plain, wrapped, x


@pytest.mark.parametrize("name,factory,shape,integer", LAYER_CASES, ids=LAYER_IDS)
def test_all_ones_mask_equals_plain_layer(name, factory, shape, integer):
    plain, wrapped, x = _twin(factory, shape, integer)
    assert len(wrapped.masks) == len(wrapped.prunable_weights) >= 1
    np.testing.assert_allclose(np.asarray(wrapped(x)), np.asarray(plain(x)), atol=1e-6)


@pytest.mark.parametrize("name,factory,shape,integer", LAYER_CASES, ids=LAYER_IDS)
def test_mask_equals_zeroed_weights(name, factory, shape, integer):
    plain, wrapped, x = _twin(factory, shape, integer)
    rng = np.random.default_rng(0)
    for m in wrapped.masks:
        m.assign((rng.random(tuple(m.shape)) > 0.5).astype("float32"))
    # Oracle: the plain layer with the masked weights written into it.
    by_id = {id(v): v for v in plain.weights}
    order = [id(v) for v in wrapped.layer.weights]
    masked = {id(w): w.numpy() * m.numpy() for w, m in zip(wrapped.prunable_weights, wrapped.masks)}
    values = [masked.get(i, v.numpy()) for i, v in zip(order, wrapped.layer.weights)]
    plain.set_weights(values)
    assert len(by_id) == len(values)
    out = np.asarray(wrapped(x))
    np.testing.assert_allclose(out, np.asarray(plain(x)), atol=1e-5)
    # The stored weights themselves are untouched by the forward pass.
    assert any(
        np.count_nonzero(w.numpy() * (1 - m.numpy()))
        for w, m in zip(wrapped.prunable_weights, wrapped.masks)
    )


def test_pruned_weights_get_zero_gradient():
    model = keras.Sequential([keras.Input((6,)), PruneWrapper(L.Dense(4, name="d"))])
    w = model.layers[0]
    mask = np.ones((6, 4), "float32")
    mask[:3] = 0
    w.masks[0].assign(mask)
    before = w.layer.kernel.numpy().copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(np.random.rand(16, 6), np.random.rand(16, 4), epochs=2, verbose=0)
    after = w.layer.kernel.numpy()
    np.testing.assert_array_equal(after[:3], before[:3])
    assert np.abs(after[3:] - before[3:]).max() > 0


def test_channel_granularity_zeroes_units_after_activation():
    inner = L.Dense(5, activation="sigmoid")
    w = PruneWrapper(inner, granularity="channel")
    x = np.random.rand(3, 4).astype("float32")
    w(x)
    assert tuple(w.unit_mask.shape) == (5,)
    w.unit_mask.assign(np.array([1, 0, 1, 0, 1], "float32"))
    out = np.asarray(w(x))
    assert np.all(out[:, [1, 3]] == 0) and np.all(out[:, [0, 2, 4]] > 0)
    np.testing.assert_allclose(out[:, 0], np.asarray(inner(x))[:, 0], atol=1e-6)


def test_capture_records_preactivation():
    w = PruneWrapper(L.Dense(3, activation="relu"))
    x = np.random.randn(8, 4).astype("float32")
    w(x)
    rec = []
    w._capture = rec
    out = w(x)
    w._capture = None
    ((xin, pre, post),) = rec
    np.testing.assert_allclose(
        np.asarray(pre), x @ w.layer.kernel.numpy() + w.layer.bias.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(post), np.maximum(np.asarray(pre), 0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(post))
    assert w.layer.activation is keras.activations.relu


def test_multi_head_attention_masks_four_kernels():
    mha = L.MultiHeadAttention(num_heads=2, key_dim=4)
    inp = keras.Input((5, 8))
    w = PruneWrapper(mha)
    model = keras.Model(inp, w(inp, inp))
    assert len(w.masks) == 4
    q = np.random.rand(2, 5, 8).astype("float32")
    np.testing.assert_allclose(np.asarray(model(q)), np.asarray(mha(q, q)), atol=1e-5)


def test_custom_layer_opts_in():
    class Scale(L.Layer):
        def build(self, shape):
            self.k = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.k

        def get_prunable_weights(self):
            return [self.k]

    w = PruneWrapper(Scale())
    x = np.ones((2, 3), "float32")
    w(x)
    w.masks[0].assign(np.array([1, 0, 1], "float32"))
    np.testing.assert_array_equal(np.asarray(w(x)), [[1, 0, 1], [1, 0, 1]])


def test_config_round_trip():
    w = PruneWrapper(L.Dense(4), granularity="weight", block_size=(1, 4), name="pw")
    config = w.get_config()
    clone = PruneWrapper.from_config(config)
    assert clone.get_config() == config
    assert clone.block_size == (1, 4) and clone.layer.units == 4
    ser = keras.saving.serialize_keras_object(w)
    assert ser["registered_name"] == "keras_ibprune>PruneWrapper"
    assert isinstance(keras.saving.deserialize_keras_object(ser), PruneWrapper)


def test_wrapping_twice_is_an_error():
    w = PruneWrapper(L.Dense(4))
    with pytest.raises(ValueError, match="already a PruneWrapper"):
        PruneWrapper(w)


@pytest.mark.parametrize(
    "layer,kwargs,match",
    [
        (L.BatchNormalization(), {}, "cannot be pruned.*get_prunable_weights"),
        (L.Dense(3), {"granularity": "filter"}, "granularity"),
        (L.Dense(3), {"block_size": (0, 4)}, "block_size"),
        (L.Embedding(5, 2), {"granularity": "channel"}, "channel"),
        ("dense", {}, "keras.layers.Layer"),
    ],
)
def test_bad_arguments(layer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneWrapper(layer, **kwargs)


def test_model_is_rejected():
    with pytest.raises(ValueError, match="not a model"):
        PruneWrapper(keras.Sequential([L.Dense(2)]))


def test_no_mask_memory_per_step():
    w = PruneWrapper(L.Dense(4))
    w(np.ones((1, 3), "float32"))
    assert [tuple(v.shape) for v in w.non_trainable_weights] == [(3, 4)]
    assert kib.is_prunable(L.Dense(1)) and not kib.is_prunable(L.Flatten())


# ---------------------------------------------- call forms: keywords, several inputs, masks
def _call_twin(factory, shape, call):
    plain, wrapped = factory(), PruneWrapper(factory())
    x = make_input(shape)
    call(plain, x)
    call(wrapped, x)
    wrapped.layer.set_weights(plain.get_weights())
    return plain, wrapped, x


@pytest.mark.parametrize("name,factory,shape,call", CALL_CASES, ids=CALL_IDS)
def test_wrapper_forwards_every_call_form(name, factory, shape, call):
    plain, wrapped, x = _call_twin(factory, shape, call)
    np.testing.assert_allclose(np.asarray(call(wrapped, x)), np.asarray(call(plain, x)), atol=1e-5)
    rng = np.random.default_rng(0)
    for m in wrapped.masks:
        m.assign((rng.random(tuple(m.shape)) > 0.5).astype("float32"))
    plain.set_weights([w * m for w, m in _masked_pairs(wrapped)])
    np.testing.assert_allclose(np.asarray(call(wrapped, x)), np.asarray(call(plain, x)), atol=1e-5)


def _masked_pairs(wrapped):
    masks = {id(w): m.numpy() for w, m in zip(wrapped.prunable_weights, wrapped.masks)}
    return [(w.numpy(), masks.get(id(w), 1.0)) for w in wrapped.layer.weights]


@pytest.mark.parametrize("name,factory,shape,call", CALL_CASES, ids=CALL_IDS)
def test_call_forms_in_a_functional_model(name, factory, shape, call):
    inp = keras.Input(shape)
    wrapped = PruneWrapper(factory())
    model = keras.Model(inp, call(wrapped, inp))
    assert wrapped.masks and len(wrapped.masks) == len(wrapped.prunable_weights)
    x = make_input(shape)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(call(wrapped, x)), atol=1e-6)


def test_capture_takes_the_first_input_from_keywords():
    w = PruneWrapper(L.MultiHeadAttention(2, 4))
    q = np.random.default_rng(0).random((2, 5, 8)).astype("float32")
    w(query=q, value=q)
    rec = []
    w._capture = rec
    out = w(query=q, value=q, attention_mask=np.ones((2, 5, 5), "bool"))
    w._capture = None
    ((xin, _, post),) = rec
    np.testing.assert_array_equal(np.asarray(xin), q)
    np.testing.assert_array_equal(np.asarray(post), np.asarray(out))


def test_generic_rnn_masks_every_cell_weight():
    rnn = L.RNN([L.LSTMCell(4), L.GRUCell(3)])
    w = PruneWrapper(rnn)
    w(np.ones((2, 5, 3), "float32"))
    cells = rnn.cell.cells
    expected = [
        cells[0].kernel,
        cells[0].recurrent_kernel,
        cells[1].kernel,
        cells[1].recurrent_kernel,
    ]
    assert [id(v) for v in w.prunable_weights] == [id(v) for v in expected]
    assert [tuple(m.shape) for m in w.masks] == [tuple(v.shape) for v in expected]


def test_rnn_with_an_unsupported_cell_names_the_cell():
    class OpaqueCell(L.Layer):
        state_size = 2

        def call(self, x, states):
            return x[:, :2], states

    with pytest.raises(ValueError, match=r"cell\(s\) \['OpaqueCell'\] are not prunable"):
        PruneWrapper(L.RNN(OpaqueCell()))
    assert not kib.is_prunable(L.RNN(OpaqueCell()))


# ------------------------------------------------------- mixed precision and XLA (jit_compile)
@pytest.fixture
def global_policy():
    before = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(before)


@pytest.mark.parametrize(
    "policy,jit",
    [
        ("mixed_float16", False),
        pytest.param("mixed_float16", True, marks=pytest.mark.slow),  # XLA compiles: ~10 s
        pytest.param("float32", True, marks=pytest.mark.slow),
    ],
)
def test_training_with_mixed_precision_and_jit(global_policy, policy, jit):
    global_policy(policy)
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(16, activation="relu"), L.Dense(16), L.Dense(3)]
    )
    pruned = kib.prune(model)
    pruned.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 6)).astype("float32"), rng.integers(0, 3, 64)
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), score="magnitude")
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    for w in kib.stats.find_wrappers(pruned):
        assert w.compute_dtype == compute
        for m, v in zip(w.masks, w.prunable_weights):
            assert m.dtype == "float32" and v.dtype == "float32"
            assert (m.numpy() == 0).mean() == pytest.approx(0.5, abs=0.01)
            assert np.all(v.numpy()[m.numpy() == 0] == 0)
    out = pruned.predict(x, verbose=0)
    assert out.dtype == compute
    # The forward pass equals the plain model holding the masked weights.
    stripped = kib.strip_pruning(pruned)
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), out)
    # A channel mask multiplies the output in the compute dtype.
    ch = PruneWrapper(L.Dense(4), granularity="channel")
    ch(np.ones((2, 3), "float32"))
    ch.unit_mask.assign(np.array([1, 0, 1, 0], "float32"))
    res = ch(np.ones((2, 3), "float32"))
    assert res.dtype == compute and ch.unit_mask.dtype == "float32"
    assert np.all(np.asarray(res)[:, [1, 3]] == 0)


def test_tf_checkpoint_reaches_the_masks(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.train.Checkpoint is TensorFlow's")
    import tensorflow as tf

    def build():
        keras.utils.set_random_seed(0)
        return kib.prune(keras.Sequential([keras.Input((4,)), L.Dense(8), L.Dense(2)]))

    model = build()
    for w in kib.stats.find_wrappers(model):
        m = (np.arange(w.masks[0].shape[0] * w.masks[0].shape[1]) % 3 > 0).astype("float32")
        w.masks[0].assign(m.reshape(w.masks[0].shape))
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    restored = build()
    tf.train.Checkpoint(model=restored).restore(path).assert_existing_objects_matched()
    for a, b in zip(kib.stats.find_wrappers(model), kib.stats.find_wrappers(restored)):
        np.testing.assert_array_equal(a.masks[0].numpy(), b.masks[0].numpy())
