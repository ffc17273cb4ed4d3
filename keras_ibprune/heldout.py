"""Held-out data: `(x, y)` arrays, a `tf.data.Dataset` or a Python generator -> validated arrays.

`held_out_arrays` takes at most `size` samples (the first ones, so every update sees the
same batch; an infinite dataset is capped, never drained), checks them against the model's
input, and picks the output's targets for multi-output models; `check_labels` rejects label
sets the estimators cannot use (a single class, a class with fewer than 2 samples).
TensorFlow is imported only when the object is a `tf.data.Dataset`.

Models with several inputs take `x` as a dict keyed by input name (or a list/tuple in the
model's input order); `standardize_inputs` checks names, lengths, shapes and integer
dtypes and returns a dict keyed by the model's input keys. `num_samples` and
`slice_inputs` work on either form, so the rest of the package treats `x` as one object.
"""

from __future__ import annotations

import inspect

import keras
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


def _leaf_ndims(model):
    """Expected rank (with batch) of each input: `{key: rank}` in input order, or None."""
    specs = input_specs(model) if model is not None else None
    return None if not specs else {key: len(shape) for key, shape, _ in specs}


def _as_numpy(x):
    if isinstance(x, dict):
        return {k: np.asarray(ops.convert_to_numpy(v)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [np.asarray(ops.convert_to_numpy(v)) for v in x]
    return np.asarray(ops.convert_to_numpy(x))


def _batch_unbatched(x, ndims):
    """Adds a batch axis to an element taken from an unbatched dataset."""
    if not ndims:
        return x, False
    if isinstance(x, dict):
        key = next((k for k in x if k in ndims), None)
        first, want = (None, None) if key is None else (x[key], ndims[key])
    else:
        first = x[0] if isinstance(x, (list, tuple)) and x else x
        want = next(iter(ndims.values()))
    if not isinstance(first, np.ndarray) or first.ndim != want - 1:
        return x, False
    return keras.tree.map_structure(lambda a: a[None], x), True


def _take(iterable, size, model):
    ndims = _leaf_ndims(model)
    xs, ys, n = [], [], 0
    for k, element in enumerate(iterable):
        x, y = _split(element)
        x = _as_numpy(x)
        y = None if y is None else _pick_y(y, None, allow_multi=True)
        x, unbatched = _batch_unbatched(x, ndims)
        if unbatched and y is not None:
            y = keras.tree.map_structure(lambda a: np.asarray(a)[None], y)
        xs.append(x)
        ys.append(y)
        n += num_samples(x)
        if n >= size or k >= size:  # capped: an infinite dataset stops here
            break
    if not xs:
        raise ValueError("The held-out dataset/generator is empty. Received: 0 samples")
    if isinstance(xs[0], np.ndarray):
        x = np.concatenate(xs)
    else:
        x = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *xs)
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
            after `size` samples, so an infinite dataset is fine. For a model with several
            inputs `x` is a dict keyed by input name (or a list/tuple in input order,
            then always inside `(x, y)`), e.g. `held_out=({"ids": ids, "num": num}, y)`.
        size: maximum number of samples (the first ones; the same at every update).
        model: optional model; the input names and shapes are checked against it.
        output: for multi-output targets, the index or name of the output to use.

    Returns:
        `(x, y)`: `x` one array (single input) or a dict of arrays keyed by the model's
        input keys (several inputs), all capped to the same samples.

    Raises:
        ValueError: NaN/inf values (naming `x` or `y`), x/y length mismatch, inputs of
            different lengths, input names that do not match the model, an empty
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
    if model is not None:
        x = standardize_inputs(model, x, "held-out x")
    else:
        x = _standalone(x)
        x = dict(enumerate(x)) if isinstance(x, (list, tuple)) else x  # keyed from here on
    n = num_samples(x)
    if y is not None:
        y = _pick_y(y, _output_key(model, output, y))
        if len(y) != n:
            raise ValueError(
                "Held-out x and y must have the same number of samples. Received: "
                f"len(x)={n}, len(y)={len(y)}"
            )
        y = y[:size]
    x = slice_inputs(x, slice(0, size))
    check_finite(x, y)
    return x, y


def check_finite(x, y, offset=0):
    """Raises a ValueError naming `x` or `y` and the first sample holding NaN or inf."""
    leaves = [("x", x)] if isinstance(x, np.ndarray) else [
        (f"x[{k!r}]", v) for k, v in x.items()]
    for name, arr in leaves + [("y", y)]:
        if arr is not None and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)))[0, 0]) + offset
            raise ValueError(
                f"Held-out {name} contains NaN or inf values (first at sample {bad}); clean "
                f"the held-out data. Received: {name} of shape {arr.shape}"
            )


def _standalone(x):
    """Without a model: one array, or a dict / list of arrays of one length."""
    if isinstance(x, (dict, list, tuple)):
        x = _as_numpy(x)
        keyed = x if isinstance(x, dict) else dict(enumerate(x))
        _check_lengths(keyed, "held-out x")
        return x
    return np.asarray(ops.convert_to_numpy(x))


