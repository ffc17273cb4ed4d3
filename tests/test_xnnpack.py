"""Tests for keras_ibprune.xnnpack (the XNNPACK sparse policy and graph check) and
keras_ibprune._xnnpack_tflite (its rules applied to exported files)."""

import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune import _tflite_inspect, _xnnpack_tflite
from keras_ibprune.export import export_tflite
from keras_ibprune.xnnpack import check_xnnpack_sparse

FAST = {"compare_dense": False, "latency_runs": 0}


def _mobile(size=17, stem_padding="same", dw2=("pad", 1), first_kernel=3, pw_strides=1, end="gap"):
    """A tiny MobileNet-style model: stem, dw 3x3, 1x1, (pad +) dw 3x3 stride 2, 1x1, GAP."""
    layers = keras.layers
    inp = keras.Input((size, size, 3))
    x = inp
    if stem_padding == "pad":
        x = layers.ZeroPadding2D(1, name="stem_pad")(x)
    x = layers.Conv2D(
        8,
        first_kernel,
        strides=2,
        padding="valid" if stem_padding == "pad" else "same",
        name="stem",
    )(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = layers.Conv2D(16, 1, strides=pw_strides, activation="relu6", name="pw1")(x)
    if dw2[0] == "pad":
        x = layers.ZeroPadding2D(dw2[1], name="dw2_pad")(x)
        x = layers.DepthwiseConv2D(3, strides=2, name="dw2")(x)
    else:
        x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw2")(x)
    y = layers.Conv2D(16, 1, name="pw2")(x)
    x = layers.Add(name="add")([y, layers.Conv2D(16, 1, name="pw3")(y)])
    x = (
        layers.GlobalAveragePooling2D(name="gap")(x)
        if end == "gap"
        else layers.Flatten(name="flat")(x)
    )
    return keras.Model(inp, layers.Dense(4, name="logits")(x))


def _zero_1x1(model, sparsity=0.9, seed=0):
    rng = np.random.default_rng(seed)
    for name in ("pw1", "pw2", "pw3"):
        layer = model.get_layer(name)
        k = np.asarray(layer.kernel)
        layer.kernel.assign(k * (rng.random(k.shape) >= sparsity))


def test_check_returns_only_the_1x1_convs():
    assert [la.name for la in check_xnnpack_sparse(_mobile())] == ["pw1", "pw2", "pw3"]
    assert [la.name for la in check_xnnpack_sparse(_mobile(stem_padding="pad"))] == [
        "pw1",
        "pw2",
        "pw3",
    ]


def test_policy_wraps_only_eligible_1x1_convs():
    pruned = kib.prune(_mobile(), policy="xnnpack_sparse")
    wrapped = sorted(la.layer.name for la in pruned.layers if isinstance(la, kib.PruneWrapper))
    assert wrapped == ["pw1", "pw2", "pw3"]  # not the stem, depthwise or Dense layers


@pytest.mark.parametrize(
    "kwargs, layer, expected",
    [
        ({"size": 16}, "'stem'", "pads (0, 1)"),  # even input: SAME stride 2 is asymmetric
        ({"dw2": ("same", 0), "size": 19}, "'dw2'", "pads (0, 1)"),  # 19 -> 10: even at dw2
        ({"dw2": ("pad", ((0, 1), (0, 1)))}, "'dw2_pad'", "symmetric padding"),
        ({"first_kernel": 5}, "'stem'", "3x3 stride-2 Conv2D on 3"),
        ({"pw_strides": 2}, "'pw1'", "only 1x1 Conv2D with stride 1"),
        ({"end": "flatten"}, "'flat'", "GlobalAveragePooling2D"),
    ],
)
def test_graph_check_names_the_first_offending_layer(kwargs, layer, expected):
    with pytest.raises(ValueError, match="policy='xnnpack_sparse'") as err:
        kib.prune(_mobile(**kwargs), policy="xnnpack_sparse")
    assert f"layer {layer}" in str(err.value) and expected in str(err.value)
    assert "Received:" in str(err.value)


def test_squeeze_excitation_after_a_global_pool_is_refused():
    layers = keras.layers
    inp = keras.Input((17, 17, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inp)
    x = layers.Conv2D(8, 1, name="pw")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="se_fc")(s)
    x = layers.Multiply(name="se_mul")([x, s])
    out = layers.Dense(2)(layers.GlobalAveragePooling2D(name="gap")(x))
    with pytest.raises(
        ValueError, match="layer 'se_fc'.*follows the GlobalAveragePooling2D 'se_pool'"
    ):
        check_xnnpack_sparse(keras.Model(inp, out))


def test_policy_bad_arguments():
    with pytest.raises(ValueError, match="`policy` must be None or one of"):
        kib.prune(_mobile(), policy="fast")
    with pytest.raises(ValueError, match="either `policy` or `layers`"):
        kib.prune(_mobile(), policy="xnnpack_sparse", layers=["pw1"])
    with pytest.raises(ValueError, match="not channels"):
        kib.prune(_mobile(), policy="xnnpack_sparse", granularity="channel")


def test_keras_applications_mobilenet_v2_odd_size_passes_even_size_fails():
    def build(size):
        return keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=0.35, weights=None, classes=4
        )

    eligible = check_xnnpack_sparse(build(33))
    assert len(eligible) == 34 and all(la.kernel_size == (1, 1) for la in eligible)
    with pytest.raises(ValueError, match="layer 'Conv1'.*32k \\+ 1"):
        check_xnnpack_sparse(build(32))


