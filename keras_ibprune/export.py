"""Export pruned Keras models to sparse / quantized TFLite (LiteRT) files.

Which sparse layouts the LiteRT runtime *executes* sparse (measured, TF 2.21):
FULLY_CONNECTED weights whose zeros form 1x4 blocks (float32) or 1x16 blocks
(int8, dynamic-range int8) in TFLite's `(units, inputs)` layout, i.e. `(4, 1)`
or `(16, 1)` blocks of a Keras `Dense` kernel. Everything else (unstructured
FC sparsity, every CONV_2D kernel) is only *stored* sparse and expanded at load
time by a DENSIFY op: it saves file bytes, not compute. `ExportReport.tensors`
says which case each weight is in.
"""

import dataclasses
import gzip
import os
import tempfile

import keras
import numpy as np

from keras_ibprune import _keras_compat, _tflite_inspect, heldout

_QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
_IO_DTYPES = ("float32", "int8", "uint8")
# (relative max-|diff| tolerance, minimum top-1 agreement) per quantization.
_DEFAULT_TOLERANCE = {
    None: (1e-4, 0.995),
    "float16": (1e-2, 0.99),
    "dynamic": (5e-2, 0.98),
    "int8": (0.2, 0.98),
}


class ExportVerificationError(RuntimeError):
    """The exported file does not compute what the Keras model computes."""


@dataclasses.dataclass
class ExportReport:
    """What `export_tflite` wrote, and how it compares with the Keras model.

    Sizes are in bytes. `dense_bytes` is the same model and quantization
    exported without sparse encoding; `dense_float_bytes` the plain float32
    export. `tensors` lists the weights as stored in the flatbuffer (see
    `keras_ibprune._tflite_inspect.inspect_tflite`). `latency_ms` is the median
    single-thread latency per inference (batch 1) in the interpreter.
    """

    path: str
    quantize: str | None
    sparse: bool
    file_bytes: int
    gzip_bytes: int
    dense_bytes: int | None = None
    dense_float_bytes: int | None = None
    ops: list = dataclasses.field(default_factory=list)
    tensors: list = dataclasses.field(default_factory=list)
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    verify_samples: int = 0
    verified_on: str | None = None
    latency_ms: float | None = None
    interpreter: str | None = None
    params: int | None = None
    nonzero_params: int | None = None
    flops: int | None = None
    metrics: dict | None = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def size_ratio(self):
        """`file_bytes / dense_float_bytes`, or None when not measured."""
        return self.file_bytes / self.dense_float_bytes if self.dense_float_bytes else None

    def as_dict(self):
        """Returns the report as a JSON-serializable dict."""
        out = dataclasses.asdict(self)
        out["size_ratio"] = self.size_ratio
        out["op_counts"] = _tflite_inspect.count(self.ops)
        return out

    def __str__(self):
        return _tflite_inspect.format_report(self)


def _strip(model):
    layers = _keras_compat.all_layers(model) if isinstance(model, keras.layers.Layer) else []
    if any(type(layer).__name__ == "PruneWrapper" for layer in layers):
        from keras_ibprune.prune import strip_pruning

        return strip_pruning(model)
    return model


def _input_shape(model, arrays):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        if len(inputs) != 1:
            raise ValueError(f"Only single-input models can be exported. "
                             f"Received: a model with {len(inputs)} inputs.")
        return (None,) + tuple(inputs[0].shape[1:])
    for arr in arrays:
        if arr is not None:
            return (None,) + tuple(np.shape(arr)[1:])
    raise ValueError("Cannot infer the input shape of this subclassed model. Pass "
                     "`input_shape=` or `verify_data=`. Received: input_shape=None")


def _check_data(name, data, shape):
    if data is None:
        return None
    arr = np.asarray(data, dtype=np.float32)
    heldout.check_shape(shape, arr, name)
    return arr


def _check_path(filepath):
    path = os.path.abspath(os.fspath(filepath))
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"`filepath` must be a file path, not a directory. "
                                f"Received: filepath={filepath!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"The directory of `filepath` does not exist: {directory!r}. "
                                f"Create it first. Received: filepath={filepath!r}")
    try:  # probe by writing: os.access() says yes to root even on read-only mounts
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".kib-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"Cannot write to the directory {directory!r} ({err.strerror}). "
                              f"Received: filepath={filepath!r}") from err
    return path


