import keras
import numpy as np
import pytest

from keras_ibprune.metrics import evaluate


def test_evaluate_matches_hand_computed_metrics():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    x = np.eye(3, dtype="float32")[[0, 0, 1, 2, 2, 2]]  # predictions: 0 0 1 2 2 2
    y = np.array([0, 1, 1, 2, 2, 0])
    metrics = evaluate(model, x, y)
    # class 0: p=1/2 r=1/2; class 1: p=1 r=1/2; class 2: p=2/3 r=1
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert metrics["recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    f1 = [0.5, 2 * 0.5 / 1.5, 2 * (2 / 3) / (5 / 3)]
    assert metrics["f1"] == pytest.approx(np.mean(f1))
    assert evaluate(model, x, np.eye(3)[y]) == metrics  # one-hot labels
    with pytest.raises(ValueError, match="len"):
        evaluate(model, x, y[:3])
    with pytest.raises(ValueError, match="missing.tflite"):
        evaluate("missing.tflite", x, y)
