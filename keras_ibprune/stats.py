"""Statistics for scores: activations captured on the held-out batch in one pass.

(`heldout` turns user data into the validated arrays used here.)

- `collect` runs the model once over the held-out samples (eagerly, in batches) with every
  `PruneWrapper` in capture mode and builds one `LayerStats` per wrapper. Scores that set
  `needs_summaries` get compact per-layer summaries (`summarize`) instead of full
  activations, so memory stays bounded by held-out size × widest layer.

Conv layers: outputs are summarized per channel, with a fixed random subset of output
positions per sample used as extra samples (and their per-sample spatial mean); inputs as
the patches (`kh·kw·c_in` features) feeding those positions.
"""

from __future__ import annotations

import dataclasses

import keras
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
        extra: more statistics; `extra["summary"]` holds the `summarize` dict.
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


def _run_captured(model, x, wrappers, batch_size, on_batch):
    records = {id(w): [] for w in wrappers}
    try:
        for w in wrappers:
            w._capture = records[id(w)]
        n = len(x) if not isinstance(x, (list, tuple, dict)) else None
        starts = [0] if n is None else range(0, n, batch_size)
        for b, i in enumerate(starts):
            model(x if n is None else x[i : i + batch_size], training=False)
            for w in wrappers:
                rec = records[id(w)]
                on_batch(w, b, i, [tuple(_np(p) for p in r) for r in rec])
                del rec[:]
    finally:
        for w in wrappers:
            w._capture = None


def capture(model, x, wrappers, batch_size=256):
    """Runs `model` on `x` once and returns, per wrapper, `(inputs, preacts, outputs)`.

    Reused layers (called more than once per forward pass) contribute every call,
    concatenated along the sample axis.
    """
    parts = {id(w): [] for w in wrappers}
    _run_captured(model, x, wrappers, batch_size, lambda w, b, i, rec: parts[id(w)].extend(rec))
    out = []
    for w in wrappers:
        rec = parts[id(w)]
        if not rec:
            out.append((None, None, None))
            continue
        out.append(tuple(np.concatenate(col, axis=0) for col in zip(*rec)))
    return out


# ----------------------------------------------------------------- summaries
def _kind(layer):
    L = keras.layers
    if isinstance(layer, L.Dense):
        return "dense"
    plain = (L.Conv1D, L.Conv2D)
    skip = (L.Conv1DTranspose, L.Conv2DTranspose, L.DepthwiseConv1D, L.DepthwiseConv2D,
            L.SeparableConv1D, L.SeparableConv2D)
    if isinstance(layer, plain) and not isinstance(layer, skip):
        if getattr(layer, "data_format", "channels_last") == "channels_last" and getattr(
            layer, "groups", 1
        ) == 1:
            return "conv"
    return "other"


def _conv_patches(x, layer, out_hw, sample_idx, pos_idx):
    """Input patches `(m, kh*kw*c)` of a channels_last Conv1D/2D at given output positions."""
    if x.ndim == 3:  # Conv1D -> 2-D with height 1
        x = x[:, None]
    k = tuple(layer.kernel_size) if layer.rank == 2 else (1, layer.kernel_size[0])
    s = tuple(layer.strides) if layer.rank == 2 else (1, layer.strides[0])
    d = tuple(layer.dilation_rate) if layer.rank == 2 else (1, layer.dilation_rate[0])
    ho, wo = out_hw
    pads = []
    for size, kk, ss, dd, o in zip(x.shape[1:3], k, s, d, (ho, wo)):
        need = max((o - 1) * ss + (kk - 1) * dd + 1 - size, 0)
        if layer.padding == "valid":
            need = 0
        before = need if layer.padding == "causal" else need // 2
        pads.append((before, need - before))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh, ow = pos_idx // wo, pos_idx % wo
    rows = oh[:, None] * s[0] + np.arange(k[0])[None] * d[0]
    cols = ow[:, None] * s[1] + np.arange(k[1])[None] * d[1]
    p = xp[sample_idx[:, None, None], rows[:, :, None], cols[:, None, :], :]
    return p.reshape(len(sample_idx), -1)


