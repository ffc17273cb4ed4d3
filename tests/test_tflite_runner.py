"""The private LiteRT runner: inputs fed by the names `export_tflite` gave them."""

import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune._tflite_runner import Runner


def test_dict_keyed_by_model_input_names_reaches_renamed_inputs(tmp_path):
    # A name the signature cannot carry ("1x": leading digit) is renamed at export;
    # the model's own names still feed the file.
    a, b = keras.Input((4,), name="1x"), keras.Input((3,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    rng = np.random.default_rng(0)
    x = {"1x": rng.random((8, 4), dtype="float32"), "b": rng.random((8, 3), dtype="float32")}
    path = tmp_path / "m.tflite"
    report = kib.export_tflite(model, str(path), sparse=False, verify_data=x)
    assert sorted(i["name"] for i in report.inputs) == ["b", "input_1x"]
    runner = Runner(str(path))
    np.testing.assert_allclose(runner.predict(x), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="Received: inputs keyed"):
        runner.predict({"1x": x["1x"]})
