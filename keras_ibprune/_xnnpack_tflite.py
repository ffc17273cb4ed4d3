"""Private: XNNPACK's sparse-inference rules applied to a `.tflite` flatbuffer.

`explicit_stride2_padding` rewrites symmetric stride-2 "SAME" convolutions as PAD + "VALID"
(see `keras_ibprune.xnnpack` for why). `sparse_subgraph_ops` says which ops XNNPACK would
put in its sparse (NCHW) subgraph, following the conditions of XNNPACK's NCHW rewrite:
clusters that end in a spatial MEAN / DEPTH_TO_SPACE, reach back through compatible ops
only to 3x3 stride-2 3-channel convolutions, keep their values inside the cluster, and
whose 1x1 convolution weights are at least 2/3 zero. `host_runs_sparse` says whether this
machine's XNNPACK uses that path at all (not on x86 CPUs with AVX).
"""

import platform

import numpy as np

from keras_ibprune import _tflite_inspect

_UNARY = {
    "ABS",
    "CEIL",
    "ELU",
    "FLOOR",
    "HARD_SWISH",
    "LEAKY_RELU",
    "LOGISTIC",
    "NEG",
    "RELU",
    "RELU6",
    "RELU_N1_TO_1",
    "ROUND",
    "SQUARE",
}


