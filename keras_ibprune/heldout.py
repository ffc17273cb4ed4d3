"""Held-out data: `(x, y)` arrays, a `tf.data.Dataset` or a Python generator -> validated arrays.

`held_out_arrays` takes at most `size` samples (the first ones, so every update sees the
same batch; an infinite dataset is capped, never drained), checks them against the model's
input, and picks the output's targets for multi-output models; `check_labels` rejects label
sets the estimators cannot use (a single class, a class with fewer than 2 samples).
TensorFlow is imported only when the object is a `tf.data.Dataset`.
"""

from __future__ import annotations

import inspect

import numpy as np
from keras import ops


def _is_tf_dataset(obj):
    mod = type(obj).__module__ or ""
    if not mod.startswith("tensorflow"):
        return False
    import tensorflow as tf  # lazily, only when the object comes from TensorFlow

    return isinstance(obj, tf.data.Dataset)


def _split(element):
    if isinstance(element, dict):
        return element, None
    if isinstance(element, (tuple, list)):
        if len(element) == 1:
            return element[0], None
        return element[0], element[1]
    return element, None


def _input_ndim(model):
    shape = static_input_shape(model)
    return None if shape is None else len(shape)


def _take(iterable, size, model):
    ndim = _input_ndim(model) if model is not None else None
    xs, ys, n = [], [], 0
    for k, element in enumerate(iterable):
        x, y = _split(element)
        x = np.asarray(ops.convert_to_numpy(x))
        y = None if y is None else _pick_y(y, None, allow_multi=True)
        if ndim is not None and x.ndim == ndim - 1:  # unbatched elements
            x = x[None]
            y = None if y is None else np.asarray(y)[None]
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= size or k >= size:  # capped: an infinite dataset stops here
            break
    if not xs:
        raise ValueError("The held-out dataset/generator is empty. Received: 0 samples")
    x = np.concatenate(xs)
    y = None if any(v is None for v in ys) else _concat_y(ys)
    return x, y


def _concat_y(ys):
    if isinstance(ys[0], (list, tuple)):
        return [np.concatenate([np.asarray(v[i]) for v in ys]) for i in range(len(ys[0]))]
    if isinstance(ys[0], dict):
        return {k: np.concatenate([np.asarray(v[k]) for v in ys]) for k in ys[0]}
    return np.concatenate([np.asarray(ops.convert_to_numpy(v)) for v in ys])


def _pick_y(y, output, allow_multi=False):
    """Selects the target of output `output` (index or name) from multi-output targets."""
    if isinstance(y, dict):
        if output is None:
            if allow_multi:
                return {k: np.asarray(ops.convert_to_numpy(v)) for k, v in y.items()}
            raise ValueError(
                "Held-out targets are a dict (multi-output model): pass `output=` with the "
                f"name of the output to prune for. Received: keys={sorted(y)}"
            )
        if output not in y:
            raise ValueError(f"`output` not among the targets. Received: output={output!r}, "
                             f"keys={sorted(y)}")
        return np.asarray(y[output])
    if isinstance(y, (list, tuple)):
        if output is None:
            if allow_multi:
                return [np.asarray(ops.convert_to_numpy(v)) for v in y]
            raise ValueError(
                "Held-out targets are a list (multi-output model): pass `output=` with the "
                f"index of the output to prune for. Received: {len(y)} targets"
            )
        return np.asarray(y[int(output)])
    return np.asarray(ops.convert_to_numpy(y))