@pytest.mark.slow
def test_sparse_export_densifies_the_1x1_kernels_and_meets_the_layout():
    model = _mobile()
    _zero_1x1(model)
    x = np.random.default_rng(1).normal(size=(8, 17, 17, 3)).astype("float32")
    report = export_tflite(model, _tmp("eligible.tflite"), sparse=True, verify_data=x, **FAST)
    densified = [t for t in report.tensors if "DENSIFY" in t["consumers"]]
    assert len(densified) == 3 and all(t["shape"][1:3] == [1, 1] for t in densified)
    assert report.max_abs_diff < 1e-4  # the PAD + 'valid' rewrite computes the same thing
    # The stride-2 convolutions are PAD + VALID (XNNPACK rejects stride-2 SAME) ...
    assert report.ops.count("PAD") == 2 and any("PAD + 'valid'" in n for n in report.notes)
    # ... so the whole stem-to-MEAN subgraph meets the sparse-inference conditions.
    rows = {(r["op"], tuple(r["layers"])): r for r in report.op_table}
    sparse_ops, _ = _xnnpack_tflite.sparse_subgraph_ops(open(report.path, "rb").read())
    assert {r["op"] for r in report.op_table if r["xnnpack_sparse"]} == {
        "PAD",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "ADD",
        "MEAN",
    }
    assert len(sparse_ops) == sum(r["xnnpack_sparse"] for r in report.op_table)
    assert not next(r for k, r in rows.items() if "logits" in k[1])["xnnpack_sparse"]


@pytest.mark.slow
def test_dense_weights_or_low_sparsity_do_not_meet_the_layout():
    model = _mobile()
    x = np.random.default_rng(1).normal(size=(4, 17, 17, 3)).astype("float32")
    path = _tmp("dense.tflite")
    export_tflite(model, path, sparse=True, verify_data=x, **FAST)  # nothing pruned
    ops, _ = _xnnpack_tflite.sparse_subgraph_ops(open(path, "rb").read())
    assert ops == set()
    _zero_1x1(model, sparsity=0.5)  # stored sparse, but under 2/3 zero
    export_tflite(model, path, sparse=True, verify_data=x, **FAST)
    ops, notes = _xnnpack_tflite.sparse_subgraph_ops(open(path, "rb").read())
    assert ops == set() and any("needs >= 2/3" in n for n in notes)


@pytest.mark.slow
def test_explicit_padding_leaves_other_convolutions_alone():
    model = _mobile(size=16, dw2=("same", 0))  # even sizes: asymmetric SAME, kept as is
    import tensorflow as tf

    tflite = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    new, n = _xnnpack_tflite.explicit_stride2_padding(tflite)
    assert n == 0 and new is tflite
    assert "PAD" not in _tflite_inspect.inspect_tflite(new)[0]


def test_host_runs_sparse_is_false_on_x86_with_avx(monkeypatch):
    monkeypatch.setattr(_xnnpack_tflite.platform, "machine", lambda: "aarch64")
    assert _xnnpack_tflite.host_runs_sparse()
    monkeypatch.setattr(_xnnpack_tflite.platform, "machine", lambda: "x86_64")
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert _xnnpack_tflite.host_runs_sparse() == (" avx " not in flags.replace("\n", " "))


_TMP = {}


def _tmp(name):
    import tempfile

    _TMP.setdefault("dir", tempfile.mkdtemp(prefix="kib-xnnpack-"))
    return f"{_TMP['dir']}/{name}"
