"""Private helper: run a `.tflite` (LiteRT) file in the interpreter, and time it.

`Runner` feeds inputs by signature name (quantizing and dequantizing int8 / uint8 tensors
with their scale and zero point), batches any number of samples, and falls back to the
builtin kernels when the default XNNPACK delegate refuses a file (some sparse quantized
graphs: "failed to delegate CONV_2D"). `export_tflite` verifies and times its files with
it; `metrics.evaluate` scores them.
"""

import re
import time

import numpy as np

from keras_ibprune import signature


def _quantized(detail):
    scale, _ = detail.get("quantization", (0.0, 0))
    return bool(scale) and detail["dtype"] in (np.int8, np.uint8, np.int16)


def _refusal_note(message):
    """The report's note for a file the XNNPACK delegate refused, in plain words: LiteRT's
    message glues its lines ("...node #7Node number 12 (TfLiteXNNPackDelegate) ...")."""
    found = re.search(r"failed to delegate (\w+) node #(\d+)", message)
    what = (f"it could not take op #{found.group(2)} ({found.group(1)})" if found
            else " ".join(message.split())[:120])
    return ("the default XNNPACK delegate refused this file: " + what + "; the whole file "
            "runs on LiteRT's builtin kernels, which are slower")


class Runner:
    """Runs a `.tflite` file (path or bytes) in the LiteRT interpreter.

    Inputs and outputs are found by name through the file's signature (files written by
    `export_tflite` have one); files without a signature use the tensors' order.
    """

    def __init__(self, model, num_threads=1):
        try:
            from ai_edge_litert import interpreter as lite

            self.name = "ai-edge-litert"
        except ImportError:
            import tensorflow as tf

            lite, self.name = tf.lite, "tf.lite"
        self._lite = lite
        self._resolvers = getattr(lite, "OpResolverType", None) or lite.experimental.OpResolverType
        self._kwargs = {"num_threads": num_threads}
        self._kwargs["model_path" if isinstance(model, str) else "model_content"] = model
        self._interp = self._batch = None
        self.notes = []
        self._open(self._lite.Interpreter(**self._kwargs))

    def _open(self, interp):
        """Reads the input / output details `{name: detail}` (signature names if any)."""
        self._interp = interp
        signatures = interp.get_signature_list()
        if signatures:
            runner = interp.get_signature_runner(next(iter(signatures)))
            self.inputs, self.outputs = runner.get_input_details(), runner.get_output_details()
        else:
            self.inputs = {d["name"]: d for d in interp.get_input_details()}
            self.outputs = {d["name"]: d for d in interp.get_output_details()}

    def _resize(self, batch):
        for d in self.inputs.values():
            self._interp.resize_tensor_input(d["index"], [batch] + list(d["shape"][1:]))
        self._interp.allocate_tensors()
        for d in self.inputs.values():  # zeros, not garbage: a GATHER checks its ids
            self._interp.set_tensor(
                d["index"], np.zeros([batch] + list(d["shape"][1:]), d["dtype"])
            )

    def _prepare(self, batch):
        if self._batch is not None and batch == self._batch:
            return
        try:
            self._resize(batch)
            self._interp.invoke()  # delegates may only fail on first invoke
        except RuntimeError as err:
            if self.notes:  # already on the builtin kernels
                raise
            self.notes.append(_refusal_note(str(err)))
            fallback = self._resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            self._open(
                self._lite.Interpreter(**self._kwargs, experimental_op_resolver_type=fallback)
            )
            self._resize(batch)
        self._batch = batch

    def _keyed(self, x):
        """`x` (one array, or a dict by input name) as `{input name: array}`."""
        names = list(self.inputs)
        if isinstance(x, dict):  # model input names as `export_tflite` spells them
            keys = [k if k in self.inputs else n for k, n in zip(x, signature.arg_names(x))]
            x = dict(zip(keys, x.values()))
            if set(x) != set(names):
                raise ValueError(
                    f"The .tflite file's inputs are {names}. Received: inputs keyed {list(x)}"
                )
            return {k: np.asarray(x[k]) for k in names}
        if isinstance(x, (list, tuple)):
            if len(x) != len(names) or len(names) > 1:
                # The file's signature order is not the model's input order (often sorted):
                # a list could silently swap two inputs of the same shape.
                raise ValueError(
                    f"The .tflite file has {len(names)} input(s) {names}: pass a dict keyed "
                    f"by those names (a list's order is ambiguous). Received: a list of "
                    f"{len(x)} arrays"
                )
            return {names[0]: np.asarray(x[0])}
        if len(names) != 1:
            raise ValueError(
                f"The .tflite file has {len(names)} inputs {names}: pass a dict "
                "keyed by those names. Received: one array"
            )
        return {names[0]: np.asarray(x)}

    def predict(self, x, batch_size=256):
        """Outputs for inputs `x`: one array, or `{output name: array}` for several."""
        x = self._keyed(x)
        n = len(next(iter(x.values())))
        outs = {k: [] for k in self.outputs}
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in x.items()}
            self._prepare(len(next(iter(chunk.values()))))
            for name, d in self.inputs.items():
                value = chunk[name]
                if _quantized(d):
                    scale, zero = d["quantization"]
                    info = np.iinfo(d["dtype"])
                    value = np.clip(
                        np.round(value.astype(np.float32) / scale + zero), info.min, info.max
                    )
                self._interp.set_tensor(d["index"], np.ascontiguousarray(value.astype(d["dtype"])))
            self._interp.invoke()
            for name, d in self.outputs.items():
                y = self._interp.get_tensor(d["index"])
                if _quantized(d):
                    scale, zero = d["quantization"]
                    y = (y.astype(np.float32) - zero) * scale
                outs[name].append(np.array(y, dtype=np.float32))
        result = {k: np.concatenate(v) for k, v in outs.items()}
        return next(iter(result.values())) if len(result) == 1 else result

    def latency_ms(self, sample, runs):
        """Median single-thread latency (ms) of one inference on the first sample."""
        x = self._keyed(sample)
        self._prepare(1)
        self.predict({k: v[:1] for k, v in x.items()})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self._interp.invoke()
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)

    def io_details(self):
        """`(inputs, outputs)`: per tensor `{name, shape, dtype, quantization}`."""

        def rows(details):
            return [
                {
                    "name": k,
                    "shape": [int(s) for s in d["shape"]],
                    "dtype": np.dtype(d["dtype"]).name,
                    "quantization": [float(d["quantization"][0]), int(d["quantization"][1])],
                }
                for k, d in details.items()
            ]

        return rows(self.inputs), rows(self.outputs)
