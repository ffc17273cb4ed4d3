"""Private helpers: decode TFLite's sparse tensor encoding, and repair what the converter breaks.

TFLite stores a sparse constant as its non-zero values plus `Tensor.sparsity`: a
`traversal_order` over the tensor's dimensions followed by its block dimensions
(`block_map[i]` names the dimension block `i` tiles), and one `DimensionMetadata` per
traversed dimension, DENSE (`dense_size`) or SPARSE_CSR (`array_segments`,
`array_indices`). `decode` expands such a tensor back to its dense values, or says why it
cannot.

Measured with TensorFlow 2.21 (`quantize="int8"`, `sparse=True`): for a
FULLY_CONNECTED weight whose input dimension is *not a multiple of 16*, the converter
still picks its int8 1x16 block encoding, and the file is wrong: the (8, 4) weight of a
`Dense(8)` on 4 inputs is written as one 16-value block on row 0 (rows 0-3 of the matrix
flattened), rows 1-7 empty. The interpreter runs it without complaint; top-1 agreement
with Keras fell to 0.57 on the test model (0.977 with the dense encoding). `repair`
finds such tensors and stores them dense, taking the values from the dense conversion.
"""

import numpy as np

from keras_ibprune import _tflite_inspect, _xnnpack_tflite


def _vector(vec):
    values = getattr(vec, "values", None)
    return None if values is None else np.asarray(values, dtype=np.int64)


def block_shape(tensor):
    """Block size per dimension of a sparse tensor (1 where not blocked)."""
    shape = [int(s) for s in tensor.shape]
    sparsity = tensor.sparsity
    block_map = [] if sparsity.blockMap is None else [int(d) for d in sparsity.blockMap]
    blocks = [1] * len(shape)
    for i, dim in enumerate(block_map):
        blocks[dim] = int(sparsity.dimMetadata[len(shape) + i].denseSize)
    return blocks


def decode(tensor, values):
    """Dense values of a sparse-encoded tensor.

    Args:
        tensor: a `TensorT` with `sparsity` set.
        values: its stored values (1-D numpy array of the tensor's dtype).

    Returns:
        `(dense, None)`, or `(None, reason)` when the encoding does not describe a tensor of
        this shape (a block that does not divide its dimension, an index out of range, or
        a value count that does not match the buffer).
    """
    shape = [int(s) for s in tensor.shape]
    sparsity = tensor.sparsity
    rank = len(shape)
    order = [int(d) for d in sparsity.traversalOrder]
    blocks = block_shape(tensor)
    block_map = [] if sparsity.blockMap is None else [int(d) for d in sparsity.blockMap]
    for dim, (size, block) in enumerate(zip(shape, blocks)):
        if block < 1 or size % block:
            return None, (
                f"block {'x'.join(map(str, blocks))} does not tile dimension {dim} of size {size}"
            )
    # Sizes of the expanded dimensions: block counts, then in-block sizes.
    sizes = [s // b for s, b in zip(shape, blocks)] + [blocks[d] for d in block_map]
    metas = list(sparsity.dimMetadata)
    dense = np.zeros(shape, dtype=values.dtype)
    index = [0] * len(order)
    consumed = 0

    def place(level, parent):
        nonlocal consumed
        if level == len(order):
            coord = [index[d] * blocks[d] for d in range(rank)]
            for i, dim in enumerate(block_map):
                coord[dim] += index[rank + i]
            if consumed >= values.size:
                raise IndexError("more positions than stored values")
            dense[tuple(coord)] = values[consumed]
            consumed += 1
            return
        meta, dim = metas[level], order[level]
        if meta.format == 0:  # DENSE
            size = int(meta.denseSize)
            if size != sizes[dim]:
                raise IndexError(f"dense size {size} of dimension {dim}, expected {sizes[dim]}")
            for i in range(size):
                index[dim] = i
                place(level + 1, parent * size + i)
            return
        segments, indices = _vector(meta.arraySegments), _vector(meta.arrayIndices)
        if segments is None or indices is None or parent + 1 >= segments.size:
            raise IndexError("CSR segments do not cover the parent dimension")
        for k in range(int(segments[parent]), int(segments[parent + 1])):
            if not 0 <= indices[k] < sizes[dim]:
                raise IndexError(f"index {indices[k]} outside dimension {dim}")
            index[dim] = int(indices[k])
            place(level + 1, k)

    try:
        place(0, 0)
    except IndexError as err:
        return None, str(err)
    if consumed != values.size:
        return None, f"{consumed} positions for {values.size} stored values"
    return dense, None


def _weights(model_t, raw):
    """`{(shape, scales) : values}` of the dense constant quantized tensors of a file."""
    found = {}
    for subgraph in model_t.subgraphs:
        for tensor in subgraph.tensors:
            q = tensor.quantization
            scale = None if q is None else getattr(q, "scale", None)
            data = _tflite_inspect.buffer_bytes(model_t, tensor, raw)
            if tensor.sparsity is None and scale is not None and len(scale) and data:
                key = (tuple(int(s) for s in tensor.shape), np.asarray(scale, np.float32).tobytes())
                found[key] = data
    return found


def repair(tflite_bytes, dense_bytes):
    """Stores dense every sparse tensor whose encoding `decode` rejects, and every one that
    would keep XNNPACK from delegating the file (`_undelegable`).

    Args:
        tflite_bytes: the sparse conversion.
        dense_bytes: the same model converted with the dense encoding, or a callable
            returning it (called only when a tensor needs repair). Tensors are matched by
            shape and quantization scales (per-channel scales come from the same float
            weights in both conversions).

    Returns:
        `(new_bytes, names)`: the repaired file (`tflite_bytes` itself when nothing was
        wrong) and `(tensor name, reason)` for each tensor stored dense.

    Raises:
        ValueError: a broken tensor has no counterpart in the dense conversion.
    """
    model_t = _tflite_inspect.unpack(tflite_bytes)
    schema = _tflite_inspect.load_schema()
    types = _tflite_inspect.enum_names(schema.TensorType)
    broken = _undelegable(model_t, types)
    seen = {id(t) for t, _ in broken}
    for subgraph in model_t.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.sparsity is None or id(tensor) in seen:
                continue
            data = _tflite_inspect.buffer_bytes(model_t, tensor, tflite_bytes)
            dtype = _tflite_inspect.NP_DTYPES.get(types.get(tensor.type))
            if dtype is None:
                continue
            _, reason = decode(tensor, np.frombuffer(data, dtype=dtype))
            if reason is not None:
                broken.append((tensor, reason))
    if not broken:
        return tflite_bytes, []
    dense_bytes = dense_bytes() if callable(dense_bytes) else dense_bytes
    weights = _weights(_tflite_inspect.unpack(dense_bytes), dense_bytes)
    repaired = []
    for tensor, reason in broken:
        q = tensor.quantization
        scale = None if q is None else getattr(q, "scale", None)
        key = (
            tuple(int(s) for s in tensor.shape),
            None if scale is None else np.asarray(scale, np.float32).tobytes(),
        )
        name = _tflite_inspect.decode_name(tensor.name)
        if key not in weights:
            raise ValueError(
                f"The converter wrote tensor '{name}' with a broken sparse "
                f"encoding ({reason}) and the dense conversion has no tensor "
                "to replace it. Export with sparse=False."
            )
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(weights[key], dtype=np.uint8).copy()
        model_t.buffers.append(buffer)
        tensor.buffer = len(model_t.buffers) - 1
        tensor.sparsity = None
        repaired.append((name, reason))
    _drop_densify(model_t, {id(t) for t, _ in broken})
    import flatbuffers

    builder = flatbuffers.Builder(len(tflite_bytes) + 4096)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), repaired