def host_runs_sparse():
    """False where XNNPACK disables sparse inference: x86 CPUs with AVX."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx" not in line.split()
    except OSError:
        pass
    return False  # x86 without /proc/cpuinfo: assume a modern (AVX) CPU


def _padding_tensor(schema, model_t, subgraph, pad):
    buf = schema.BufferT()
    values = np.array([[0, 0], [pad, pad], [pad, pad], [0, 0]], np.int32)
    buf.data = np.frombuffer(values.tobytes(), np.uint8)
    model_t.buffers.append(buf)
    tensor = schema.TensorT()
    tensor.name = "explicit_padding"
    tensor.shape = np.array([4, 2], np.int32)
    tensor.type = schema.TensorType.INT32
    tensor.buffer = len(model_t.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def explicit_stride2_padding(tflite_bytes):
    """Rewrites stride-2 "SAME" CONV_2D / DEPTHWISE_CONV_2D with symmetric padding (odd
    input height and width, odd square kernel) as PAD + "VALID": the same function, in the
    form XNNPACK's sparse path accepts.

    Returns:
        `(new_bytes, n_rewritten)`; `new_bytes is tflite_bytes` when nothing changed.
    """
    import flatbuffers

    schema = _tflite_inspect.load_schema()
    model_t = _tflite_inspect.unpack(tflite_bytes)
    pad_code, rewritten = None, 0
    for subgraph in model_t.subgraphs:
        operators = []
        for op in subgraph.operators:
            name = _tflite_inspect.op_name(model_t, op)
            opt = op.builtinOptions
            if (
                name in ("CONV_2D", "DEPTHWISE_CONV_2D")
                and opt.padding == schema.Padding.SAME
                and (opt.strideH, opt.strideW) == (2, 2)
                and (opt.dilationHFactor, opt.dilationWFactor) == (1, 1)
            ):
                x = subgraph.tensors[op.inputs[0]]
                kernel = subgraph.tensors[op.inputs[1]].shape
                h, w = int(x.shape[1]), int(x.shape[2])
                k = int(kernel[1])
                if h % 2 and w % 2 and k == int(kernel[2]) and k % 2:
                    if pad_code is None:
                        code = schema.OperatorCodeT()
                        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.PAD
                        code.version = 1
                        model_t.operatorCodes.append(code)
                        pad_code = len(model_t.operatorCodes) - 1
                    paddings = _padding_tensor(schema, model_t, subgraph, k // 2)
                    out = schema.TensorT()
                    conv_out = subgraph.tensors[op.outputs[0]]
                    out.name = _tflite_inspect.decode_name(conv_out.name) + "/explicit_pad"
                    out.shape = np.array([x.shape[0], h + k - 1, w + k - 1, x.shape[3]], np.int32)
                    if x.shapeSignature is not None and len(x.shapeSignature):
                        out.shapeSignature = np.array(out.shape, np.int32)
                        out.shapeSignature[0] = x.shapeSignature[0]
                    out.type, out.quantization, out.buffer = x.type, x.quantization, 0
                    subgraph.tensors.append(out)
                    pad = schema.OperatorT()
                    pad.opcodeIndex = pad_code
                    pad.builtinOptionsType = schema.BuiltinOptions.PadOptions
                    pad.builtinOptions = schema.PadOptionsT()
                    pad.inputs = np.array([op.inputs[0], paddings], np.int32)
                    pad.outputs = np.array([len(subgraph.tensors) - 1], np.int32)
                    operators.append(pad)
                    op.inputs[0] = len(subgraph.tensors) - 1
                    opt.padding = schema.Padding.VALID
                    rewritten += 1
            operators.append(op)
        subgraph.operators = operators
    if not rewritten:
        return tflite_bytes, 0
    builder = flatbuffers.Builder(len(tflite_bytes) + 4096)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), rewritten


def _constant(model_t, subgraph, raw, idx):
    """The values of constant tensor `idx` (dense or sparse-stored: its stored values)."""
    tensor = subgraph.tensors[idx]
    data = _tflite_inspect.buffer_bytes(model_t, tensor, raw)
    if not data:
        return None
    names = {v: k for k, v in vars(_tflite_inspect.load_schema().TensorType).items()}
    dtype = _tflite_inspect.NP_DTYPES.get(names.get(tensor.type))
    return None if dtype is None else np.frombuffer(data, dtype)


class _Graph:
    def __init__(self, tflite_bytes):
        self.model = _tflite_inspect.unpack(tflite_bytes)
        self.sub = self.model.subgraphs[0]
        self.raw = tflite_bytes
        self.names = [_tflite_inspect.op_name(self.model, op) for op in self.sub.operators]
        self.producer, self.consumers = {}, {}
        for i, op in enumerate(self.sub.operators):
            for t in op.outputs if op.outputs is not None else []:
                self.producer[int(t)] = i
            for t in op.inputs if op.inputs is not None else []:
                self.consumers.setdefault(int(t), []).append(i)

    def shape(self, t):
        return [int(s) for s in self.sub.tensors[t].shape]

    def static(self, t):
        """Constant, or the output of a DENSIFY of a constant (weights stored sparse)."""
        p = self.producer.get(t)
        if p is None:
            return _tflite_inspect.buffer_bytes(self.model, self.sub.tensors[t], self.raw) != b""
        return self.names[p] in ("DENSIFY", "DEQUANTIZE") and self.static(
            int(self.sub.operators[p].inputs[0])
        )

    def activations(self, i):
        op = self.sub.operators[i]
        return [int(t) for t in op.inputs if t >= 0 and not self.static(int(t))]

    def padding(self, i):
        """`(top, bottom, left, right)` padding XNNPACK sees (a constant PAD fused)."""
        op, opt = self.sub.operators[i], self.sub.operators[i].builtinOptions
        k = self.shape(int(op.inputs[1]))[1:3]
        if opt.padding == 0:  # SAME: made explicit by XNNPACK only for stride 1
            return (
                None
                if (opt.strideH, opt.strideW) != (1, 1)
                else ((k[0] - 1) // 2, k[0] // 2, (k[1] - 1) // 2, k[1] // 2)
            )
        p = self.producer.get(int(op.inputs[0]))
        if p is not None and self.names[p] == "PAD":
            pads = _constant(self.model, self.sub, self.raw, int(self.sub.operators[p].inputs[1]))
            if pads is not None and len(pads) == 8 and not pads[[0, 1, 6, 7]].any():
                return tuple(int(v) for v in pads[2:6])
        return (0, 0, 0, 0)

    def role(self, i):
        """'enter', 'inside', 'exit' (XNNPACK's NCHW roles) or None for op `i`."""
        name, op = self.names[i], self.sub.operators[i]
        if any(self.sub.tensors[t].type != 0 for t in self.activations(i)):  # FLOAT32 only
            return None
        opt = op.builtinOptions
        if name == "CONV_2D":
            k = self.shape(int(op.inputs[1]))
            if (opt.dilationHFactor, opt.dilationWFactor) != (1, 1):
                return None
            if k[1:3] == [1, 1]:
                ok = (opt.strideH, opt.strideW) == (1, 1) and self.padding(i) in ((0, 0, 0, 0),)
                return "inside" if ok else None
            ok = k[1:3] == [3, 3] and k[3] == 3 and (opt.strideH, opt.strideW) == (2, 2)
            return "enter" if ok and self.padding(i) == (1, 1, 1, 1) else None
        if name == "DEPTHWISE_CONV_2D":
            k = self.shape(int(op.inputs[1]))[1:3]
            ok = (
                k[0] == k[1]
                and k[0] in (3, 5)
                and opt.strideH == opt.strideW
                and (opt.strideH in (1, 2))
                and opt.depthMultiplier in (0, 1)
            )
            return "inside" if ok and self.padding(i) == (k[0] // 2,) * 4 else None
        ranks = [len(self.shape(t)) for t in self.activations(i)]
        if name in ("ADD", "MUL"):
            return "inside" if ranks and all(r == 4 for r in ranks) else None
        if name in _UNARY or name == "RESIZE_BILINEAR":
            return "inside" if ranks == [4] else None
        if name == "MEAN":
            return "exit" if ranks == [4] else None
        if name == "DEPTH_TO_SPACE":
            return "exit"
        if name == "PAD":  # fused into the next convolution when it is constant
            nxt = self.consumers.get(int(op.outputs[0]), [])
            return (
                "fused"
                if len(nxt) == 1
                and self.names[nxt[0]] in ("CONV_2D", "DEPTHWISE_CONV_2D")
                and self.padding(nxt[0]) != (0, 0, 0, 0)
                else None
            )
        return None


def _cluster(graph, exit_op, roles):
    """Ops of the sparse cluster ending at `exit_op`, or None when it is not valid."""
    ops, stack = {exit_op}, [exit_op]
    while stack:
        i = stack.pop()
        if roles[i] == "enter":
            continue
        for t in graph.activations(i):
            p = graph.producer.get(t)
            while p is not None and roles[p] == "fused":
                ops.add(p)
                p = graph.producer.get(graph.activations(p)[0])
            if p is None or roles[p] not in ("inside", "enter"):
                return None
            if p not in ops:
                ops.add(p)
                stack.append(p)
    for i in ops:  # values computed in NCHW must stay inside the cluster
        if i == exit_op or roles[i] == "fused":
            continue
        for t in graph.sub.operators[i].outputs:
            users = graph.consumers.get(int(t), [])
            if int(t) in graph.sub.outputs or any(u not in ops for u in users):
                return None
    return ops


def sparse_subgraph_ops(tflite_bytes):
    """Indices of the ops XNNPACK would run in its sparse (NCHW) subgraph.

    Returns:
        `(ops, notes)`: a set of op indices (of subgraph 0), and why clusters were rejected.
    """
    graph = _Graph(tflite_bytes)
    roles = [graph.role(i) for i in range(len(graph.names))]
    chosen, notes = set(), []
    for i, role in enumerate(roles):
        if role != "exit":
            continue
        ops = _cluster(graph, i, roles)
        if ops is None or not any(roles[j] == "enter" for j in ops):
            continue
        zeros = total = stored_sparse = 0
        for j in ops:
            op = graph.sub.operators[j]
            if graph.names[j] == "CONV_2D" and graph.shape(int(op.inputs[1]))[1:3] == [1, 1]:
                w = int(op.inputs[1])
                p = graph.producer.get(w)
                src = int(graph.sub.operators[p].inputs[0]) if p is not None else w
                stored_sparse += graph.sub.tensors[src].sparsity is not None
                values = _constant(graph.model, graph.sub, graph.raw, src)
                n = int(np.prod(graph.shape(w)))
                total += n
                zeros += n - (0 if values is None else int(np.count_nonzero(values)))
        if total and zeros * 3 >= total * 2 and stored_sparse:
            chosen |= ops
        elif total and not stored_sparse:
            notes.append(
                f"the subgraph ending at op #{i} (MEAN) meets XNNPACK's sparse layout "
                "but its weights are stored dense (export with sparse=True)"
            )
        elif total:
            notes.append(
                f"a sparse-eligible subgraph ending at op #{i} (MEAN) has only "
                f"{zeros / total:.1%} zeros in its 1x1 convolutions (needs >= 2/3)"
            )
    return chosen, notes
