"""Tests for keras_ibprune.oplist (the per-op view of an export report)."""

import re

import keras
import numpy as np
import pytest

from keras_ibprune import oplist
from keras_ibprune.export import export_tflite


def _model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(8, 3, name="features_conv"),
            keras.layers.BatchNormalization(name="features_bn"),
            keras.layers.ReLU(name="features_relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="hidden_dense"),
            keras.layers.Dense(4, name="class_logits"),
        ],
        name="tiny",
    )


def _prune(model):
    rng = np.random.default_rng(0)
    conv = model.get_layer("features_conv")
    k = np.asarray(conv.kernel)
    conv.kernel.assign(k * (rng.random(k.shape) > 0.8))  # unstructured: DENSIFY'd
    dense = model.get_layer("hidden_dense")
    k = np.asarray(dense.kernel)  # (inputs, units); zero 4 consecutive inputs of a unit
    keep = rng.random((k.shape[0] // 4, k.shape[1])) > 0.8
    dense.kernel.assign(k * np.repeat(keep, 4, axis=0))


@pytest.mark.slow
def test_report_lists_layer_names_and_how_each_op_runs(tmp_path):
    model = _model()
    _prune(model)
    x = np.random.default_rng(1).normal(size=(16, 6, 6, 2)).astype("float32")
    report = export_tflite(
        model,
        str(tmp_path / "m.tflite"),
        sparse=True,
        verify_data=x,
        compare_dense=False,
        latency_runs=5,
    )
    rows = {r["op"]: r for r in report.op_table}
    names = {la.name for la in model.layers}
    for row in report.op_table:
        assert set(row["layers"]) <= names
    conv = rows["CONV_2D"]
    assert conv["layers"][0] == "features_conv" and conv["weights"] == "sparse CSR"
    assert conv["runs"] == "dense" and conv["delegated"]  # DENSIFY'd at load, dense kernel
    assert rows["DENSIFY"]["runs"] == "load"
    fcs = [r for r in report.op_table if r["op"] == "FULLY_CONNECTED"]
    hidden = next(r for r in fcs if "hidden_dense" in r["layers"])
    logits = next(r for r in fcs if "class_logits" in r["layers"])
    # 1x4 block-sparse float FC: LiteRT's builtin kernel reads the sparse encoding.
    assert hidden["weights"] == "sparse block 1x4" and hidden["runs"] == "sparse"
    assert not hidden["delegated"]
    # A plain FC runs dense: in XNNPACK, or (behind the Flatten's dynamic RESHAPE, which
    # XNNPACK does not take) on the builtin kernel; the label follows the delegation.
    assert logits["weights"] == "dense"
    assert logits["runs"] == ("dense" if logits["delegated"] else "fallback")
    assert rows["SHAPE"]["runs"] == "fallback" and not rows["SHAPE"]["delegated"]
    assert not any(r["xnnpack_sparse"] for r in report.op_table)  # no MobileNet layout
    assert set(report.latency_ms_threads) == {1, 4}
    assert all(v > 0 for v in report.latency_ms_threads.values())
    text = str(report)
    table = text[text.index("per op") :].splitlines()[3:]
    listed = set()
    for line in table:  # every listed name is a Keras layer name, printed whole
        listed |= {w for w in re.findall(r"[\w]+", line.split("  ")[-1]) if "_" in w}
    assert listed and listed <= names
    assert "4 threads" in text


def test_layer_names_resolve_keras_scope_suffixes():
    layers = {"conv2d": "Conv2D", "conv2d_1": "Conv2D", "re_lu": "ReLU"}
    name = "functional_1/re_lu_1/Relu;functional_1/conv2d_1_1/convolution"
    assert oplist._layer_names(name, layers, "CONV_2D") == ["re_lu", "conv2d_1"]
    assert oplist._layer_names("model/dense_7/MatMul", {"dense": "Dense"}, "FC") == ["dense"]
    assert oplist._layer_names("unknown/op", layers, "ADD") == []


def test_format_ops_wraps_long_layer_lists_at_commas():
    rows = [
        {
            "index": 0,
            "op": "CONV_2D",
            "runs": "dense",
            "xnnpack_sparse": False,
            "weights": "dense",
            "layers": [f"block_{i}_expand_relu" for i in range(8)],
        }
    ]
    lines = oplist.format_ops(rows, width=80)
    body = lines[2:]
    assert len(body) > 1 and all(len(line) <= 80 for line in body)
    words = " ".join(body).replace(",", " ").split()
    assert [w for w in words if w.startswith("block_")] == rows[0]["layers"]


@pytest.mark.slow
def test_mobilenet_v2_report_names_whole_keras_layers_only(tmp_path):
    """Issue 12's readability bar: the rendered report of a MobileNetV2 export lists Keras
    layer names, whole (the old tensor column cut converter names from the left)."""
    from keras_ibprune.xnnpack import check_xnnpack_sparse

    model = keras.applications.MobileNetV2(
        input_shape=(33, 33, 3), alpha=0.35, weights=None, classes=4
    )
    rng = np.random.default_rng(0)
    for layer in check_xnnpack_sparse(model):
        k = np.asarray(layer.kernel)
        layer.kernel.assign(k * (rng.random(k.shape) >= 0.9))
    x = rng.normal(size=(4, 33, 33, 3)).astype("float32")
    report = export_tflite(
        model, str(tmp_path / "m.tflite"), sparse=True, verify_data=x, compare_dense=False,
        latency_runs=0,
    )
    names = {la.name for la in model.layers}
    weights = [t for t in report.tensors if t["dtype"] == "float32"]
    kernels = [la for la in model.layers if hasattr(la, "kernel")]
    assert len(weights) == len(kernels) == 53
    assert all(t["layers"] and set(t["layers"]) <= names for t in weights)
    assert all(set(r["layers"]) <= names for r in report.op_table)
    assert "block_16_project" in next(t for t in weights if t["shape"] == [112, 1, 1, 336])[
        "layers"
    ]
    # Converter-made tensors (padding amounts) are labelled by a whole name component.
    constants = {re.split(r"[;/]", t["name"])[-1] for t in report.tensors if not t["layers"]}
    assert constants <= {"explicit_padding"}
    text = str(report)
    tables = text[text.index("\nshape ") :].splitlines()
    checked = 0
    for line in tables:
        if line.startswith(("note:", "median latency", "per op", "  #  op", "     (on ARM")):
            continue  # prose and headers
        assert "/" not in line and ";" not in line, line  # no converter tensor paths
        for word in re.findall(r"\w+", line):
            if "_" in word and not word.isupper():  # every multi-part name (not an op
                # code like CONV_2D) printed is a whole layer name
                assert word in names | constants, (word, line)
                checked += 1
    assert checked > 150
