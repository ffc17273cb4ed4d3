"""Helpers shared by the commands: user errors, `.npz` and model loading, the digits data.

Nothing here imports Keras or TensorFlow at module level: `--help` and argument errors
answer before the heavy imports.
"""

from __future__ import annotations

import os
import time


class CLIError(Exception):
    """A user error: printed as `keras-ibprune COMMAND: error: MESSAGE`, exit status 2."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def digits(seed=0):
    """scikit-learn's digits (1797 8x8 images, shipped with the package): train/val/test."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_test, n_val = 360, 240
    return (
        (x[n_test + n_val :], y[n_test + n_val :]),
        (x[n_test : n_test + n_val], y[n_test : n_test + n_val]),
        (x[:n_test], y[:n_test]),
    )


def demo_model():
    import keras

    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(),
            L.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(128, activation="relu", name="fc1"),
            L.Dense(10, name="logits"),
        ],
        name="digits_cnn",
    )


def accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def load_model(path):
    """Loads a `.keras` file (wrapped or stripped), or a legacy tf_keras `.h5` file or
    SavedModel directory (`keras_ibprune.load_legacy_model`); a clear `CLIError` when it can't.
    """
    expected = "Expected a .keras file, a legacy .h5 file or a tf_keras SavedModel directory"
    if not os.path.exists(path):
        raise CLIError(f"model file not found. {expected}. Received: {path}")
    import keras

    import keras_ibprune as kib  # also registers PruneWrapper for loading

    if os.path.isdir(path) or not str(path).endswith(".keras"):
        try:
            return kib.load_legacy_model(path)
        except (ValueError, ImportError) as err:  # already says what to do
            raise CLIError(f"cannot load the model: {err}") from err
        except Exception as err:  # noqa: BLE001 - any load failure is a user-facing error
            raise CLIError(
                f"cannot load the model ({type(err).__name__}: {str(err)[:300]}). "
                f"{expected}. Received: {path}"
            ) from err
    try:
        return keras.models.load_model(path)
    except Exception as err:  # noqa: BLE001 - any load failure is a user-facing error
        raise CLIError(
            f"cannot load the model ({type(err).__name__}: {str(err)[:300]}). Expected a "
            f".keras file written by `model.save`. Received: {path}"
        ) from err


def model_bytes(path):
    """Size of a model file, or of every file under a SavedModel directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def load_npz(path, what="data", model=None, need_y=True):
    """Reads `x` (and `y`) from an `.npz` file, checking keys, lengths and shapes.

    Args:
        path: path of the `.npz` file.
        what: what the file is for, used in error messages (e.g. `"--data"`).
        model: optional model whose input shape `x` must fit.
        need_y: whether `y` is required (else it may be absent, returned as None).

    Returns:
        `(x, y)` numpy arrays; `x` as float32, `y` as stored (or None).

    Raises:
        CLIError: a missing or unreadable file, a missing key, empty arrays, `x`/`y`
            length mismatch, or an `x` that does not fit the model's input.
    """
    import zipfile

    import numpy as np

    expected = "an .npz file with arrays 'x' and 'y'" if need_y else (
        "an .npz file with an array 'x' (and optionally 'y')")
    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found. Expected {expected}. Received: {path}")
    if not zipfile.is_zipfile(path):
        raise CLIError(
            f"cannot read the {what} file: it is not an .npz (zip) archive. Expected "
            f"{expected} (np.savez). Received: {path}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            missing = [k for k in (("x", "y") if need_y else ("x",)) if k not in keys]
            if missing:
                raise CLIError(
                    f"{what} file has no array named {' or '.join(map(repr, missing))}. "
                    f"Expected {expected}. Received: {path} with keys {keys}"
                )
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except CLIError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CLIError(
            f"cannot read the {what} file ({type(err).__name__}: {str(err)[:200]}). "
            f"Expected {expected} (np.savez). Received: {path}"
        ) from err
    if x.dtype.kind not in "biuf" or x.ndim < 1 or len(x) == 0:
        raise CLIError(
            f"{what} array 'x' must be a non-empty numeric array, batch first. "
            f"Received: x with shape {x.shape} and dtype {x.dtype} in {path}"
        )
    if y is not None and (y.ndim < 1 or len(y) != len(x)):
        raise CLIError(
            f"{what} arrays 'x' and 'y' must hold the same number of samples. "
            f"Received: x.shape={x.shape}, y.shape={y.shape} in {path}"
        )
    if model is not None:
        from keras_ibprune import heldout  # the one input-fit check of the package

        try:
            heldout.check_input_fits(model, x, what=f"{what} array 'x'")
        except ValueError as err:
            raise CLIError(f"{err} in {path}") from err
    return x.astype("float32"), y


def check_out(path, suffix):
    if not path.endswith(suffix):
        raise CLIError(f"the output file name must end with '{suffix}'. Received: {path}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(
            f"the directory of the output file does not exist: {directory}. Received: {path}"
        )


def is_classifier(model, x, y):
    """True for class-label targets and a multi-unit output (accuracy etc. make sense)."""
    import numpy as np

    if y is None:
        return False
    shape = getattr(model, "output_shape", None)
    units = shape[-1] if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else 0
    if y.ndim == 1 and y.dtype.kind in "biu":
        return units > 1
    return y.ndim == 2 and y.shape[1] == units and units > 1 and bool(np.all((y == 0) | (y == 1)))


def auto_loss(model, x, y):
    """Loss for fine-tuning: the model's compiled loss, else one fitting `y` and the output."""
    import keras
    import numpy as np

    loss = getattr(model, "loss", None)
    if loss is not None:
        return loss
    probs = np.asarray(model.predict(x[:64], verbose=0))
    is_prob = bool(np.all(probs >= 0) and np.allclose(probs.sum(-1), 1.0, atol=1e-3))
    if y.ndim == 1 and y.dtype.kind in "biu":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not is_prob)
    if is_classifier(model, x, y):
        return keras.losses.CategoricalCrossentropy(from_logits=not is_prob)
    return keras.losses.MeanSquaredError()


def metrics_line(model, x, y):
    import keras_ibprune as kib

    m = kib.evaluate(model, x, y)
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def output_layer_names(model):
    from keras_ibprune import _keras_compat

    names = []
    for t in getattr(model, "outputs", None) or []:
        op = _keras_compat.producing_layer(t)
        if op is not None:
            names.append(op.name)
    return names


def epoch_progress(epochs):
    """A callback printing one line per epoch: loss, accuracy, sparsity, time."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy") if k in logs]
            if "sparsity" in logs:
                parts.append(f"sparsity {logs['sparsity']:.2%}")
            print(f"      epoch {epoch + 1}/{epochs}: {', '.join(parts)} "
                  f"({time.perf_counter() - self._t0:.1f}s)", flush=True)

    return EpochProgress()


def step(i, n, text, start):
    print(f"[{i}/{n}] {text} ({time.perf_counter() - start:.1f}s)", flush=True)
