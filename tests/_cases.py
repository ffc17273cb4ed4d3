"""Shared tables for the tests: prunable layer types and model kinds."""

import keras
import numpy as np

import keras_ibprune as kib

L = keras.layers


@keras.saving.register_keras_serializable(package="keras_ibprune_tests")
class MinimalCell(L.Layer):
    """A custom RNN cell that opts in with `get_prunable_weights()`."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, self.units), name="recurrent")

    def call(self, x, states):
        h = keras.ops.tanh(x @ self.kernel + states[0] @ self.recurrent)
        return h, [h]

    def get_prunable_weights(self):
        return [self.kernel, self.recurrent]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


# (id, layer factory, input shape without batch, integer inputs?)
LAYER_CASES = [
    ("dense", lambda: L.Dense(6, activation="relu"), (5,), False),
    ("einsum_dense", lambda: L.EinsumDense("ab,bc->ac", output_shape=6), (5,), False),
    ("conv1d", lambda: L.Conv1D(4, 3), (8, 3), False),
    ("conv2d", lambda: L.Conv2D(4, 3, activation="relu"), (6, 6, 2), False),
    ("conv3d", lambda: L.Conv3D(3, 2), (4, 4, 4, 2), False),
    ("conv1d_transpose", lambda: L.Conv1DTranspose(3, 3), (6, 2), False),
    ("conv2d_transpose", lambda: L.Conv2DTranspose(3, 3), (5, 5, 2), False),
    ("depthwise_conv2d", lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 3), False),
    ("separable_conv1d", lambda: L.SeparableConv1D(4, 3), (8, 3), False),
    ("separable_conv2d", lambda: L.SeparableConv2D(4, 3), (6, 6, 3), False),
    ("embedding", lambda: L.Embedding(20, 4), (7,), True),
    ("simple_rnn", lambda: L.SimpleRNN(4), (5, 3), False),
    ("lstm", lambda: L.LSTM(4), (5, 3), False),
    ("gru", lambda: L.GRU(4), (5, 3), False),
    ("rnn_simple_cell", lambda: L.RNN(L.SimpleRNNCell(4)), (5, 3), False),
    ("rnn_lstm_cell", lambda: L.RNN(L.LSTMCell(4), return_sequences=True), (5, 3), False),
    ("rnn_gru_cell", lambda: L.RNN(L.GRUCell(4)), (5, 3), False),
    ("rnn_cell_list", lambda: L.RNN([L.LSTMCell(4), L.GRUCell(3)]), (5, 3), False),
    (
        "rnn_stacked_cells",
        # two cells: a one-cell StackedRNNCells fails in Keras 3.15 itself on JAX
        lambda: L.RNN(L.StackedRNNCells([L.SimpleRNNCell(4), L.SimpleRNNCell(3)])),
        (5, 3),
        False,
    ),
    ("rnn_custom_cell", lambda: L.RNN(MinimalCell(4)), (5, 3), False),
]
LAYER_IDS = [c[0] for c in LAYER_CASES]


def _attention_mask(x):
    """A data-dependent (batch, T, T) mask built with keras.ops (works on symbolic x)."""
    keep = keras.ops.greater(keras.ops.abs(x[:, :, :1]), 0.3)
    return keras.ops.logical_and(keep, keras.ops.transpose(keep, (0, 2, 1)))


# Call forms other than one positional input: (id, factory, input shape, call(layer, x)).
CALL_CASES = [
    (
        "mha_keywords",
        lambda: L.MultiHeadAttention(2, 4),
        (5, 8),
        lambda layer, x: layer(query=x, value=x),
    ),
    (
        "mha_key_keyword",
        lambda: L.MultiHeadAttention(2, 4),
        (5, 8),
        lambda layer, x: layer(x, value=x, key=x),
    ),
    (
        "mha_attention_mask",
        lambda: L.MultiHeadAttention(2, 4),
        (5, 8),
        lambda layer, x: layer(query=x, value=x, attention_mask=_attention_mask(x)),
    ),
    (
        "mha_causal_training",
        lambda: L.MultiHeadAttention(2, 4, dropout=0.5),
        (5, 8),
        lambda layer, x: layer(x, x, use_causal_mask=True, training=False),
    ),
    ("dense_keyword", lambda: L.Dense(3), (4,), lambda layer, x: layer(inputs=x)),
    (
        "lstm_mask_keyword",
        lambda: L.LSTM(3),
        (5, 2),
        lambda layer, x: layer(x, mask=keras.ops.greater(x[:, :, 0], -0.5)),
    ),
]
CALL_IDS = [c[0] for c in CALL_CASES]


def make_input(shape, integer=False, n=4, seed=0):
    rng = np.random.default_rng(seed)
    if integer:
        return rng.integers(0, 20, size=(n, *shape))
    return rng.standard_normal((n, *shape)).astype("float32")


def small_cnn(input_shape=(8, 8, 1), classes=10):
    inp = keras.Input(input_shape)
    h = L.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = L.MaxPooling2D()(h)
    h = L.Flatten()(h)
    h = L.Dense(32, activation="relu", name="fc1")(h)
    out = L.Dense(classes, name="logits")(h)
    return keras.Model(inp, out, name="small_cnn")


# The start of the subprocess scripts that run a statistics pass under a MirroredStrategy
# over two logical CPUs (argv[1]: the tests folder): small_cnn, data x/y, `strategy`.
MIRRORED_SETUP = """
import sys, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, keras_ibprune as kib
sys.path.insert(0, sys.argv[1])
from _cases import small_cnn
rng = np.random.default_rng(1)
x = rng.standard_normal((300, 8, 8, 1)).astype("float32")
y = rng.integers(0, 10, 300)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""