def _output_key(model, output, y):
    """`output` as the targets index it: names of list outputs become positions."""
    if isinstance(output, str) and isinstance(y, (list, tuple)) and model is not None:
        from keras_ibprune.likelihood import resolve_output

        return resolve_output(model, output)
    return output


# ------------------------------------------------------------- model inputs
def input_specs(model):
    """`[(key, shape, dtype)]` of the model's symbolic inputs, or None when unknown.

    `key` is the dict key of a model built on a dict of inputs, else the `Input`'s name;
    `shape` includes the batch dimension. Subclassed models (no symbolic inputs) give None.
    """
    try:
        tensors = list(model.inputs or [])
    except (AttributeError, ValueError):
        return None
    if not tensors:
        return None
    try:
        struct = model.input
    except (AttributeError, ValueError):
        struct = None
    keys = {id(t): t.name for t in tensors}
    if isinstance(struct, dict):
        keys.update({id(t): k for k, t in struct.items()})
    return [(keys[id(t)], tuple(t.shape), str(t.dtype)) for t in tensors]


def _built_on_dict(model):
    try:
        return isinstance(model.input, dict)
    except (AttributeError, ValueError):
        return False


def num_samples(x):
    """Number of samples (the first axis) of an array or a dict / list of arrays."""
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, (list, tuple)):
        x = x[0]
    return len(x)


def slice_inputs(x, sl):
    """`x[sl]` of an array, or of every array of a dict / list / tuple."""
    if isinstance(x, dict):
        return {k: v[sl] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(v[sl] for v in x)
    return x[sl]


def _check_lengths(keyed, what):
    lengths = {k: len(v) if np.ndim(v) else 0 for k, v in keyed.items()}
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise ValueError(f"Every input of {what} needs the same number of samples (> 0). "
                         f"Received: lengths {lengths}")


def standardize_inputs(model, x, what="held-out x"):
    """Validates model inputs and returns them in one form.

    Args:
        model: the model (Functional, Sequential or a built subclassed model).
        x: one array (single input), a dict keyed by input name, or a list/tuple in the
            model's input order.
        what: the name used in error messages.

    Returns:
        One numpy array for a single-input model; for several inputs a dict keyed by the
        model's input keys (see `input_specs`). Integer inputs keep an integer dtype.

    Raises:
        ValueError: missing or unknown input names, a wrong number of inputs, inputs of
            different lengths, non-integer values for an integer input, or a shape that
            does not fit the model.
    """
    specs = input_specs(model)
    if specs is None:  # subclassed: no names to check; one call on one sample instead
        x = _standalone(x)
        check_input_fits(model, x, what)
        return x
    keys = [k for k, _, _ in specs]
    if isinstance(x, dict):
        missing, unknown = [k for k in keys if k not in x], [k for k in x if k not in keys]
        if missing or unknown:
            raise ValueError(
                f"{what} must be keyed by the model's input names {keys}. Received: keys "
                f"{list(x)} (missing {missing}, unknown {unknown})")
        keyed = {k: x[k] for k in keys}
    elif isinstance(x, (list, tuple)) and len(keys) > 1 and _built_on_dict(model):
        raise ValueError(f"Model '{model.name}' takes a dict of inputs: pass {what} as a dict "
                         f"keyed by {keys}. Received: a {type(x).__name__} of {len(x)} arrays")
    elif isinstance(x, (list, tuple)):
        if len(x) != len(keys):
            raise ValueError(
                f"{what} must hold one array per model input ({len(keys)}: {keys}). "
                f"Received: a {type(x).__name__} of {len(x)} arrays")
        keyed = dict(zip(keys, x))
    elif len(keys) > 1:
        raise ValueError(
            f"Model '{model.name}' has {len(keys)} inputs: pass {what} as a dict keyed by "
            f"{keys} (or a list in that order). Received: one {type(x).__name__}")
    else:
        keyed = {keys[0]: x}
    keyed = {k: np.asarray(ops.convert_to_numpy(v)) for k, v in keyed.items()}
    _check_lengths(keyed, what)
    for key, shape, dtype in specs:
        arr = keyed[key]
        name = what if len(keys) == 1 else f"{what}[{key!r}]"
        if "int" in dtype and arr.dtype.kind not in "iu":
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(
                    arr != np.round(arr)):
                raise ValueError(
                    f"{name} feeds the integer input '{key}' ({dtype}): expected integer "
                    f"ids. Received: {name}.dtype={arr.dtype}")
            keyed[key] = arr = arr.astype(dtype)
        check_shape(shape, arr, name)
    return keyed[keys[0]] if len(keys) == 1 else keyed


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
        model(slice_inputs(x, slice(0, 1)), training=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the shapes named
        shapes = keras.tree.map_structure(lambda a: tuple(a.shape), x)
        raise ValueError(
            f"{what} does not fit the input of model '{model.name}' ({type(e).__name__}: "
            f"{str(e)[:200]}). Received: {what} of shape {shapes}"
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
