"""Private helpers: read (and minimally patch) TFLite / LiteRT flatbuffers.

How TFLite stores and executes sparse weights (measured with TensorFlow 2.21 and
ai-edge-litert 2.3; see `benchmarks/results/export.md`):

* With `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` the converter encodes a constant
  weight as a sparse tensor (`Tensor.sparsity`: `traversal_order`, `block_map`,
  one `DimensionMetadata` per dimension, DENSE or SPARSE_CSR with
  `array_segments` / `array_indices` stored as uint8, uint16 or int32 vectors).
  The buffer then holds only the stored values.
* FULLY_CONNECTED weights, laid out `(units, input_dim)` (the transpose of a
  Keras `Dense` kernel), are *executed sparse* (no DENSIFY op) only when
  their zeros come in blocks of 1x4 (float32) or 1x16 (int8 / dynamic-range
  int8) along the input dimension, i.e. blocks of shape (4, 1) or (16, 1) of
  the Keras kernel (4 or 16 consecutive inputs of one unit).
  Unstructured (random) sparsity is stored as CSR and densified at load time
  by a DENSIFY op.
* CONV_2D / DEPTHWISE_CONV_2D weights are always DENSIFY'd: stored sparse,
  executed dense.
* float16 + block-sparse FULLY_CONNECTED weights: the converter feeds the
  sparse float16 tensor straight into DEQUANTIZE, which does not understand the
  encoding (NaN outputs). `densify_unsupported_sparse_inputs` inserts the
  missing DENSIFY op.
* Dynamic-range (hybrid) FULLY_CONNECTED with 1x16 block-sparse int8 weights
  computes wrong outputs for batch > 1 (batch 1 is right); those weights also
  get a DENSIFY op (stored sparse, executed dense).
* The default XNNPACK delegate refuses some sparse quantized graphs
  ("failed to delegate CONV_2D"); such files run with the builtin kernels
  (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`; see `_tflite_runner`).
"""

import re

import numpy as np

NP_DTYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "FLOAT64": np.float64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "UINT32": np.uint32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


