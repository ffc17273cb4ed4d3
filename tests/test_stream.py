"""Held-out data streamed in globally indexed batches (`held_out_size=None`)."""

import numpy as np
import pytest
import tensorflow as tf
from _cases import tiny_conv_fc as _model
from _cases import tiny_xy as _xy

import keras_ibprune as kib
from keras_ibprune.stream import HeldOutStream


def test_batches_are_recut_with_global_indices_and_read_lazily():
    x, y = _xy(50)
    pulled = []

    def source():
        for i in range(0, 50, 7):
            pulled.append(i)
            yield x[i : i + 7], y[i : i + 7]

    stream = HeldOutStream(source, _model())
    it = stream.batches(16)
    start, xb, yb = next(it)
    assert (start, len(xb)) == (0, 16) and pulled == [0, 7, 14]  # no more than needed
    got = [(start, len(xb))] + [(s, len(b)) for s, b, _ in it]
    assert got == [(0, 16), (16, 16), (32, 16), (48, 2)]


def test_streamed_pruning_gives_the_masks_of_in_memory_held_out_data():
    x, y = _xy()
    masks = []
    for held_out, size in (
        ((x, y), 90),
        (tf.data.Dataset.from_tensor_slices((x, y)).batch(32), None),
    ):
        model = _model()
        pruner = kib.Pruner(model, 0.6, held_out=held_out, held_out_size=size)
        pruner.update(1, force=True)
        masks.append([m.numpy() for w in pruner.wrappers for m in w.masks])
    assert kib.sparsity(model) == pytest.approx(0.6, abs=0.01)
    assert all(np.array_equal(a, b) for a, b in zip(*masks))


def test_label_free_streaming_keeps_labels_of_the_capped_samples():
    x, _ = _xy()
    model = _model()
    pruner = kib.Pruner(
        model,
        kib.ConstantSparsity(0.5),
        score="ib",
        held_out=x,
        held_out_size=None,
        log_information=True,
    )
    pruner.reset()
    stats = pruner.collect()
    assert stats[0].summary["t_mean"].shape == (90, 6) and stats[0].labels.shape == (90,)


def test_streaming_errors_are_clear():
    x, y = _xy(20)
    model = _model()
    gen = ((x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    with pytest.raises(ValueError, match="readable more than once"):
        HeldOutStream(gen, model)
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    with pytest.raises(ValueError, match="must be finite"):
        HeldOutStream(infinite, model)
    bad = x.copy()
    bad[13, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="first at sample 13"):
        HeldOutStream(tf.data.Dataset.from_tensor_slices((bad, y)).batch(4), model).scan()
    with pytest.raises(ValueError, match="expected a non-empty array of shape"):
        HeldOutStream((x[:, :5], y), model).scan()
    with pytest.raises(ValueError, match="full activations"):
        kib.Pruner(model, 0.5, score="taylor", held_out=(x, y), held_out_size=None).reset()
    with pytest.raises(ValueError, match="int >= 2 or None"):
        kib.Pruner(model, 0.5, held_out=(x, y), held_out_size=1)
