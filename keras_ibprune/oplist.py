"""The per-op view of an exported `.tflite` file: Keras layer names and how each op runs.

`op_table(tflite_bytes, layer_names)` lists every op of the file with

* `layers`: the Keras layers it computes (names read from the converter's tensor names and
  kept only when they are layers of the model, so fused ops list e.g. the convolution, its
  BatchNormalization and its ReLU),
* `weights`: how its weight is stored (`dense`, `sparse CSR`, `sparse block 1x4`, ...),
  and `weight_shape` its shape in the file (CONV_2D: `[out, kh, kw, in]`),
* `delegated`: whether the default XNNPACK delegate of this interpreter takes it,
* `xnnpack_sparse`: whether it belongs to a subgraph that meets XNNPACK's sparse-inference
  conditions (see `keras_ibprune.xnnpack`), i.e. runs sparse on ARM phones,
* `runs`: what happens on *this* machine: `"sparse"` (a sparse kernel executes),
  `"dense"` (XNNPACK, dense kernels) or `"fallback"` (LiteRT's builtin kernel, not
  delegated); a DENSIFY op is `"load"` (it expands stored weights once, at load time).
"""

import re

from keras_ibprune import _tflite_inspect, _tflite_runner, _xnnpack_tflite

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_KIND_OPS = {
    "Conv2D": ("CONV_2D",),
    "DepthwiseConv2D": ("DEPTHWISE_CONV_2D",),
    "Dense": ("FULLY_CONNECTED",),
    "Conv2DTranspose": ("TRANSPOSE_CONV",),
}


def _layer_names(tensor_name, layers, op):
    """Keras layer names mentioned in a converter tensor name, in order, each once.

    The converter joins fused tensors' names with ';' and Keras name scopes may carry a
    `_<n>` suffix (`conv2d_1` for layer `conv2d`); a component that names a layer as is
    and also with its suffix removed is resolved by the op type.
    """
    found = []
    for part in re.split(r"[;/:]", tensor_name):
        candidates = [c for c in (part, re.sub(r"_\d+$", "", part)) if c in layers]
        if len(candidates) == 2 and candidates[0] != candidates[1]:
            typed = [c for c in candidates if op in _KIND_OPS.get(layers[c], ())]
            candidates = typed or candidates[1:]
        if candidates and candidates[0] not in found:
            found.append(candidates[0])
    return found


def delegated_ops(tflite_bytes, num_threads=1):
    """Indices of the ops the default XNNPACK delegate takes (empty if it refuses the file)."""
    try:
        from ai_edge_litert import interpreter as lite
    except ImportError:
        import tensorflow as tf

        lite = tf.lite
    try:
        interp = lite.Interpreter(model_content=tflite_bytes, num_threads=num_threads)
        interp.allocate_tensors()
        details = interp._get_ops_details()
    except (RuntimeError, ValueError, AttributeError):
        return set()
    original = [d for d in details if d["op_name"] != "DELEGATE"]
    producer = {}
    for d in original:
        for t in d["outputs"]:
            producer[int(t)] = d["index"]
    inputs_of = {d["index"]: [int(t) for t in d["inputs"] if t >= 0] for d in original}
    taken = set()
    for d in details:
        if d["op_name"] != "DELEGATE":
            continue
        boundary = {int(t) for t in d["inputs"]}
        stack = [int(t) for t in d["outputs"]]
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if t in boundary or p is None or p in taken:
                continue
            taken.add(p)
            stack.extend(inputs_of[p])
    return taken


