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
    if isinstance(outputs, dict):
        return outputs[output] if output is not None else next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        return outputs[int(output or 0)]
    return outputs


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
