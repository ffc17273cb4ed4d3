"""Export pruned Keras models to sparse / quantized TFLite (LiteRT) files.

Which sparse layouts the LiteRT runtime *executes* sparse (measured, TF 2.21):
FULLY_CONNECTED weights whose zeros form 1x4 blocks (float32) or 1x16 blocks
(int8, dynamic-range int8) in TFLite's `(units, inputs)` layout, i.e. `(4, 1)`
or `(16, 1)` blocks of a Keras `Dense` kernel. Everything else (unstructured
FC sparsity, every CONV_2D kernel) is only *stored* sparse and expanded at load
time by a DENSIFY op: it saves file bytes, not compute. `ExportReport.tensors`
says which case each weight is in.

Models with several inputs and outputs export as one signature whose inputs are named after
the model's inputs (integer inputs, e.g. token ids, as int32) and whose outputs are named
after the model's outputs; verification compares every output.
"""

import dataclasses
import gzip
import os
import tempfile

import keras
import numpy as np

from keras_ibprune import (
    _keras_compat,
    _tflite_inspect,
    _tflite_runner,
    _tflite_sparse,
    heldout,
    oplist,
    signature,
)

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

    Sizes are in bytes. `dense_bytes` / `dense_gzip_bytes` are the same model and
    quantization exported without sparse encoding (raw / gzip -9); `dense_float_bytes` the
    plain float32 export; `sparse` says which encoding the file uses. `tensors` lists the
    weights as stored in the flatbuffer (see `keras_ibprune._tflite_inspect.inspect_tflite`),
    each with `layers`, the Keras layers its converter name mentions.
    `latency_ms` is the median single-thread latency per inference (batch 1) in the
    interpreter, `latency_ms_threads` the same with 1 and 4 threads; `op_table` lists every
    op with its Keras layer names and how it runs (`keras_ibprune.oplist`).
    `inputs` and `outputs` list the file's signature tensors (`name`, `shape`, `dtype`,
    `quantization`); verified outputs also carry their `max_abs_diff` and
    `top1_agreement`, and the top-level figures are the worst over outputs.
    """

    path: str
    quantize: str | None
    sparse: bool
    file_bytes: int
    gzip_bytes: int
    dense_bytes: int | None = None
    dense_gzip_bytes: int | None = None
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
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    latency_ms_threads: dict | None = None  # {threads: median ms}, 1 and 4 threads
    op_table: list = dataclasses.field(default_factory=list)  # see keras_ibprune.oplist

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
        return _tflite_inspect.format_report(self) + oplist.report_lines(self)


def _strip(model):
    layers = _keras_compat.all_layers(model) if isinstance(model, keras.layers.Layer) else []
    if any(type(layer).__name__ == "PruneWrapper" for layer in layers):
        from keras_ibprune.prune import strip_pruning

        return strip_pruning(model)
    return model




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


def _convert(model, inputs, sparse, quantize, representative, io_dtype):
    import tensorflow as tf
    from keras.export import ExportArchive

    def serve(*args):
        feed = {i.key: tf.cast(a, i.model_dtype) if i.dtype != i.model_dtype else a
                for i, a in zip(inputs, args)}
        out = model(feed.pop(None) if None in feed else feed, training=False)
        flat = signature.flat_outputs(out)
        names = signature.arg_names(signature.output_names(model, out))
        return flat[0] if len(flat) == 1 else dict(zip(names, flat))

    specs = [tf.TensorSpec(i.shape, tf.as_dtype(i.dtype), name=i.arg) for i in inputs]
    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive = ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", serve, input_signature=specs)
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
            samples = {k: v[:200] for k, v in representative.items()}

            def gen():
                for i in range(heldout.num_samples(samples)):
                    yield {k: v[i : i + 1] for k, v in samples.items()}

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
            or without `PruneWrapper` layers. Several inputs and outputs are fine;
            float inputs are float32 in the file and integer inputs (token ids) int32.
        filepath: Destination path; its directory must exist.
        sparse: `True`: store sparse weights with TFLite's sparse tensor encoding;
            `False`: dense encoding; `"auto"`: convert both and keep the one that is
            smaller once gzip-compressed (the download size; the sparse encoding's index
            arrays can outweigh its savings on small or lightly pruned models), with a note
            giving both sizes.
        quantize: None, `"dynamic"` (int8 weights), `"float16"` or `"int8"`
            (full integer, needs `representative_data`).
        representative_data: Inputs (batch first) used to calibrate `"int8"`; the
            first 200 samples are used. One array, or for several inputs a dict keyed by
            input name (or a list in the model's input order).
        verify: Run the file and compare it with Keras before keeping it.
        verify_data: Inputs for verification, in the same forms; defaults to
            `representative_data` or, failing that, 32 random samples (N(0, 1) floats, 0/1
            integer ids; weak: pass real inputs). The report's `verified_on` says which.
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
    if sparse not in (True, False, "auto"):
        raise ValueError("`sparse` must be True, False or 'auto'. Received: "
                         f"sparse={sparse!r}")
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
    inputs = signature.file_inputs(model, input_shape, (verify_data, representative_data))
    representative = signature.check_data("representative_data", representative_data, model,
                                          inputs)
    verify_x = signature.check_data("verify_data", verify_data, model, inputs)
    notes = []
    verified_on = None if verify_x is None else (
        f"verify_data ({heldout.num_samples(verify_x)} samples)")
    if verify and verify_x is None:
        if representative is not None:
            verify_x = representative
            verified_on = (f"representative_data ({heldout.num_samples(verify_x)} samples; "
                           "no verify_data)")
        else:
            verify_x = signature.random_inputs(inputs)
            ints = any(i.dtype == "int32" for i in inputs)
            verified_on = (f"32 random N(0, 1) inputs{' (integer ids 0/1)' if ints else ''}, "
                           "NOT real data (pass verify_data= to verify on your inputs)")

    dense_file = None
    if sparse in (False, "auto") or compare_dense:
        dense_file = _convert(model, inputs, False, quantize, representative, io_dtype)
    tflite = dense_file
    if sparse:
        tflite = _convert(model, inputs, True, quantize, representative, io_dtype)
        tflite = _tflite_sparse.fix(tflite, dense_file or (lambda: _convert(
            model, inputs, False, quantize, representative, io_dtype)), notes)
    dense_gzip = None if dense_file is None else len(gzip.compress(dense_file, 9))
    if sparse == "auto":
        sparse_gzip = len(gzip.compress(tflite, 9))
        sparse = sparse_gzip < dense_gzip
        notes.append(f"sparse='auto': {'sparse' if sparse else 'dense'} encoding kept "
                     f"(gzip: sparse {sparse_gzip:,} B, dense {dense_gzip:,} B)")
        tflite = tflite if sparse else dense_file
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
        runner = _tflite_runner.Runner(tmp)
        report.inputs, report.outputs = runner.io_details()
        if verify:
            _verify(model, runner, verify_x, inputs, quantize, tolerance, min_agreement,
                    report)
        if latency_runs:
            sample = verify_x if verify_x is not None else signature.random_inputs(inputs, 1)
            report.latency_ms = runner.latency_ms(sample, latency_runs)
            report.latency_ms_threads = oplist.thread_latencies(tmp, sample, latency_runs,
                                                                report.latency_ms)
        kinds = oplist.layer_kinds(model)
        report.op_table, op_notes = oplist.op_table(tflite, kinds)
        oplist.name_tensors(report.tensors, kinds)
        notes.extend(op_notes)
        report.interpreter = runner.name
        report.notes.extend(runner.notes)
        if compare_dense:
            report.dense_bytes, report.dense_gzip_bytes = len(dense_file), dense_gzip
            report.dense_float_bytes = report.dense_bytes if quantize is None else len(
                _convert(model, inputs, False, None, None, "float32"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report


def _verify(model, runner, x, inputs, quantize, tolerance, min_agreement, report):
    """Compares every output of the file with Keras on `x`; the worst figures are kept."""
    default_tol, default_agree = _DEFAULT_TOLERANCE[quantize]
    tolerance = default_tol if tolerance is None else tolerance
    min_agreement = default_agree if min_agreement is None else min_agreement
    feed = signature.model_feed(x, inputs)
    keras_out = model.predict(feed, batch_size=256, verbose=0)
    expected = [np.asarray(o, np.float32) for o in signature.flat_outputs(keras_out)]
    names = signature.arg_names(signature.output_names(model, keras_out))
    actual, single = runner.predict(x), runner.predict(
        {k: v[:8] for k, v in x.items()}, batch_size=1)
    if not isinstance(actual, dict):
        actual, single = {names[0]: actual}, {names[0]: single}
    if set(actual) != set(names):
        raise ExportVerificationError(f"Expected the TFLite file's outputs to be the Keras "
                                      f"model's {sorted(names)}. Received: {sorted(actual)}")
    n = heldout.num_samples(x)
    report.verify_samples, failures = n, []
    rows = {row["name"]: row for row in report.outputs}
    for name, exp in zip(names, expected):
        act = actual[name]
        if act.shape != exp.shape:
            raise ExportVerificationError(f"Expected TFLite output '{name}' of the Keras "
                                          f"shape {exp.shape}. Received: shape {act.shape}")
        # Kernels can differ between batch 1 and larger batches: keep the worse of the two.
        worse = np.abs(single[name] - exp[:8]) > np.abs(act[:8] - exp[:8])
        act[:8] = np.where(worse, single[name], act[:8])
        diff = float(np.max(np.abs(act - exp)))
        top1 = (float(np.mean(act.argmax(1) == exp.argmax(1)))
                if exp.ndim == 2 and exp.shape[1] > 1 else None)
        rows.setdefault(name, {"name": name}).update(max_abs_diff=diff, top1_agreement=top1)
        report.max_abs_diff = diff if report.max_abs_diff is None or not np.isfinite(
            diff) else max(report.max_abs_diff, diff)
        if top1 is not None:
            report.top1_agreement = top1 if report.top1_agreement is None else min(
                report.top1_agreement, top1)
        scale = max(1.0, float(np.max(np.abs(exp))))
        if not np.isfinite(diff) or diff > tolerance * scale or (
                top1 is not None and top1 < min_agreement):
            failures.append(f"{'output ' + repr(name) + ': ' if len(names) > 1 else ''}"
                            f"max |Keras - TFLite| = {diff:.4g} (allowed "
                            f"{tolerance * scale:.4g}), top-1 agreement = {top1} (required "
                            f"{min_agreement})")
    if failures:
        raise ExportVerificationError(
            f"The TFLite file does not match the Keras model on {n} samples: "
            f"{'; '.join(failures)}. Nothing was written. Loosen `tolerance` / "
            f"`min_agreement` if this is expected for quantize={quantize!r}.")