class _Summary:
    """Accumulates one wrapper's compact statistics over batches."""

    def __init__(self, wrapper, index, n, max_rows, seed):
        self.w, self.index, self.n = wrapper, index, max(n, 1)
        self.kind = _kind(wrapper.layer)
        self.max_rows, self.seed = max_rows, seed
        self.z, self.t, self.tm, self.rows = [], [], [], []
        self.x2 = None
        self.positions = 1
        self.count = 0

    def add(self, b, start, rec):
        for call, (inp, pre, out) in enumerate(rec):
            self._add(b, start, call, inp, pre, out)

    def _add(self, b, start, call, inp, pre, out):
        bsz = pre.shape[0]
        d = pre.shape[-1]
        pos = int(np.prod(pre.shape[1:-1])) if pre.ndim > 2 else 1
        per = max(1, min(pos, -(-self.max_rows // self.n)))
        rng = np.random.default_rng([self.seed, self.index, b, call])
        sidx = np.repeat(np.arange(bsz), per)
        pidx = rng.integers(0, pos, size=bsz * per) if per < pos else np.tile(np.arange(pos), bsz)
        z = pre.reshape(bsz, pos, d)[sidx, pidx].astype(np.float32)
        t = out.reshape(bsz, pos, d)[sidx, pidx].astype(np.float32)
        tm = out.reshape(bsz, pos, d).mean(axis=1)
        # A NaN/inf anywhere in a map reaches its spatial mean: checking the mean is enough.
        for arr, what in ((z, "pre-activation"), (tm, "output")):
            if not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"Layer '{self.w.layer.name}' produced NaN or inf {what}s on the held-out "
                    "data (the model may have diverged; lower the learning rate). Received: "
                    f"{what}s of shape {pre.shape}"
                )
        self.z.append(z)
        self.t.append(t)
        self.tm.append(tm)
        self.rows.append(start + sidx)
        self.positions = pos
        if self.kind == "other" or inp is None:
            return
        if self.kind == "conv":
            x = _conv_patches(inp, self.w.layer, pre.shape[1:-1] if pre.ndim == 4
                              else (1, pre.shape[1]), sidx, pidx)
        else:
            x = inp.reshape(bsz, pos, -1)[sidx, pidx]
        sx2 = np.square(x, dtype=np.float64).sum(axis=0)
        self.x2 = sx2 if self.x2 is None else self.x2 + sx2
        self.count += len(x)

    def result(self, labels):
        if not self.z:
            return None
        rows = np.concatenate(self.rows)
        out = {
            "kind": self.kind,
            "positions": self.positions,
            "z": np.concatenate(self.z),
            "t": np.concatenate(self.t),
            "t_mean": np.concatenate(self.tm),
            "rows": rows,
            "labels": None if labels is None else labels[rows % len(labels)],
            "sample_labels": labels,
        }
        if self.x2 is not None:
            c = max(self.count, 1)
            kshape = tuple(self.w.prunable_weights[0].shape)
            out["x2"] = (self.x2 / c).reshape(kshape[:-1])
        return out


def summarize(model, x, y, wrappers, batch_size=256, max_rows=8192, seed=0):
    """One forward pass over `x`; returns a compact summary dict per wrapper.

    Keys: `kind` ("dense", "conv" or "other"); `z`/`t`: `(m, units)` pre-activations /
    outputs at up to `max_rows` rows (samples × sampled positions, a fixed random
    subset for a fixed `seed`); `t_mean`: `(n, units)` per-sample spatial mean output;
    `labels`: the label of each row; for Dense/Conv `x2 = E[x_i²]` over input features in
    the kernel's layout; `positions`: output positions per sample (1 for Dense).
    """
    n = len(x) if not isinstance(x, (list, tuple, dict)) else len(_first(x))
    acc = {id(w): _Summary(w, i, n, max_rows, seed) for i, w in enumerate(wrappers)}
    _run_captured(model, x, wrappers, batch_size, lambda w, b, i, rec: acc[id(w)].add(b, i, rec))
    return [acc[id(w)].result(y) for w in wrappers]


def _first(x):
    return next(iter(x.values())) if isinstance(x, dict) else x[0]


def collect(model, wrappers, held_out=None, activations=False, gradients=False, loss=None,
            summaries=False, max_rows=8192, seed=0):
    """Builds one `LayerStats` per wrapper.

    Args:
        model: the (wrapped) model.
        wrappers: the `PruneWrapper`s to describe.
        held_out: `(x, y)` numpy arrays or None.
        activations: capture full inputs/pre-activations/outputs on `held_out[0]`.
        gradients: compute loss gradients w.r.t. prunable weights on `held_out`.
        loss: a Keras loss (needed with `gradients=True`).
        summaries: put `summarize` dicts in `LayerStats.extra["summary"]` (one pass).
        max_rows: rows per layer kept by `summarize`.
        seed: seed of the position subsample.
    """
    x, y = (held_out if held_out is not None else (None, None))
    none = [(None,) * 3] * len(wrappers)
    acts = capture(model, x, wrappers) if activations and x is not None else none
    summ = (summarize(model, x, y, wrappers, max_rows=max_rows, seed=seed)
            if summaries and x is not None else [None] * len(wrappers))
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
                extra={"summary": summ[i]},
            )
        )
    return stats


def _gradients(model, x, y, wrappers, loss, batch_size=256):
    """Sum over batches of d loss / d w for each prunable weight (TensorFlow backend)."""
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "Gradient-based scores currently need the TensorFlow backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    import tensorflow as tf  # lazily: only for gradient scores on the TF backend

    if loss is None:
        raise ValueError(
            "Gradient-based scores need a compiled model (a loss). Received: loss=None"
        )
    if y is None:
        raise ValueError("Gradient-based scores need held-out labels. Received: y=None")
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


def blas_threads(n=1):
    """Context limiting BLAS threads (threadpoolctl, a scikit-learn dependency) to `n`.

    The IB statistics are many small factorizations; with TensorFlow's thread pool busy
    on the same cores, multi-threaded BLAS is several times slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