def _undelegable(model_t, types):
    """`(tensor, reason)` for each sparse int8 weight an int8 FULLY_CONNECTED reads through
    DENSIFY: XNNPACK's delegate cannot prepare such an op and then refuses the *whole*
    file, which runs on LiteRT's builtin kernels (measured: 4-5x slower on MobileNetV2).
    Float weights through DENSIFY are delegated."""
    out = []
    for sub in model_t.subgraphs:
        names = [_tflite_inspect.op_name(model_t, op) for op in sub.operators]
        fc_weights = {  # of fully int8 FULLY_CONNECTED ops (not dynamic-range hybrids)
            int(op.inputs[1])
            for op, name in zip(sub.operators, names)
            if name == "FULLY_CONNECTED" and op.inputs is not None and len(op.inputs) > 1
            and types.get(sub.tensors[int(op.inputs[0])].type) == "INT8"
        }
        for op, name in zip(sub.operators, names):
            if name != "DENSIFY" or int(op.outputs[0]) not in fc_weights:
                continue
            src = sub.tensors[int(op.inputs[0])]
            if src.sparsity is not None and types.get(src.type) == "INT8":
                out.append((src, "XNNPACK cannot delegate an int8 FULLY_CONNECTED whose "
                                 "weights are DENSIFY'd and would refuse the whole file "
                                 "(prune Dense layers in (16, 1) blocks to keep them "
                                 "sparse in int8)"))
    return out


def _drop_densify(model_t, dense_ids):
    """Removes DENSIFY ops whose input is now dense; their consumers read the input."""
    for subgraph in model_t.subgraphs:
        rewire, kept = {}, []
        for op in subgraph.operators:
            if (
                _tflite_inspect.op_name(model_t, op) == "DENSIFY"
                and id(subgraph.tensors[op.inputs[0]]) in dense_ids
            ):
                rewire[int(op.outputs[0])] = int(op.inputs[0])
                continue
            kept.append(op)
        for op in kept:
            if op.inputs is not None:
                op.inputs = np.asarray(
                    [rewire.get(int(i), int(i)) for i in op.inputs], dtype=np.int32
                )
        subgraph.operators = kept


def fix(tflite_bytes, dense_bytes, notes):
    """Every repair a sparse file gets before it is written, each said in `notes`:
    broken encodings stored dense (`repair`), DENSIFY ops for kernels that misread sparse
    inputs, and symmetric stride-2 "same" convolutions as PAD + "valid" (for XNNPACK).

    Args:
        tflite_bytes: the sparse conversion.
        dense_bytes: the dense conversion of the same model, or a callable making it.
        notes: a list the report's notes are appended to.

    Returns:
        The repaired flatbuffer bytes.
    """
    tflite, repaired = repair(tflite_bytes, dense_bytes)
    notes.extend(f"'{name}' stored dense: {reason}" if reason.startswith("XNNPACK") else
                 f"'{name}' stored dense: the converter's sparse encoding was wrong "
                 f"({reason}; see _tflite_sparse)" for name, reason in repaired)
    tflite, inserted = _tflite_inspect.densify_unsupported_sparse_inputs(tflite)
    if inserted:
        notes.append(f"inserted {inserted} DENSIFY op(s): the converter fed sparse "
                     "weights to kernels that misread them (see _tflite_inspect)")
    tflite, padded = _xnnpack_tflite.explicit_stride2_padding(tflite)
    if padded:
        notes.append(f"{padded} stride-2 'same' convolution(s) written as PAD + 'valid' "
                     "(the same function; the form XNNPACK's sparse path accepts)")
    return tflite
