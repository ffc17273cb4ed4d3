"""Classification metrics of a Keras model or a `.tflite` file (scikit-learn's metrics)."""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from keras_ibprune import _tflite_runner
from keras_ibprune.heldout import num_samples
from keras_ibprune.likelihood import output_of, resolve_output


def evaluate(model_or_tflite_path, x, y, batch_size=256, output=None):
    """Classification metrics of a Keras model or a `.tflite` file.

    Args:
        model_or_tflite_path: Keras model, or path to a `.tflite` file.
        x: Inputs, batch first: one array, or for several inputs a dict keyed by input
            name (or a list in the model's input order; for a file, in its input order).
        y: Integer labels `(n,)` or one-hot `(n, classes)`.
        batch_size: Inference batch size.
        output: For models with several outputs, the index or name of the output the
            labels are for (a file's outputs are named after the model's outputs).

    Returns:
        Dict with `accuracy` and macro `precision`, `recall`, `f1` (over the
        classes present in labels or predictions; 0 where undefined).

    Raises:
        ValueError: `x` and `y` lengths differ, the path does not exist, or a model
            with several outputs without `output=`.

    Example:

    ```python
    evaluate(model, x_test, y_test) == evaluate("model.tflite", x_test, y_test)
    ```
    """
    x = x if isinstance(x, (dict, list, tuple)) else np.asarray(x)
    y = np.asarray(y)
    if num_samples(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length. Received: "
                         f"len(x)={num_samples(x)}, len(y)={len(y)}")
    if isinstance(model_or_tflite_path, (str, os.PathLike)):
        path = os.fspath(model_or_tflite_path)
        if not os.path.isfile(path):
            raise ValueError(f"No .tflite file at the given path. Received: "
                             f"model_or_tflite_path={path!r}")
        scores = _tflite_runner.Runner(path).predict(x, batch_size)
        if isinstance(scores, dict):
            scores = _pick(scores, output, list(scores))
    else:
        model = model_or_tflite_path
        scores = model.predict(x, batch_size=batch_size, verbose=0)
        if isinstance(scores, (dict, list, tuple)):
            names = list(scores) if isinstance(scores, dict) else list(
                getattr(model, "output_names", None) or range(len(scores)))
            scores = _pick(scores, resolve_output(model, output), names)
    scores = np.asarray(scores)
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


def _pick(scores, output, names):
    """The scores of output `output` (name or index) among several."""
    if output is None:
        raise ValueError(f"The model has {len(names)} outputs {names}: pass `output=` with "
                         "the one the labels are for. Received: output=None")
    if isinstance(scores, dict):
        if isinstance(output, int) and output not in scores:
            if not 0 <= output < len(names):
                raise ValueError(f"`output` must index one of {names}. Received: "
                                 f"output={output}")
            output = names[output]
        if output not in scores:
            raise ValueError(f"`output` names none of the outputs {names}. Received: "
                             f"output={output!r}")
        return scores[output]
    return output_of(scores, output)