def tiny_conv_fc():
    """Conv 6x6x1 -> Dense 12 -> 3 outputs, wrapped: the held-out streaming/sharding model."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = L.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = L.Dense(12, activation="relu", name="fc")(L.Flatten()(h))
    return kib.prune(keras.Model(inp, L.Dense(3, name="out")(h)))


def tiny_xy(n=90, seed=0):
    """Held-out data for `tiny_conv_fc`: normal images, labels cycling over 3 classes."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), np.arange(n) % 3


def _sequential():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv"),
            L.Flatten(),
            L.Dense(16, activation="relu", name="fc1"),
            L.Dense(10, name="logits"),
        ],
        name="seq",
    )


def _nested():
    inner = keras.Sequential(
        [keras.Input((8, 8, 1)), L.Conv2D(8, 3, activation="relu", name="conv"), L.Flatten()],
        name="features",
    )
    inp = keras.Input((8, 8, 1))
    h = inner(inp)
    h = L.Dense(16, activation="relu", name="fc1")(h)
    return keras.Model(inp, L.Dense(10, name="logits")(h), name="nested")


def _reused():
    shared = L.Dense(16, activation="relu", name="shared")
    inp = keras.Input((8, 8, 1))
    h = L.Flatten()(inp)
    h = L.Dense(16, activation="relu", name="fc0")(h)
    h = shared(h)
    h = shared(h)
    return keras.Model(inp, L.Dense(10, name="logits")(h), name="reused")


@keras.saving.register_keras_serializable(package="keras_ibprune_tests")
class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = kib.PruneWrapper(L.Conv2D(8, 3, activation="relu", name="conv"))
        self.flat = L.Flatten()
        self.fc1 = kib.PruneWrapper(L.Dense(16, activation="relu", name="fc1"))
        self.logits = L.Dense(10, name="logits")

    def call(self, x):
        return self.logits(self.fc1(self.flat(self.conv(x))))


@keras.saving.register_keras_serializable(package="keras_ibprune_tests")
class ConvDenseBlock(L.Layer):
    """A custom layer (not a Model) holding prunable layers, one of them two levels down."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 3, activation="relu", name="conv")
        self.head = [L.Dense(16, activation="relu", name="fc1"), L.LayerNormalization()]

    def build(self, input_shape):
        self.conv.build(input_shape)
        h, w, c = self.conv.compute_output_shape(input_shape)[1:]
        self.head[0].build((None, h * w * c))
        self.head[1].build((None, 16))

    def call(self, x):
        h = self.conv(x)
        h = keras.ops.reshape(h, (keras.ops.shape(h)[0], -1))
        return self.head[1](self.head[0](h))


def _custom_layer():
    inp = keras.Input((8, 8, 1))
    h = ConvDenseBlock(name="block")(inp)
    return keras.Model(inp, L.Dense(10, name="logits")(h), name="custom_layer")


def _subclassed():
    model = SubclassedNet(name="sub")
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


MODEL_KINDS = {
    "sequential": _sequential,
    "functional": small_cnn,
    "nested": _nested,
    "reused": _reused,
    "custom_layer": _custom_layer,
    "subclassed": _subclassed,
}


def pruned_model(kind):
    """A model of the given kind with its prunable layers wrapped."""
    model = MODEL_KINDS[kind]()
    return model if kind == "subclassed" else kib.prune(model, exclude=["logits"])


def data(n=128, seed=0, shape=(8, 8, 1), classes=10):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype("float32")
    y = rng.integers(0, classes, n)
    return x, y


def randomize_masks(model, sparsity=0.5, seed=0):
    rng = np.random.default_rng(seed)
    for w in kib.stats.find_wrappers(model):
        for m in w.masks:
            m.assign((rng.random(tuple(m.shape)) >= sparsity).astype("float32"))