def _convert(model, shape, sparse, quantize, representative, io_dtype):
    import tensorflow as tf
    from keras.export import ExportArchive

    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive = ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda x: model(x, training=False),
                             input_signature=[tf.TensorSpec(shape, tf.float32)])
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        optimizations = [tf.lite.Optimize.DEFAULT] if quantize else []
        if sparse:
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            samples = representative[:200]

            def gen():
                for i in range(len(samples)):
                    yield [samples[i : i + 1]]

            converter.representative_dataset = gen
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.as_dtype(io_dtype)
            converter.inference_output_type = tf.as_dtype(io_dtype)
        try:
            return converter.convert()
        except Exception as err:  # converter errors are untyped; name the ops when we can
            ops = _tflite_inspect.unsupported_ops(str(err))
            if not ops:
                raise
            raise ValueError(
                f"The model uses op(s) that LiteRT builtins cannot run with "
                f"quantize={quantize!r}: {', '.join(ops)}. Replace the layer(s) using them "
                f"or choose another `quantize`. Received: quantize={quantize!r}") from err


def _params_flops(model):
    """`(params, nonzero params, FLOPs or None, notes)`, via keras_ibprune.flops if present."""
    nonzero = int(sum(np.count_nonzero(np.asarray(w)) for w in model.weights))
    try:
        from keras_ibprune.flops import count_flops, count_params
    except ImportError:
        return model.count_params(), nonzero, None, []
    try:
        params = count_params(model)
    except ValueError:
        params = model.count_params()
    try:
        return params, nonzero, count_flops(model), []
    except ValueError as err:
        return params, nonzero, None, [f"FLOPs not counted: {err}"]


