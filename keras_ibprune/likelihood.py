"""The likelihood the Fisher statistics differentiate: how outputs define ``p(y|x)``.

`likelihood_kind` reads it off the model's outputs and the label type (softmax
probabilities, logits, a sigmoid unit, or a Gaussian for continuous targets);
`log_likelihood` is ``Σ log p(ŷ|x)`` with ``ŷ`` drawn from the model itself (the Fisher
information) or the given labels (the empirical Fisher), written with `keras.ops`.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def output_of(outputs, output):
    """The output `output` (index or key; None = the first) of a model's outputs."""
    if isinstance(outputs, dict):
        if output is None:
            return next(iter(outputs.values()))
        if output not in outputs:
            raise ValueError(f"`output` names none of the model's outputs {list(outputs)}. "
                             f"Received: output={output!r}")
        return outputs[output]
    if isinstance(outputs, (list, tuple)):
        if isinstance(output, str):
            raise ValueError(
                "This model returns a list of outputs: pass `output=` as an index, or "
                f"resolve the name with `resolve_output(model, output)`. Received: "
                f"output={output!r}")
        index = int(output or 0)
        if not -len(outputs) <= index < len(outputs):
            raise ValueError(f"`output` must index one of the model's {len(outputs)} outputs. "
                             f"Received: output={output!r}")
        return outputs[index]
    return outputs


def resolve_output(model, output):
    """`output` (index, name or None) as the key `output_of` takes for `model`'s outputs.

    A model built on a list of outputs gets an index (a name becomes its position in
    `model.output_names`); one built on a dict keeps the key. Unknown names and indices
    out of range raise a ValueError naming the outputs.
    """
    if output is None:
        return None
    try:
        struct = model.output
    except (AttributeError, ValueError):  # subclassed / not built: resolved on use
        return output
    names = list(getattr(model, "output_names", None) or [])
    if isinstance(struct, dict):
        if isinstance(output, int) and not isinstance(output, bool) and 0 <= output < len(
                struct):
            return list(struct)[output]
        if output not in struct:
            raise ValueError(f"`output` names none of the model's outputs {list(struct)}. "
                             f"Received: output={output!r}")
        return output
    count = len(struct) if isinstance(struct, (list, tuple)) else 1
    if isinstance(output, str) and output not in names:  # a pruned model: the wrapped name
        inner = [_inner_name(t) for t in (
            struct if isinstance(struct, (list, tuple)) else [struct])]
        if output in inner:
            return inner.index(output)
    if isinstance(output, str):
        if output not in names:
            raise ValueError(f"`output` names none of the model's outputs {names}. "
                             f"Received: output={output!r}")
        return names.index(output)
    if isinstance(output, bool) or not isinstance(output, (int, np.integer)) or not (
            -count <= int(output) < count):
        raise ValueError(f"`output` must be an output name {names} or an index below {count}. "
                         f"Received: output={output!r}")
    return int(output)


def _inner_name(tensor):
    """Name of the layer producing a symbolic output (the wrapped layer's for a wrapper)."""
    from keras_ibprune import _keras_compat

    layer = _keras_compat.producing_layer(tensor)
    return getattr(getattr(layer, "layer", layer), "name", None)


def likelihood_kind(out_sample, label_kind):
    """How model outputs define ``p(y|x)``: `"probs"`, `"logits"`, `"binary_probs"`,
    `"binary_logits"` (classes) or `"gaussian"` (continuous targets)."""
    o = np.asarray(out_sample, np.float64).reshape(len(out_sample), -1)
    if label_kind != "classes":
        return "gaussian"
    in_unit = bool(np.all(o >= 0) and np.all(o <= 1))
    if o.shape[1] == 1:
        return "binary_probs" if in_unit else "binary_logits"
    if in_unit and np.allclose(o.sum(axis=1), 1.0, atol=1e-3):
        return "probs"
    return "logits"


def log_likelihood(out, kind, u, target):
    """Σ log p(ŷ|x) with ŷ drawn from the model by inverse CDF of the uniforms `u`
    (`target` given: the true labels / targets instead, i.e. the empirical Fisher)."""
    out = ops.cast(ops.reshape(out, (ops.shape(out)[0], -1)), "float32")
    if kind == "gaussian":
        y = out + ops.cast(u, "float32") if target is None else ops.cast(target, "float32")
        return -0.5 * ops.sum(ops.square(ops.stop_gradient(y) - out))
    if kind in ("binary_probs", "binary_logits"):
        q = out[:, 0] if kind == "binary_probs" else ops.sigmoid(out[:, 0])
        q = ops.clip(q, 1e-7, 1.0 - 1e-7)
        y = ops.cast(u < ops.stop_gradient(q), "float32") if target is None else ops.cast(
            ops.reshape(target, (-1,)), "float32")
        return ops.sum(y * ops.log(q) + (1.0 - y) * ops.log(1.0 - q))
    logp = (ops.log(ops.clip(out, 1e-12, 1.0)) if kind == "probs"
            else ops.log_softmax(out, axis=-1))
    if target is None:
        cdf = ops.cumsum(ops.exp(ops.stop_gradient(logp)), axis=-1)
        y = ops.sum(ops.cast(cdf < ops.cast(u, "float32")[:, None], "int32"), axis=-1)
        y = ops.minimum(y, ops.shape(logp)[-1] - 1)
    else:
        y = ops.cast(ops.reshape(target, (-1,)), "int32")
    return ops.sum(ops.take_along_axis(logp, ops.expand_dims(y, -1), axis=-1))