def held_out_arrays(held_out, size=1024, model=None, output=None):
    """Returns validated `(x, y)` numpy arrays with at most `size` samples.

    Args:
        held_out: `(x, y)`, `(x, None)` or `x` arrays; a `tf.data.Dataset` or a Python
            generator/iterator yielding `(x, y)` or `x` (batched or not). Iteration stops
            after `size` samples, so an infinite dataset is fine.
        size: maximum number of samples (the first ones; the same at every update).
        model: optional model; the input shape is checked against it.
        output: for multi-output targets, the index or name of the output to use.

    Raises:
        ValueError: NaN/inf values (naming `x` or `y`), x/y length mismatch, an empty
            dataset, or an input shape that does not fit the model.
    """
    size = int(size)
    if size < 2:
        raise ValueError(f"`held_out_size` must be >= 2. Received: held_out_size={size}")
    if _is_tf_dataset(held_out) or inspect.isgenerator(held_out) or (
        hasattr(held_out, "__next__") and not isinstance(held_out, np.ndarray)
    ):
        x, y = _take(held_out, size, model)
    elif isinstance(held_out, (tuple, list)) and len(held_out) == 2:
        x, y = held_out
    else:
        x, y = held_out, None
    if isinstance(x, (list, tuple, dict)):
        raise ValueError("keras_ibprune needs single-input models for held-out statistics. "
                         f"Received: x of type {type(x).__name__}")
    x = np.asarray(ops.convert_to_numpy(x))
    if y is not None:
        y = _pick_y(y, output)
        if len(y) != len(x):
            raise ValueError(
                "Held-out x and y must have the same number of samples. Received: "
                f"len(x)={len(x)}, len(y)={len(y)}"
            )
        y = y[:size]
    x = x[:size]
    for arr, name in ((x, "x"), (y, "y")):
        if arr is not None and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)))[0, 0])
            raise ValueError(
                f"Held-out {name} contains NaN or inf values (first at sample {bad}); clean "
                f"the held-out data. Received: {name} of shape {arr.shape}"
            )
    if model is not None:
        check_input_fits(model, x)
    return x, y


def static_input_shape(model):
    """The model's input shape `(None, ...)` when it has one fully known input, else None."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, tuple) and all(s is None or isinstance(s, int) for s in shape):
        return shape
    return None


def check_shape(shape, x, what="x"):
    """The one input-fit check: raises a ValueError unless `x` (batch first) fits `shape`.

    Args:
        shape: the model input shape `(None, ...)`; `None` entries match any size.
        x: a numpy array.
        what: the name used in the message (`"held-out x"`, `"verify_data"`, ...).
    """
    ok = len(x) > 0 and x.ndim == len(shape) and all(
        s is None or s == d for s, d in zip(shape[1:], x.shape[1:]))
    if not ok:
        want = "(batch, " + ", ".join("None" if s is None else str(s) for s in shape[1:]) + ")"
        raise ValueError(f"{what} does not fit the model input: expected a non-empty array of "
                         f"shape {want}. Received: {what}.shape={x.shape}")


def check_input_fits(model, x, what="held-out x"):
    """Raises a ValueError when `x` does not fit the model's input (`check_shape`; models
    without a static input shape are called on one sample instead)."""
    shape = static_input_shape(model)
    if shape is not None:
        check_shape(shape, x, what)
        return
    try:
        model(x[:1], training=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the shapes named
        raise ValueError(
            f"{what} does not fit the input of model '{model.name}' ({type(e).__name__}: "
            f"{str(e)[:200]}). Received: {what}.shape={x.shape}"
        ) from e


def check_labels(y, min_count=2):
    """Validates class labels for class-conditional estimators.

    Args:
        y: labels (see `estimators.label_kind`); continuous targets are not checked.
        min_count: samples needed of every class present.

    Raises:
        ValueError: a single class (suggesting label-free mode, `y=None`), or a class with
            fewer than 2 samples (its within-class variance is undefined).
    """
    from keras_ibprune.estimators import label_kind

    kind, lab = label_kind(y)
    if kind != "classes":
        return
    classes, counts = np.unique(lab, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            "Held-out y holds a single class, so it carries no label information to "
            "estimate. Pass more varied held-out data, or use label-free mode "
            "(`held_out=(x, None)`: the dense model's own predictions become the labels). "
            f"Received: y with the single class {classes.tolist()}"
        )
    rare = classes[counts < min_count]
    if len(rare):
        raise ValueError(
            "Every class present in held-out y needs at least 2 samples (within-class "
            "statistics). Pass more held-out samples (`held_out_size`) or drop the classes. "
            f"Received: classes {rare.tolist()} with 1 sample"
        )
