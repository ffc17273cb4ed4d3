"""Models built and saved by tf_keras (Keras 2) code: load into Keras 3, prune, train, strip."""

import os
import sys

import keras
import numpy as np
import pytest

import keras_ibprune as kib

tf_keras = pytest.importorskip("tf_keras")
tf = pytest.importorskip("tensorflow")


def _legacy_sequential():
    L = tf_keras.layers
    return tf_keras.Sequential(
        [
            L.InputLayer((8, 8, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv"),
            L.BatchNormalization(name="bn"),
            L.Flatten(),
            L.Dense(16, activation="relu", name="fc1"),
            L.Dense(4, name="logits"),
        ],
        name="legacy_seq",
    )


def _legacy_functional():
    L = tf_keras.layers
    inp = tf_keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU()(h)
    h = L.MaxPooling2D()(h)
    h = L.Flatten()(h)
    h = L.Dense(16, activation="relu", name="fc1")(h)
    out = L.Dense(4, name="logits")(h)
    return tf_keras.Model(inp, out, name="legacy_fun")


class _LegacyScale(tf_keras.layers.Layer):  # a tf_keras custom layer, as TF 2.15 code wrote it
    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(input_shape[-1],), initializer="random_normal"
        )

    def call(self, x):
        return x * self.gamma


class Scale(keras.layers.Layer):  # its Keras 3 port
    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],))

    def call(self, x):
        return x * self.gamma


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 1)).astype("float32")
    y = (x[:, :4, :4, 0].mean((1, 2)) > 0).astype("int64") + 2 * (x[:, 4:, 4:, 0].mean((1, 2)) > 0)
    return x, y


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """`get(kind, fmt)`: a tf_keras model trained one epoch (BN statistics moved) and saved
    as `.h5` or SavedModel (made on first use): `{"path", "pred", "model"}`."""
    d = tmp_path_factory.mktemp("legacy")
    x, y = _data()
    models, files = {}, {}

    def get(kind, fmt):
        if kind not in models:
            tf_keras.utils.set_random_seed(0)
            model = {"sequential": _legacy_sequential, "functional": _legacy_functional}[kind]()
            model.compile(
                "adam",
                tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            model.fit(x, y, epochs=1, batch_size=32, verbose=0)
            models[kind] = (model, model.predict(x, verbose=0))
        model, pred = models[kind]
        if (kind, fmt) not in files:
            path = d / (f"{kind}.h5" if fmt == "h5" else f"{kind}_savedmodel")
            model.save(path, save_format="h5" if fmt == "h5" else "tf")
            files[kind, fmt] = path
        return {"path": files[kind, fmt], "pred": pred, "model": model}

    return get


@pytest.mark.parametrize(
    "kind, fmt",
    [
        ("sequential", "h5"),
        pytest.param("functional", "h5", marks=pytest.mark.slow),
        pytest.param("sequential", "savedmodel", marks=pytest.mark.slow),
        pytest.param("functional", "savedmodel", marks=pytest.mark.slow),
    ],
)
def test_legacy_file_loads_prunes_trains_strips(legacy, kind, fmt):
    x, y = _data()
    saved = legacy(kind, fmt)
    model = kib.load_legacy_model(saved["path"])
    assert isinstance(model, keras.Model) and not model.compiled
    assert [la.name for la in model.layers if la.weights][:2] == ["conv", "bn"]
    np.testing.assert_allclose(model.predict(x, verbose=0), saved["pred"], atol=1e-5)

    pruned = kib.prune(model)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), held_out=(x[:64], y[:64]))
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    final = kib.strip_pruning(pruned)
    assert kib.sparsity(final) == pytest.approx(0.5, abs=1e-3)
    assert np.all(np.isfinite(final.predict(x, verbose=0)))


@pytest.mark.parametrize("fmt", ["h5", pytest.param("savedmodel", marks=pytest.mark.slow)])
def test_custom_layer_needs_a_keras3_port(tmp_path, fmt):
    x, _ = _data(8)
    inp = tf_keras.Input((8, 8, 1))
    h = tf_keras.layers.Flatten()(_LegacyScale(name="scale")(inp))
    legacy_model = tf_keras.Model(inp, tf_keras.layers.Dense(3, name="out")(h))
    path = tmp_path / ("custom.h5" if fmt == "h5" else "custom_sm")
    legacy_model.save(path, save_format="h5" if fmt == "h5" else "tf")
    with pytest.raises(
        ValueError,
        match=r"custom layer class\(es\) \['_LegacyScale'\]"
        r".*custom_objects=\{'_LegacyScale'",
    ):
        kib.load_legacy_model(path)
    model = kib.load_legacy_model(path, custom_objects={"_LegacyScale": Scale})
    assert isinstance(model.get_layer("scale"), Scale)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), legacy_model.predict(x, verbose=0), atol=1e-6
    )