def export_tflite(model, filepath, sparse=True, quantize=None, representative_data=None,
                  verify=True, verify_data=None, io_dtype="float32", tolerance=None,
                  min_agreement=None, compare_dense=True, latency_runs=50, input_shape=None):
    """Exports a (pruned) Keras model to a verified `.tflite` (LiteRT) file.

    Prune wrappers are stripped first. The file is written to a temporary file
    next to `filepath`, run in the LiteRT interpreter and compared with Keras,
    and only renamed to `filepath` when it matches; on any error nothing is
    left at `filepath`.

    Args:
        model: Keras model (Sequential, Functional or built subclassed), with
            or without `PruneWrapper` layers. Single input, float32.
        filepath: Destination path; its directory must exist.
        sparse: Store sparse weights with TFLite's sparse tensor encoding.
        quantize: None, `"dynamic"` (int8 weights), `"float16"` or `"int8"`
            (full integer, needs `representative_data`).
        representative_data: Array of inputs (batch first) used to calibrate
            `"int8"`; the first 200 samples are used.
        verify: Run the file and compare it with Keras before keeping it.
        verify_data: Inputs for verification; defaults to `representative_data`
            or, failing that, 32 random normal samples (weak: pass real inputs). The
            report's `verified_on` says which.
        io_dtype: Input/output dtype of an `"int8"` file: `"float32"`,
            `"int8"` or `"uint8"`.
        tolerance: Max allowed |Keras - TFLite| relative to max(1, max |Keras|).
            Defaults: 1e-4 float, 1e-2 float16, 5e-2 dynamic, 0.2 int8.
        min_agreement: Minimum top-1 agreement (outputs with > 1 class).
            Defaults: 0.995 float, 0.99 float16, 0.98 dynamic / int8.
        compare_dense: Also convert without sparse encoding to report sizes.
        latency_runs: Timed single-thread invocations (0 to skip).
        input_shape: Input shape without batch, for subclassed models whose
            input shape cannot be inferred.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: Bad arguments, data of the wrong shape, or ops LiteRT
            cannot run with the chosen quantization (named in the message).
        FileNotFoundError, PermissionError, IsADirectoryError: Bad `filepath`.
        ExportVerificationError: The file disagrees with the Keras model.

    Example:

    ```python
    report = export_tflite(model, "model.tflite", quantize="int8",
                           representative_data=x_val, verify_data=x_val)
    print(report)
    ```
    """
    if quantize not in _QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of {_QUANTIZE_MODES}. "
                         f"Received: quantize={quantize!r}")
    if io_dtype not in _IO_DTYPES or (io_dtype != "float32" and quantize != "int8"):
        raise ValueError(f"`io_dtype` must be one of {_IO_DTYPES} ('int8'/'uint8' only with "
                         f"quantize='int8'). Received: io_dtype={io_dtype!r}, "
                         f"quantize={quantize!r}")
    if quantize == "int8" and representative_data is None:
        raise ValueError("quantize='int8' needs calibration inputs: pass `representative_data` "
                         "(an array of model inputs). Received: representative_data=None")
    path = _check_path(filepath)
    model = _strip(model)
    shape = (None,) + tuple(input_shape) if input_shape is not None else _input_shape(
        model, (verify_data, representative_data))
    representative = _check_data("representative_data", representative_data, shape)
    verify_x = _check_data("verify_data", verify_data, shape)
    notes = []
    verified_on = None if verify_x is None else f"verify_data ({len(verify_x)} samples)"
    if verify and verify_x is None:
        if representative is not None:
            verify_x = representative
            verified_on = f"representative_data ({len(verify_x)} samples; no verify_data)"
        else:
            verify_x = np.random.default_rng(0).normal(size=(32,) + shape[1:]).astype("float32")
            verified_on = ("32 random N(0, 1) inputs, NOT real data (pass verify_data= to "
                           "verify on your inputs)")

    tflite = _convert(model, shape, sparse, quantize, representative, io_dtype)
    if sparse:
        tflite, inserted = _tflite_inspect.densify_unsupported_sparse_inputs(tflite)
        if inserted:
            notes.append(f"inserted {inserted} DENSIFY op(s): the converter fed sparse "
                         "weights to kernels that misread them (see _tflite_inspect)")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kib-", suffix=".tflite.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tflite)
        ops, tensors = _tflite_inspect.inspect_tflite(tflite)
        params, nonzero, flops, flop_notes = _params_flops(model)
        notes.extend(flop_notes)
        report = ExportReport(
            path=path, quantize=quantize, sparse=sparse, file_bytes=len(tflite),
            gzip_bytes=len(gzip.compress(tflite, 9)), ops=ops, tensors=tensors,
            params=params, nonzero_params=nonzero, flops=flops, notes=notes,
            verified_on=verified_on if verify else None)
        runner = _tflite_inspect.Runner(tmp)
        if verify:
            _verify(model, runner, verify_x, quantize, tolerance, min_agreement, report)
        if latency_runs:
            sample = verify_x if verify_x is not None else np.zeros((1,) + shape[1:], "float32")
            report.latency_ms = runner.latency_ms(sample, latency_runs)
        report.interpreter = runner.name
        report.notes.extend(runner.notes)
        if compare_dense:
            report.dense_bytes = len(tflite) if not sparse else len(
                _convert(model, shape, False, quantize, representative, io_dtype))
            report.dense_float_bytes = report.dense_bytes if quantize is None else len(
                _convert(model, shape, False, None, None, "float32"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report


def _verify(model, runner, x, quantize, tolerance, min_agreement, report):
    default_tol, default_agree = _DEFAULT_TOLERANCE[quantize]
    tolerance = default_tol if tolerance is None else tolerance
    min_agreement = default_agree if min_agreement is None else min_agreement
    expected = np.asarray(model.predict(x, batch_size=256, verbose=0), dtype=np.float32)
    actual = runner.predict(x)
    if actual.shape != expected.shape:
        raise ExportVerificationError(f"TFLite output shape {actual.shape} != Keras output "
                                      f"shape {expected.shape}.")
    # Kernels can differ between batch 1 and larger batches: keep the worse of the two.
    single = runner.predict(x[:8], batch_size=1)
    worse = np.abs(single - expected[:8]) > np.abs(actual[:8] - expected[:8])
    actual[:8] = np.where(worse, single, actual[:8])
    diff = float(np.max(np.abs(actual - expected)))
    report.max_abs_diff, report.verify_samples = diff, len(x)
    if expected.ndim == 2 and expected.shape[1] > 1:
        report.top1_agreement = float(np.mean(actual.argmax(1) == expected.argmax(1)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if not np.isfinite(diff) or diff > tolerance * scale or (
            report.top1_agreement is not None and report.top1_agreement < min_agreement):
        raise ExportVerificationError(
            f"The TFLite file does not match the Keras model on {len(x)} samples: "
            f"max |Keras - TFLite| = {diff:.4g} (allowed {tolerance * scale:.4g}), top-1 "
            f"agreement = {report.top1_agreement} (required {min_agreement}). Nothing was "
            f"written. Loosen `tolerance` / `min_agreement` if this is expected for "
            f"quantize={quantize!r}.")
