"""Models built and saved by legacy tf_keras ("Keras 2") code, loaded as Keras 3 models.

`load_legacy_model` accepts what TF 2.x-era pipelines leave behind:

- a legacy HDF5 file (`model.save("model.h5")`): read by Keras 3's own HDF5 reader;
- a tf_keras SavedModel directory (`model.save("model_dir")` before Keras 3): Keras 3 cannot
  read it, so tf_keras (when installed) rebuilds the model from the directory's Keras metadata,
  writes it as HDF5 to a temporary directory, and Keras 3 reads that file back; the two
  models' predictions are then compared on random inputs;
- a tf_keras model object in memory (same route as the SavedModel).

The result is a plain Keras 3 model: `prune`, `IBPruning`, `strip_pruning`, `shrink` and
`export_tflite` take it like any other. TensorFlow (through tf_keras) is imported only for a
SavedModel directory or a tf_keras object.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings

import numpy as np

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_GRAPH_CLASSES = ("Sequential", "Functional", "Model")


def _is_hdf5(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _is_saved_model(path):
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("saved_model.pb", "saved_model.pbtxt")
    )


def _layer_classes(config):
    """Class names of every layer in a Keras model config, nested models included."""
    names = []
    for layer in (config.get("config") or {}).get("layers") or []:
        names.append(layer.get("class_name"))
        if layer.get("class_name") in _GRAPH_CLASSES:
            names.extend(_layer_classes(layer))
    return names


def _unknown_classes(config, custom_objects):
    """Layer classes of `config` that Keras 3 cannot resolve by name."""
    import keras

    unknown = []
    for name in [config.get("class_name"), *_layer_classes(config)]:
        if (
            not name
            or name in _GRAPH_CLASSES
            or name in (custom_objects or {})
            or hasattr(keras.layers, name)
            or keras.saving.get_registered_object(name) is not None
        ):
            continue
        if name not in unknown:
            unknown.append(name)
    return unknown


def _hdf5_config(path):
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return None
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def _custom_layer_error(names, path):
    mapping = ", ".join(f"'{n}': {n}" for n in names)
    return ValueError(
        f"The legacy model uses custom layer class(es) {names} that Keras 3 cannot rebuild "
        "from the file. A tf_keras layer class does not work in Keras 3: port each to "
        "`keras.layers.Layer` (create the same weights in the same order, accept the same "
        f"`get_config()` keys) and pass `custom_objects={{{mapping}}}`; or register them "
        f"with `keras.saving.register_keras_serializable()`. Received: path={path}"
    )


def _single_io(model):
    """The model called with one tensor rather than a list of one, when not compiled.

    Keras 3 rebuilds legacy Functional configs with list-of-one inputs, which warns on
    every call with a plain array; the same layers are reused, so nothing else changes.
    """
    import keras

    if model.compiled or isinstance(model, keras.Sequential) or len(model.inputs) != 1:
        return model
    if not isinstance(model.input, (list, tuple)):
        return model
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
    return keras.Model(model.inputs[0], outputs, name=model.name)


def _read_hdf5(path, custom_objects, compile, safe_mode=True):
    return _single_io(_load_hdf5(path, custom_objects, compile, safe_mode))


def _load_hdf5(path, custom_objects, compile, safe_mode):
    import keras

    try:
        if str(path).endswith((".h5", ".hdf5")):
            return keras.models.load_model(
                path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
            )
        with tempfile.TemporaryDirectory() as tmp:  # Keras picks the reader by extension
            link = os.path.join(tmp, "model.h5")
            os.symlink(os.path.abspath(path), link)
            return keras.models.load_model(
                link, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
            )
    except Exception as err:  # noqa: BLE001 - translated into what to do
        try:
            config = _hdf5_config(path)
        except (OSError, ValueError):
            config = None
        names = _unknown_classes(config, custom_objects) if config else []
        if names:
            raise _custom_layer_error(names, path) from err
        if config is None:
            raise ValueError(
                "The HDF5 file holds no model config (a weights-only file written by "
                "`save_weights`?). Expected a file written by `model.save('model.h5')`; for "
                "weights only, build the model in Keras 3 and call `model.load_weights(path)`. "
                f"Received: path={path}"
            ) from err
        hint = (
            " The training configuration (loss, optimizer) of legacy files often does "
            "not deserialize in Keras 3: load with `compile=False` and compile again."
            if compile
            else ""
        )
        raise ValueError(
            f"Keras 3 cannot load the legacy HDF5 model ({type(err).__name__}: "
            f"{str(err)[:300]}).{hint} Received: path={path}"
        ) from err


def _tf_keras(what, source):
    try:
        import tf_keras
    except ImportError as err:
        raise ImportError(
            f"Reading {what} needs the `tf_keras` package (`pip install tf_keras`, the version "
            "matching your TensorFlow). Without it, re-save the model as HDF5 where it was "
            "built (`model.save('model.h5')`) and pass that file. "
            f"Received: {source}"
        ) from err
    return tf_keras


def _random_inputs(model, rng, batch=4):
    """Random inputs for every model input, or None when a shape is not fully known."""
    xs = []
    for t in model.inputs:
        shape = tuple(t.shape)[1:]
        if any(d is None for d in shape):
            return None
        dtype = np.dtype(getattr(t.dtype, "name", t.dtype))
        if dtype.kind in "iu":
            xs.append(rng.integers(0, 2, size=(batch, *shape)).astype(dtype))
        else:
            xs.append(rng.standard_normal((batch, *shape)).astype(dtype))
    return xs


def _check_same(legacy, model, source):
    """Raises if the Keras 3 model does not compute what the tf_keras one does."""
    xs = _random_inputs(legacy, np.random.default_rng(0))
    if xs is None:
        return
    feed = xs[0] if len(xs) == 1 else xs
    want = legacy(feed, training=False)
    got = model(feed, training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    for w, g in zip(want, got):
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        diff = float(np.max(np.abs(w - g))) if w.size else 0.0
        if w.shape != g.shape or diff > 1e-4 * scale:
            raise ValueError(
                "The Keras 3 model rebuilt from the tf_keras model does not compute the same "
                f"outputs (max |difference| {diff:.3g}, shapes {w.shape} vs {g.shape}); a "
                "layer's config or weight order differs between the two Keras versions. "
                "Rebuild the model in Keras 3 code and copy the weights with "
                f"`model.set_weights(legacy.get_weights())`. Received: {source}"
            )


def _convert(legacy, source, custom_objects, compile, verify, safe_mode):
    """tf_keras model -> HDF5 in a temporary directory -> Keras 3 model."""
    try:
        graph = "layers" in (legacy.get_config() or {})
    except NotImplementedError:  # subclassed models without get_config
        graph = False
    if not graph:
        raise ValueError(
            "The tf_keras model is a subclassed model (no layer graph in its config), which "
            "cannot be rebuilt without its Python class. Port the class to Keras 3, build it, "
            "and copy the weights: `model.set_weights(legacy.get_weights())`. "
            f"Received: {source} ({type(legacy).__name__})"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.h5")
        tf_log = logging.getLogger("tensorflow")  # "metrics not built" for uncompiled models
        level = tf_log.level
        try:
            tf_log.setLevel(logging.ERROR)
            with warnings.catch_warnings():  # "HDF5 is legacy": an internal, temporary file
                warnings.simplefilter("ignore", UserWarning)
                legacy.save(path, save_format="h5", include_optimizer=compile)
        finally:
            tf_log.setLevel(level)
        try:
            model = _read_hdf5(path, custom_objects, compile, safe_mode)
        except ValueError as err:  # name the user's source, not the temporary file
            raise ValueError(str(err).replace(f"path={path}", str(source))) from err
    if verify:
        _check_same(legacy, model, source)
    return model


def load_legacy_model(source, custom_objects=None, compile=False, verify=True, safe_mode=True):
    """Loads a model written by tf_keras (TF 2.x "Keras 2") code as a Keras 3 model.

    Args:
        source: a legacy `.h5` file, a tf_keras SavedModel directory (with
            `keras_metadata.pb`), a Keras 3 `.keras` file, or a tf_keras model object.
        custom_objects: `{class name: Keras 3 class}` for custom layers of the legacy
            model (tf_keras classes do not work in Keras 3; port them first).
        compile: whether to restore the legacy training configuration (loss, metrics,
            optimizer). Off by default: legacy configs often do not deserialize in Keras 3;
            compile the loaded model yourself.
        verify: for a SavedModel or a tf_keras object, compare the Keras 3 model's
            predictions with tf_keras's on random inputs and raise if they differ.
        safe_mode: passed to `keras.models.load_model`; `Lambda` layers holding Python
            code load only with `safe_mode=False` (for files you trust).

    Returns:
        A Keras 3 model (Sequential or Functional) with the legacy weights.

    Raises:
        ValueError: no model at `source`, custom layers without a Keras 3 class, a
            SavedModel without Keras metadata, a subclassed legacy model, or a converted
            model that computes something else.
        ImportError: a SavedModel directory or tf_keras object when tf_keras is missing.

    Example:

    ```python
    model = kib.load_legacy_model("model.h5")          # or "saved_model_dir/"
    pruned = kib.prune(model)
    ```
    """
    import keras

    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, keras.Model):
            raise ValueError(
                "`load_legacy_model` converts tf_keras models; this one is already a Keras 3 "
                f"model: use it directly. Received: source={type(source).__name__}"
            )
        if type(source).__module__.split(".")[0] in ("tf_keras", "keras") and hasattr(
            source, "get_config"
        ):
            _tf_keras("a tf_keras model", f"source={type(source).__name__}")
            return _convert(
                source,
                f"source={type(source).__name__}",
                custom_objects,
                compile,
                verify,
                safe_mode,
            )
        raise TypeError(
            "Expected a path (.h5 file or SavedModel directory) or a tf_keras model. "
            f"Received: source={source!r} of type {type(source).__name__}"
        )
    path = os.fspath(source)
    if os.path.isdir(path):
        if not _is_saved_model(path):
            raise ValueError(
                "The directory is not a SavedModel (no saved_model.pb). Expected a legacy "
                f".h5 file or a tf_keras SavedModel directory. Received: path={path}"
            )
        if not os.path.isfile(os.path.join(path, "keras_metadata.pb")):
            raise ValueError(
                "The SavedModel has no Keras metadata (keras_metadata.pb): it was written by "
                "`tf.saved_model.save` or `model.export` and holds TensorFlow graphs, not "
                "layers, so no trainable Keras model can be rebuilt from it. Re-save the model "
                "from the code that builds it (`model.save('model.h5')` with tf_keras, or "
                "`model.save('model.keras')`); for inference only, wrap it with "
                "`keras.layers.TFSMLayer(path, call_endpoint='serving_default')`. "
                f"Received: path={path}"
            )
        tf_keras = _tf_keras("a tf_keras SavedModel", f"path={path}")
        try:
            legacy = tf_keras.models.load_model(path, compile=compile)
        except Exception as err:  # noqa: BLE001 - translated into what to do
            raise ValueError(
                f"tf_keras cannot load the SavedModel ({type(err).__name__}: "
                f"{str(err)[:300]}). Received: path={path}"
            ) from err
        return _convert(legacy, f"path={path}", custom_objects, compile, verify, safe_mode)
    if not os.path.isfile(path):
        raise ValueError(
            "No model found. Expected a legacy .h5 file or a tf_keras SavedModel directory. "
            f"Received: path={path}"
        )
    if _is_hdf5(path):
        return _read_hdf5(path, custom_objects, compile, safe_mode)
    return keras.models.load_model(
        path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
    )