def test_tf_keras_model_in_memory():
    x, _ = _data(16)
    legacy_model = _legacy_functional()
    model = kib.load_legacy_model(legacy_model)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), legacy_model.predict(x, verbose=0), atol=1e-5
    )
    with pytest.raises(ValueError, match="already a Keras 3 model"):
        kib.load_legacy_model(model)
    with pytest.raises(TypeError, match="Received: source=3"):
        kib.load_legacy_model(3)


def test_savedmodel_without_keras_metadata_says_what_to_do(tmp_path):
    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return 2.0 * x

    tf.saved_model.save(Doubler(), str(tmp_path / "raw"))
    with pytest.raises(ValueError, match=r"no Keras metadata.*TFSMLayer.*Received: path="):
        kib.load_legacy_model(tmp_path / "raw")


def test_subclassed_legacy_model_says_what_to_do(tmp_path):
    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = tf_keras.layers.Dense(2)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    net.save(tmp_path / "sub", save_format="tf")
    with pytest.raises(ValueError, match=r"subclassed model.*set_weights"):
        kib.load_legacy_model(tmp_path / "sub")


def test_savedmodel_without_tf_keras_is_a_clear_error(legacy, monkeypatch, tmp_path):
    for name in ("saved_model.pb", "keras_metadata.pb"):  # a SavedModel as far as we look
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tf_keras", None)  # `import tf_keras` raises ImportError
    with pytest.raises(ImportError, match=r"pip install tf_keras.*model\.save\('model\.h5'\)"):
        kib.load_legacy_model(tmp_path)
    h5 = legacy("sequential", "h5")["path"]
    assert kib.load_legacy_model(h5).name == "legacy_seq"  # .h5 files do not need tf_keras


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="No model found.*Received: path="):
        kib.load_legacy_model(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="not a SavedModel"):
        kib.load_legacy_model(tmp_path)
    weights_only = tmp_path / "w.weights.h5"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save_weights(weights_only)
    with pytest.raises(ValueError, match="no model config.*load_weights"):
        kib.load_legacy_model(weights_only)


def test_hdf5_without_the_extension(legacy, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(legacy("sequential", "h5")["path"].read_bytes())
    assert kib.load_legacy_model(os.fspath(path)).name == "legacy_seq"


def test_legacy_training_config_that_keras3_cannot_read(legacy):
    # tf_keras writes `fn` into the loss config, which Keras 3's loss classes reject.
    with pytest.raises(ValueError, match="compile=False"):
        kib.load_legacy_model(legacy("sequential", "h5")["path"], compile=True)


@pytest.mark.slow
def test_legacy_savedmodel_exports_to_tflite(legacy, tmp_path):
    x, y = _data()
    pruned = kib.prune(kib.load_legacy_model(legacy("functional", "savedmodel")["path"]))
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[kib.IBPruning(kib.ConstantSparsity(0.5), held_out=(x[:64], y[:64]))],
    )
    report = kib.export_tflite(pruned, tmp_path / "legacy.tflite", verify_data=x[:16])
    assert (tmp_path / "legacy.tflite").stat().st_size == report.file_bytes > 0


@pytest.mark.slow
def test_pipelines_doc_runs_as_written(tmp_path):
    from test_docs import DOCS, blocks, run_blocks  # the docs' one block runner

    codes = blocks(DOCS / "pipelines.md")
    assert len(codes) == 3
    try:
        namespace, out = run_blocks(codes, tmp_path)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert kib.sparsity(keras.models.load_model(tmp_path / "pruned.keras")) == pytest.approx(
        0.5, abs=1e-3
    )
    assert "float32 float16" in out
    assert kib.sparsity(kib.strip_pruning(namespace["mixed"])) == pytest.approx(0.5, abs=1e-3)
    assert keras.mixed_precision.global_policy().name == "float32"