def load_schema():
    """The TFLite flatbuffer schema: LiteRT's generated module (no TensorFlow import), else
    TensorFlow's copy."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:  # LiteRT not installed: TensorFlow ships the same schema
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def enum_names(enum_cls):
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def unpack(tflite_bytes):
    """Returns the flatbuffer as a `ModelT` object tree."""
    return load_schema().ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)


def op_name(model_t, op):
    schema = load_schema()
    code = model_t.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode
        return "CUSTOM:" + (custom.decode() if isinstance(custom, bytes) else str(custom))
    return enum_names(schema.BuiltinOperator).get(builtin, f"OP_{builtin}")


def buffer_bytes(model_t, tensor, raw):
    buf = model_t.buffers[tensor.buffer]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, dtype=np.uint8).tobytes()
    if getattr(buf, "offset", 0) and buf.offset > 1:
        return bytes(raw[buf.offset : buf.offset + buf.size])
    return b""


def decode_name(name):
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def storage_of(sparsity):
    if sparsity is None:
        return "dense"
    block_map = [int(d) for d in sparsity.blockMap] if sparsity.blockMap is not None else []
    if not block_map:
        return "sparse CSR"
    rank = len(sparsity.traversalOrder) - len(block_map)
    block = [1] * rank
    for i, dim in enumerate(block_map):
        block[dim] = int(sparsity.dimMetadata[rank + i].denseSize)
    return "sparse block " + "x".join(str(b) for b in block)


def _index_bytes(sparsity):
    total = 0
    if sparsity is None:
        return 0
    for dim in sparsity.dimMetadata:
        for vec in (dim.arraySegments, dim.arrayIndices):
            values = getattr(vec, "values", None)
            if values is not None:
                total += np.asarray(values).nbytes
    return total


def inspect_tflite(tflite_bytes):
    """Summarizes ops and constant weight tensors of a `.tflite` flatbuffer.

    Returns:
        `(ops, tensors)`: `ops` lists builtin op names in execution order;
        `tensors` lists one dict per constant tensor of rank >= 2 with its
        name, shape, dtype, storage, stored values, index bytes, sparsity
        (fraction of zeros of the logical tensor), consumers and whether the
        runtime executes it sparse (consumed without a DENSIFY op).
    """
    schema = load_schema()
    type_names = enum_names(schema.TensorType)
    model_t = unpack(tflite_bytes)
    ops, tensors = [], []
    for subgraph in model_t.subgraphs:
        consumers = {}
        for op in subgraph.operators:
            name = op_name(model_t, op)
            ops.append(name)
            for idx in op.inputs if op.inputs is not None else []:
                consumers.setdefault(int(idx), []).append(name)
        for idx, tensor in enumerate(subgraph.tensors):
            shape = [int(s) for s in (tensor.shape if tensor.shape is not None else [])]
            data = buffer_bytes(model_t, tensor, tflite_bytes)
            if len(shape) < 2 or not data:
                continue
            dtype_name = type_names.get(tensor.type, str(tensor.type))
            np_dtype = NP_DTYPES.get(dtype_name)
            numel = int(np.prod(shape))
            nonzero, stored = None, None
            if np_dtype is not None:
                values = np.frombuffer(data, dtype=np_dtype)
                stored, nonzero = int(values.size), int(np.count_nonzero(values))
            users = consumers.get(idx, [])
            storage = storage_of(tensor.sparsity)
            tensors.append(
                {
                    "name": decode_name(tensor.name),
                    "shape": shape,
                    "dtype": dtype_name.lower(),
                    "storage": storage,
                    "num_elements": numel,
                    "stored_values": stored,
                    "value_bytes": len(data),
                    "index_bytes": _index_bytes(tensor.sparsity),
                    "sparsity": None if nonzero is None else 1.0 - nonzero / max(numel, 1),
                    "consumers": users,
                    "executed_sparse": storage != "dense" and bool(users)
                    and "DENSIFY" not in users,
                }
            )
    return ops, tensors


def densify_unsupported_sparse_inputs(tflite_bytes):
    """Inserts DENSIFY before ops that receive a sparse tensor they cannot read.

    Only DENSIFY and FULLY_CONNECTED (weights input, same dtype as the
    activations) read the sparse encoding correctly. Two converter outputs
    break that and get a DENSIFY op here:
    float16 block-sparse weights fed straight into DEQUANTIZE (NaN outputs),
    and dynamic-range ("hybrid": float activations, int8 weights) 1x16
    block-sparse FULLY_CONNECTED, whose kernel is wrong for batch > 1.

    Returns:
        `(new_bytes, n_inserted)`; `new_bytes is tflite_bytes` when nothing changed.
    """
    import flatbuffers

    schema = load_schema()
    model_t = unpack(tflite_bytes)
    densify_code = None
    inserted = 0
    for subgraph in model_t.subgraphs:
        replaced = {}
        new_ops = []
        for op in subgraph.operators:
            name = op_name(model_t, op)
            if name == "DENSIFY" or op.inputs is None:
                continue
            for pos, idx in enumerate(op.inputs):
                if idx < 0 or subgraph.tensors[idx].sparsity is None:
                    continue
                activation = subgraph.tensors[op.inputs[0]]
                if name == "FULLY_CONNECTED" and pos == 1 and activation.type == (
                        subgraph.tensors[idx].type):
                    continue  # float/float or int8/int8: the kernel reads the encoding
                if idx not in replaced:
                    if densify_code is None:
                        code = schema.OperatorCodeT()
                        code.builtinCode = schema.BuiltinOperator.DENSIFY
                        code.deprecatedBuiltinCode = schema.BuiltinOperator.DENSIFY
                        code.version = 1
                        model_t.operatorCodes.append(code)
                        densify_code = len(model_t.operatorCodes) - 1
                    src = subgraph.tensors[idx]
                    out = schema.TensorT()
                    out.name = decode_name(src.name) + "/densified"
                    out.shape = np.asarray(src.shape, dtype=np.int32)
                    out.type = src.type
                    out.quantization = src.quantization
                    out.buffer = 0
                    subgraph.tensors.append(out)
                    replaced[idx] = len(subgraph.tensors) - 1
                    densify = schema.OperatorT()
                    densify.opcodeIndex = densify_code
                    densify.inputs = np.asarray([idx], dtype=np.int32)
                    densify.outputs = np.asarray([replaced[idx]], dtype=np.int32)
                    new_ops.append(densify)
                    inserted += 1
                op.inputs[pos] = replaced[idx]
        subgraph.operators = new_ops + list(subgraph.operators)
    if not inserted:
        return tflite_bytes, 0
    builder = flatbuffers.Builder(len(tflite_bytes) + 4096)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), inserted


def count(items):
    """`{item: occurrences}` in first-seen order."""
    counts = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _tensor_label(tensor):
    """The tensor table's last column: the Keras layer names `oplist.name_tensors` found,
    else (constants the converter made) the last component of the tensor name, never cut."""
    if tensor.get("layers"):
        return ", ".join(tensor["layers"])
    return re.split(r"[;/]", tensor["name"].rstrip(";/"))[-1] or tensor["name"]


def format_report(report):
    """The human-readable table behind `str(ExportReport)`."""
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    rows = [
        ("file", report.path),
        ("quantize / encoding", f"{report.quantize or 'none (float32)'} / "
                                f"{'sparse' if report.sparse else 'dense'}"),
        ("file bytes / gzip", f"{fmt(report.file_bytes, ',')} / {fmt(report.gzip_bytes, ',')}"),
        ("dense encoding bytes / gzip", f"{fmt(report.dense_bytes, ',')} / "
                                        f"{fmt(getattr(report, 'dense_gzip_bytes', None), ',')}"),
        ("dense float32 bytes", fmt(report.dense_float_bytes, ",")),
        ("size vs dense float32", fmt(report.size_ratio, ".4f")),
        ("params / nonzero", f"{fmt(report.params, ',')} / {fmt(report.nonzero_params, ',')}"),
        ("FLOPs (dense)", fmt(report.flops, ",")),
        ("max |Keras - TFLite|", fmt(report.max_abs_diff, ".3g")),
        ("top-1 agreement", fmt(report.top1_agreement, ".4f")),
        ("verify samples", str(report.verify_samples)),
        ("verified on", fmt(getattr(report, "verified_on", None))),
        ("median latency (1 thread)", f"{fmt(report.latency_ms, '.4f')} ms"),
        ("interpreter", fmt(report.interpreter)),
        ("ops", ", ".join(f"{k} x{v}" for k, v in count(report.ops).items())),
    ]
    for kind, tensors in (("input", getattr(report, "inputs", [])),
                          ("output", getattr(report, "outputs", []))):
        for t in tensors:
            q = t.get("quantization") or [0.0, 0]
            text = f"{'x'.join(map(str, t.get('shape', [])))} {t.get('dtype', '-')}"
            text += f" (scale {q[0]:.4g}, zero point {q[1]})" if q[0] else ""
            if t.get("max_abs_diff") is not None:
                text += f", max |Keras - TFLite| {t['max_abs_diff']:.3g}"
            rows.append((f"{kind} {t['name']}", text))
    for name, value in (report.metrics or {}).items():
        rows.append((name, ", ".join(f"{k}={v:.4f}" for k, v in value.items())))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'shape':<16} {'dtype':<8} {'storage':<18} {'sparsity':>8} "
                 f"{'bytes':>9}  {'executed':<8} layers")
    for t in report.tensors:
        executed = "sparse" if t["executed_sparse"] else (
            "DENSIFY" if "DENSIFY" in t["consumers"] else "dense")
        lines.append(
            f"{'x'.join(map(str, t['shape'])):<16} {t['dtype']:<8} "
            f"{t['storage']:<18} {fmt(t['sparsity'], '.3f'):>8} "
            f"{t['value_bytes'] + t['index_bytes']:>9,}  {executed:<8} {_tensor_label(t)}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def unsupported_ops(message):
    """Op names a converter error message says LiteRT builtins lack."""
    found = re.findall(r"'(tfl?\.\w+)' op is neither a custom op nor a flex op", message)
    found += re.findall(r"[Qq]uantization (?:is )?not (?:yet )?supported for op:? '?(\w+)", message)
    found += re.findall(r"'(tfl?\.\w+)' op (?:is not supported|failed to legalize)", message)
    return sorted(set(found))
