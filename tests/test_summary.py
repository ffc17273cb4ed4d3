import keras
import numpy as np
import pytest
from _cases import data, small_cnn

import keras_ibprune as kib


def test_two_sparsities_labelled_when_some_layers_stay_dense():
    model = kib.prune(small_cnn(), layers=["fc1"])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(64)
    history = model.fit(x, y, epochs=1, verbose=0,
                        callbacks=[kib.IBPruning(kib.OneShot(0.9), score="magnitude")])
    summary = kib.sparsity_summary(model)
    logged = history.history["sparsity"][-1]
    assert summary.pruned_sparsity == pytest.approx(logged, abs=1e-6) == pytest.approx(0.9,
                                                                                       abs=1e-3)
    assert summary.sparsity < 0.9  # conv and logits are prunable but were not wrapped
    text = str(summary)
    assert "pruned layers" in text and "(IBPruning sparsity)" in text
    assert summary.as_dict()["pruned_sparsity"] == summary.pruned_sparsity


def test_stripped_and_unpruned_models():
    dense = small_cnn()
    s = kib.sparsity_summary(dense)
    assert s.sparsity == 0.0 and s.pruned_sparsity is None and "pruned layers" not in str(s)
    assert [r["layer"] for r in s.rows] == ["conv", "fc1", "logits"]
    assert s.total_weights == sum(int(np.prod(la.kernel.shape)) for la in dense.layers
                                  if hasattr(la, "kernel"))
