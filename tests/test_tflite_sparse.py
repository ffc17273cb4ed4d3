"""Tests for keras_ibprune._tflite_sparse (decoding and repairing sparse TFLite tensors)."""

import keras
import numpy as np
import pytest

from keras_ibprune import _tflite_inspect, _tflite_sparse, signature
from keras_ibprune.export import _convert, export_tflite

FAST = {"compare_dense": False, "latency_runs": 0}


def _mlp(n_in, sparsity, block=False, seed=0):
    """Dense(n_in -> 32 -> 4), first kernel pruned (unstructured or in (16, 1) blocks)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((n_in,)),
            keras.layers.Dense(32, activation="relu", name="a"),
            keras.layers.Dense(4, name="b"),
        ]
    )
    kernel = model.get_layer("a").kernel.numpy()
    if block:
        tiles = np.abs(kernel).reshape(n_in // 16, 16, 32).sum(1)
        keep = np.repeat(tiles > np.quantile(tiles, sparsity), 16, 0)
    else:
        keep = np.abs(kernel) > np.quantile(np.abs(kernel), sparsity)
    model.get_layer("a").kernel.assign(kernel * keep)
    x = np.random.default_rng(seed).normal(size=(128, n_in)).astype("float32")
    return model, x


def _int8_files(model, x):
    inputs = signature.file_inputs(model, None, (x, x))
    rep = signature.check_data("representative_data", x, model, inputs)
    return (
        _convert(model, inputs, False, "int8", rep, "float32"),
        _convert(model, inputs, True, "int8", rep, "float32"),
    )


def _tensor(tflite, n_in):
    model_t = _tflite_inspect.unpack(tflite)
    for tensor in model_t.subgraphs[0].tensors:
        if list(tensor.shape) == [32, n_in]:
            data = _tflite_inspect.buffer_bytes(model_t, tensor, tflite)
            return tensor, np.frombuffer(data, np.int8)
    raise AssertionError("weight tensor not found")


@pytest.mark.slow  # two int8 conversions: ~4 s on 2 cores
def test_decode_of_a_valid_block_encoding_gives_the_dense_values():
    model, x = _mlp(48, 0.5, block=True)
    dense, sparse = _int8_files(model, x)
    tensor, values = _tensor(sparse, 48)
    assert _tflite_sparse.block_shape(tensor) == [1, 16]
    decoded, reason = _tflite_sparse.decode(tensor, values)
    assert reason is None
    np.testing.assert_array_equal(decoded, _tensor(dense, 48)[1].reshape(32, 48))
    assert _tflite_sparse.repair(sparse, dense) == (sparse, [])  # nothing to repair


@pytest.mark.slow
def test_decode_rejects_the_converters_int8_block_encoding_of_8_inputs():
    model, x = _mlp(8, 0.5)
    dense, sparse = _int8_files(model, x)
    tensor, values = _tensor(sparse, 8)
    decoded, reason = _tflite_sparse.decode(tensor, values)
    assert decoded is None and reason == "block 1x16 does not tile dimension 1 of size 8"
    fixed, repaired = _tflite_sparse.repair(sparse, dense)
    assert [r for _, r in repaired] == [reason]
    tensor, values = _tensor(fixed, 8)
    assert tensor.sparsity is None
    np.testing.assert_array_equal(values, _tensor(dense, 8)[1])


@pytest.mark.parametrize("sparsity", [0.5, pytest.param(0.8, marks=pytest.mark.slow)])
def test_int8_sparse_export_of_a_dense_layer_with_few_inputs_verifies(sparsity, tmp_path):
    # Before the repair: top-1 agreement 0.19 (0.5) / 0.05 (0.8), ExportVerificationError.
    model, x = _mlp(8, sparsity)
    report = export_tflite(
        model,
        tmp_path / "q.tflite",
        quantize="int8",
        sparse=True,
        representative_data=x,
        verify_data=x,
        **FAST,
    )
    assert report.top1_agreement >= 0.98
    assert any("stored dense: the converter's sparse encoding was wrong" in n for n in report.notes)
    weight = [t for t in report.tensors if t["shape"] == [32, 8]]
    assert [t["storage"] for t in weight] == ["dense"]


@pytest.mark.slow  # ~3 s on 2 cores (two int8 conversions): run by .ci/run's slow pass
def test_int8_dense_layer_read_through_densify_is_stored_dense_so_xnnpack_runs_it(tmp_path):
    """A quantized FULLY_CONNECTED fed by DENSIFY made XNNPACK refuse the whole file
    (every op on the builtin kernels: 4-5x slower on MobileNetV2); now stored dense."""
    from keras_ibprune import _tflite_runner

    rng = np.random.default_rng(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc1")(h)
    model = keras.Model(inp, keras.layers.Dense(10, name="logits")(h))
    for name in ("conv", "fc1", "logits"):
        layer = model.get_layer(name)
        k = np.asarray(layer.kernel)
        layer.kernel.assign(k * (rng.random(k.shape) >= 0.5))  # unstructured: CSR
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    report = export_tflite(model, tmp_path / "q.tflite", quantize="int8", sparse=True,
                           representative_data=x, verify_data=x, **FAST)
    fcs = [r for r in report.op_table if r["op"] == "FULLY_CONNECTED"]
    assert len(fcs) == 2 and all(r["weights"] == "dense" and r["delegated"] for r in fcs)
    assert "DENSIFY" not in report.ops or all(
        r["op"] != "FULLY_CONNECTED" for r in report.op_table if r["weights"] != "dense")
    assert sum("XNNPACK cannot delegate an int8 FULLY_CONNECTED" in n for n in report.notes) == 2
    assert _tflite_runner.Runner(str(tmp_path / "q.tflite")).notes == []  # delegated
    assert report.top1_agreement >= 0.95


def test_delegate_refusal_note_is_plain_words():
    from keras_ibprune._tflite_runner import _refusal_note

    glued = ("failed to delegate FULLY_CONNECTED node #74Node number 77 "
             "(TfLiteXNNPackDelegate) failed to prepare.")
    note = _refusal_note(glued)
    assert "op #74 (FULLY_CONNECTED)" in note and "Node number" not in note
    assert "builtin kernels" in note