def op_table(tflite_bytes, layer_names=None):
    """One dict per op of the file's main subgraph (see the module docstring).

    Args:
        tflite_bytes: the flatbuffer.
        layer_names: `{layer name: layer class name}` of the Keras model (or any iterable of
            names); names found in the file but not listed are dropped.

    Returns:
        `(rows, notes)`.
    """
    layers = (
        dict(layer_names) if isinstance(layer_names, dict) else {n: "" for n in (layer_names or [])}
    )
    model_t = _tflite_inspect.unpack(tflite_bytes)
    sub = model_t.subgraphs[0]
    names = [_tflite_inspect.op_name(model_t, op) for op in sub.operators]
    producer = {int(t): i for i, op in enumerate(sub.operators) for t in op.outputs}
    sparse_ops, notes = _xnnpack_tflite.sparse_subgraph_ops(tflite_bytes)
    delegated = delegated_ops(tflite_bytes)
    host_sparse = _xnnpack_tflite.host_runs_sparse()
    rows = []
    for i, op in enumerate(sub.operators):
        name = names[i]
        storage, weight, kernel = "-", None, None
        if name in _WEIGHTED and len(op.inputs) > 1:
            weight = int(op.inputs[1])
            p = producer.get(weight)
            src = (
                int(sub.operators[p].inputs[0])
                if p is not None and names[p] in ("DENSIFY", "DEQUANTIZE")
                else weight
            )
            storage = _tflite_inspect.storage_of(sub.tensors[src].sparsity)
            kernel = [int(d) for d in sub.tensors[weight].shape]
        tensors = [int(t) for t in op.outputs] + ([weight] if weight is not None else [])
        found = []
        for t in tensors:
            for n in _layer_names(_tflite_inspect.decode_name(sub.tensors[t].name), layers, name):
                if n not in found:
                    found.append(n)
        order = list(layers)
        found.sort(key=order.index)
        in_sparse = i in sparse_ops
        if name == "DENSIFY":
            runs = "load"
        elif weight is not None and storage != "dense" and producer.get(weight) is None:
            runs = "sparse"  # a kernel reading the sparse encoding (block-sparse FC)
        elif i in delegated:
            runs = (
                "sparse"
                if in_sparse and host_sparse and storage != "dense" and name == "CONV_2D"
                else "dense"
            )
        else:
            runs = "fallback"
        rows.append(
            {
                "index": i,
                "op": name,
                "layers": found,
                "weights": storage,
                "weight_shape": kernel,
                "delegated": i in delegated,
                "xnnpack_sparse": in_sparse,
                "runs": runs,
            }
        )
    if sparse_ops and not host_sparse:
        notes.append(
            "XNNPACK's sparse path is off on this CPU (x86 with AVX): ops marked "
            "'sparse on ARM' run dense here and sparse on ARM phones"
        )
    return rows, notes


def name_tensors(tensors, layer_names):
    """Adds `layers` (Keras layer names, as in `op_table`) to each tensor dict, in place."""
    layers = dict(layer_names)
    order = list(layers)
    for t in tensors:
        op = next((c for c in t.get("consumers", []) if c != "DENSIFY"), "")
        t["layers"] = sorted(_layer_names(t["name"], layers, op), key=order.index)
    return tensors


def format_ops(rows, width=100):
    """The op table as text lines (layer lists wrapped at commas, never cut mid-word)."""
    lines = [
        f"{'#':>3}  {'op':<18} {'runs here':<9} {'on ARM':<7} {'weights':<16} layers",
        "     (on ARM: sparse = XNNPACK sparse kernel, NCHW = in its sparse subgraph)",
    ]
    indent = 3 + 2 + 18 + 1 + 9 + 1 + 7 + 1 + 16 + 1
    for r in rows:
        if r["xnnpack_sparse"]:
            sparse_conv = r["weights"] not in ("dense", "-") and r["op"] == "CONV_2D"
            arm = "sparse" if sparse_conv else "NCHW"
        else:
            arm = {"load": "-", "fallback": "builtin"}.get(r["runs"], r["runs"])
        head = f"{r['index']:>3}  {r['op']:<18} {r['runs']:<9} {arm:<7} {r['weights']:<16} "
        parts, line = r["layers"] or ["-"], head
        for k, part in enumerate(parts):
            piece = part + ("," if k < len(parts) - 1 else "")
            if len(line) + len(piece) + 1 > width and line.strip() != head.strip():
                lines.append(line.rstrip())
                line = " " * indent
            line += piece + " "
        lines.append(line.rstrip())
    return lines


def layer_kinds(model):
    """`{layer name: class name}` of every layer of a Keras model (nested ones included)."""
    from keras_ibprune import _keras_compat

    return {la.name: type(la).__name__ for la in _keras_compat.all_layers(model)}


def thread_latencies(path, sample, runs, one_thread_ms=None):
    """`{1: ms, 4: ms}`: median latency of one inference with 1 and 4 interpreter threads."""
    out = {}
    for threads in (1, 4):
        if threads == 1 and one_thread_ms is not None:
            out[1] = one_thread_ms
            continue
        out[threads] = _tflite_runner.Runner(path, num_threads=threads).latency_ms(sample, runs)
    return out


def report_lines(report):
    """Text appended to `str(ExportReport)`: latencies by thread count and the op table."""
    lines = []
    threads = getattr(report, "latency_ms_threads", None) or {}
    if threads:
        lines.append(
            "median latency by threads  "
            + ", ".join(
                f"{k} thread{'s' if k > 1 else ''}: {v:.4f} ms" for k, v in sorted(threads.items())
            )
        )
    rows = getattr(report, "op_table", None) or []
    if rows:
        lines += ["", "per op (runs here: sparse / dense XNNPACK / fallback = builtin kernel)"]
        lines += format_ops(rows)
    return "\n" + "\n".join(lines) if lines else ""
