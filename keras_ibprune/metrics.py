"""Classification metrics of a Keras model or a `.tflite` file (scikit-learn's metrics)."""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from keras_ibprune import _tflite_inspect


def evaluate(model_or_tflite_path, x, y, batch_size=256):
    """Classification metrics of a Keras model or a `.tflite` file.

    Args:
        model_or_tflite_path: Keras model, or path to a `.tflite` file.
        x: Inputs, batch first.
        y: Integer labels `(n,)` or one-hot `(n, classes)`.
        batch_size: Inference batch size.

    Returns:
        Dict with `accuracy` and macro `precision`, `recall`, `f1` (over the
        classes present in labels or predictions; 0 where undefined).

    Raises:
        ValueError: `x` and `y` lengths differ, or the path does not exist.

    Example:

    ```python
    evaluate(model, x_test, y_test) == evaluate("model.tflite", x_test, y_test)
    ```
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length. Received: "
                         f"len(x)={len(x)}, len(y)={len(y)}")
    if isinstance(model_or_tflite_path, (str, os.PathLike)):
        path = os.fspath(model_or_tflite_path)
        if not os.path.isfile(path):
            raise ValueError(f"No .tflite file at the given path. Received: "
                             f"model_or_tflite_path={path!r}")
        scores = _tflite_inspect.Runner(path).predict(x, batch_size)
    else:
        scores = np.asarray(model_or_tflite_path.predict(x, batch_size=batch_size, verbose=0))
    if scores.ndim == 2 and scores.shape[1] > 1:
        pred = scores.argmax(1)
    else:
        scores = scores.reshape(len(scores))
        pred = (scores > (0.5 if scores.min() >= 0 and scores.max() <= 1 else 0.0)).astype(int)
    true = y.argmax(1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(len(y)).astype(int)
    labels = np.union1d(true, pred)
    precision, recall, f1, _ = precision_recall_fscore_support(
        true, pred, labels=labels, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(true, pred)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}
