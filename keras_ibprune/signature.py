"""The signature of an exported file: its inputs and outputs, and data fed through them.

`export_tflite` writes one signature whose inputs are named after the model's inputs
(`arg_names`: Python identifiers, unique) in the model's input order, float inputs as
float32 and integer inputs (token ids) as int32 (`file_inputs`); its outputs are named
after the model's outputs (`output_names`). Data for calibration and verification is
validated against the model and keyed by those names (`check_data`), and fed back to the
Keras model in the form it takes (`model_feed`).
"""

import dataclasses
import re

import numpy as np

from keras_ibprune import heldout


@dataclasses.dataclass
class SignatureInput:
    """One input of the file's signature and the model input it feeds."""

    key: str | None  # the model's input key (None: call the model with one tensor)
    arg: str  # the signature's input name
    shape: tuple  # with the batch dimension
    dtype: str  # "float32" or "int32" in the file
    model_dtype: str


def arg_names(keys):
    """Signature names for model input / output keys: `\\W` -> `_`, no leading digit, unique.

    Args:
        keys: the model's input or output names (any objects; `str` is taken).

    Returns:
        A list of names, one per key, in order.
    """
    names = []
    for key in keys:
        name = re.sub(r"\W", "_", str(key)) or "input"
        name = name if not name[0].isdigit() else f"input_{name}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _file_dtype(dtype):
    """The file's dtype for a model input dtype: int32 for integers and bools, else float32."""
    dtype = str(dtype)
    if "int" in dtype or dtype == "bool":
        return "int32"
    return "float32"


def file_inputs(model, input_shape, arrays):
    """The file's inputs, in the model's input order.

    Args:
        model: the Keras model to export.
        input_shape: input shape without batch (subclassed models), or None.
        arrays: candidate data (`verify_data`, `representative_data`; None entries skipped)
            to infer the inputs from when the model does not declare them.

    Returns:
        A list of `SignatureInput`.

    Raises:
        ValueError: the inputs of a subclassed model cannot be inferred.
    """
    if input_shape is not None:
        return [SignatureInput(None, "x", (None,) + tuple(input_shape), "float32", "float32")]
    specs = heldout.input_specs(model)
    if specs:
        single = len(specs) == 1
        return [
            SignatureInput(None if single else key, arg, shape, _file_dtype(dtype), dtype)
            for (key, shape, dtype), arg in zip(specs, arg_names(k for k, _, _ in specs))
        ]
    for data in arrays:
        if data is None:
            continue
        if isinstance(data, dict):
            keyed = {k: np.asarray(v) for k, v in data.items()}
            return [
                SignatureInput(k, arg, (None,) + v.shape[1:], _file_dtype(v.dtype), str(v.dtype))
                for (k, v), arg in zip(keyed.items(), arg_names(keyed))
            ]
        if isinstance(data, (list, tuple)):
            raise ValueError(
                "A subclassed model with several inputs needs `verify_data` as a "
                "dict keyed by input name. Received: a list of arrays"
            )
        arr = np.asarray(data)
        return [SignatureInput(None, "x", (None,) + arr.shape[1:], "float32", "float32")]
    raise ValueError(
        "Cannot infer the input shape of this subclassed model. Pass "
        "`input_shape=` or `verify_data=`. Received: input_shape=None"
    )


def check_data(name, data, model, inputs):
    """`data` validated against the model as `{signature input name: array}`, or None.

    Args:
        name: the argument's name, for error messages (e.g. `"verify_data"`).
        data: one array, a list in the model's input order, a dict by input name, or None.
        model: the Keras model.
        inputs: the file's inputs (`file_inputs`).

    Raises:
        ValueError: `data` does not fit the model's inputs (shape, names, count).
    """
    if data is None:
        return None
    if heldout.input_specs(model) or inputs[0].key is not None:
        x = heldout.standardize_inputs(model, data, name)
    else:  # a subclassed single-input model: the declared or inferred shape
        x = np.asarray(data)
        heldout.check_shape(inputs[0].shape, x, name)
    if not isinstance(x, dict):
        x = {None: x}
    return {i.arg: np.asarray(x[i.key]).astype(i.dtype) for i in inputs}


def model_feed(x, inputs):
    """Signature-keyed arrays as the model takes them (one array or a dict by key)."""
    if inputs[0].key is None:
        return x[inputs[0].arg].astype(inputs[0].model_dtype)
    return {i.key: x[i.arg].astype(i.model_dtype) for i in inputs}


def output_names(model, outputs):
    """Names of the model's `outputs` (a dict's keys, `model.output_names` or `output_<i>`)."""
    if isinstance(outputs, dict):
        return list(outputs)
    if isinstance(outputs, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [])
        return names if len(names) == len(outputs) else [f"output_{i}" for i in range(len(outputs))]
    return ["output_0"]


def flat_outputs(outputs):
    """The model's `outputs` (one tensor, a list or a dict) as a list, in `output_names` order."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    return [outputs]


def random_inputs(inputs, n=32):
    """`n` seeded random samples per input: N(0, 1) floats, 0/1 integer ids."""
    rng = np.random.default_rng(0)
    return {
        i.arg: (
            rng.integers(0, 2, size=(n,) + i.shape[1:])
            if i.dtype == "int32"
            else rng.normal(size=(n,) + i.shape[1:])
        ).astype(i.dtype)
        for i in inputs
    }
