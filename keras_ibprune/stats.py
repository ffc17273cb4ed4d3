"""Statistics for scores: weights, masks, and activations captured on a held-out batch.

`collect` runs the model once over the held-out samples (eagerly, in batches) with every
`PruneWrapper` in capture mode, recording each wrapped layer's input, pre-activation
output and output. Scores receive one `LayerStats` per wrapper.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from keras import ops


@dataclasses.dataclass
class LayerStats:
    """What a `Score` sees of one wrapped layer.

    Attributes:
        wrapper: the `PruneWrapper`.
        weights: numpy copies of the prunable weights (unmasked).
        masks: numpy copies of the current masks.
        inputs: held-out inputs of the layer, `(n, ...)`, or None.
        preacts: pre-activation outputs (after bias), or None.
        outputs: outputs (after activation and unit mask), or None.
        labels: held-out labels `(n,)` int or `(n, k)` float, or None.
        grads: gradients of the loss w.r.t. each prunable weight, or None.
        index: position of the wrapper in the model's wrapper list.
    """

    wrapper: object
    weights: list
    masks: list
    inputs: np.ndarray | None = None
    preacts: np.ndarray | None = None
    outputs: np.ndarray | None = None
    labels: np.ndarray | None = None
    grads: list | None = None
    index: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


def find_wrappers(model):
    """All `PruneWrapper`s in `model` (nested models and subclassed attributes included)."""
    from keras_ibprune.wrapper import PruneWrapper

    seen, out = set(), []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, PruneWrapper) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _np(x):
    return None if x is None else np.asarray(ops.convert_to_numpy(x))


def capture(model, x, wrappers, batch_size=256):
    """Runs `model` on `x` once and returns, per wrapper, `(inputs, preacts, outputs)`.

    Reused layers (called more than once per forward pass) contribute every call,
    concatenated along the sample axis.
    """
    records = {id(w): [] for w in wrappers}
    try:
        for w in wrappers:
            w._capture = records[id(w)]
        n = len(x) if not isinstance(x, (list, tuple, dict)) else None
        if n is None:
            model(x, training=False)
        else:
            for i in range(0, n, batch_size):
                model(x[i : i + batch_size], training=False)
    finally:
        for w in wrappers:
            w._capture = None
    out = []
    for w in wrappers:
        rec = records[id(w)]
        if not rec:
            out.append((None, None, None))
            continue
        parts = list(zip(*rec))
        out.append(tuple(np.concatenate([_np(p) for p in col], axis=0) for col in parts))
    return out


def collect(model, wrappers, held_out=None, activations=False, gradients=False, loss=None):
    """Builds one `LayerStats` per wrapper.

    Args:
        model: the (wrapped) model.
        wrappers: the `PruneWrapper`s to describe.
        held_out: `(x, y)` numpy arrays or None.
        activations: capture inputs/pre-activations/outputs on `held_out[0]`.
        gradients: compute loss gradients w.r.t. prunable weights on `held_out`.
        loss: a Keras loss (needed with `gradients=True`).
    """
    x, y = (held_out if held_out is not None else (None, None))
    acts = (
        capture(model, x, wrappers) if activations and x is not None else [(None,) * 3] * len(wrappers)
    )
    grads = _gradients(model, x, y, wrappers, loss) if gradients and x is not None else None
    stats = []
    for i, w in enumerate(wrappers):
        inputs, preacts, outputs = acts[i]
        stats.append(
            LayerStats(
                wrapper=w,
                weights=[_np(v.value) for v in w.prunable_weights],
                masks=[_np(m.value) for m in w.masks],
                inputs=inputs,
                preacts=preacts,
                outputs=outputs,
                labels=None if y is None else np.asarray(y),
                grads=None if grads is None else grads[i],
                index=i,
            )
        )
    return stats


def _gradients(model, x, y, wrappers, loss, batch_size=256):
    """Sum over batches of d loss / d w for each prunable weight (TensorFlow backend)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "Gradient-based scores currently need the TensorFlow backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    import tensorflow as tf  # lazily: only for gradient scores on the TF backend

    if loss is None:
        raise ValueError("Gradient-based scores need a compiled model (a loss). Received: loss=None")
    variables = [v for w in wrappers for v in w.prunable_weights]
    total = [np.zeros(tuple(v.shape), np.float64) for v in variables]
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with tf.GradientTape() as tape:
            pred = model(xb, training=False)
            value = loss(yb, pred)
        g = tape.gradient(value, variables)
        for j, gj in enumerate(g):
            if gj is not None:
                total[j] += np.asarray(gj) * (len(xb) / len(x))
    out, k = [], 0
    for w in wrappers:
        n = len(w.prunable_weights)
        out.append(total[k : k + n])
        k += n
    return out


def as_arrays(held_out, size=1024, model=None):
    """Returns `(x, y)` numpy arrays (at most `size` samples) from `held_out`.

    Accepts `(x, y)`, `(x, None)` or `x` arrays.
    """
    if isinstance(held_out, (tuple, list)) and len(held_out) == 2:
        x, y = held_out
    else:
        x, y = held_out, None
    x = np.asarray(x)
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(
                "Held-out x and y must have the same number of samples. Received: "
                f"len(x)={len(x)}, len(y)={len(y)}"
            )
        y = y[:size]
    return x[:size], y
