"""Sufficient statistics of one batch, per wrapped layer (traced inside the statistics step).

`layer_stats` turns what a `PruneWrapper` recorded during one forward pass (input,
pre-activation, output of every call) and the gradients of the log-likelihood with respect
to the pre-activations into per-batch sums: ``z2``, ``fisher``, ``x2``, ``gram``,
``fisher_x2`` with their row counts, and the per-sample ``t_mean`` / ``z_rows`` /
``t_rows`` when asked. Everything here is `keras.ops` on one batch; summing batches,
replicas and workers is `accumulate`'s job.

Conv layers use a fixed, stratified subset of output positions per sample. The subset of
a sample depends only on its global index in the held-out data (and on the data's size),
never on how the data is batched or sharded, so a sharded pass sees exactly the rows a
single-device pass sees.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

SAMPLE_KEYS = ("t_mean", "z_rows", "t_rows")


def layer_kind(layer):
    """`"dense"`, `"conv"` (channels_last Conv1D/2D, groups 1) or `"other"`."""
    L = keras.layers
    if isinstance(layer, L.Dense):
        return "dense"
    skip = (
        L.Conv1DTranspose,
        L.Conv2DTranspose,
        L.DepthwiseConv1D,
        L.DepthwiseConv2D,
        L.SeparableConv1D,
        L.SeparableConv2D,
    )
    if isinstance(layer, (L.Conv1D, L.Conv2D)) and not isinstance(layer, skip):
        if (
            getattr(layer, "data_format", "channels_last") == "channels_last"
            and getattr(layer, "groups", 1) == 1
            and layer.padding != "causal"
        ):
            return "conv"
    return "other"


# --------------------------------------------------------------- per-layer math
def _is_low_float(v):
    return keras.backend.standardize_dtype(v.dtype) in ("float16", "bfloat16")


def _sampled_inputs(x, layer, kind, idx, positions, out_hw):
    """Input rows `(b * k, d_in)` feeding the sampled output positions `idx` `(b, k)`.

    Dense: the input vectors. Conv: the receptive-field windows in the kernel's
    `(kh, kw, c_in)` layout (zero padding as the layer pads), gathered directly at the
    sampled positions (no full im2col).
    """
    b = ops.shape(x)[0]
    if idx is None:
        idx = ops.broadcast_to(ops.arange(positions, dtype="int32")[None], (b, positions))
    if kind == "dense":
        return _gather(ops.reshape(x, (b, positions, x.shape[-1])), idx)
    if layer.rank == 1:
        x = ops.expand_dims(x, 1)
        k, s, d = (1, layer.kernel_size[0]), (1, layer.strides[0]), (1, layer.dilation_rate[0])
    else:
        k, s, d = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
    size_in, c = tuple(x.shape[1:3]), x.shape[3]
    pads = []
    for n_in, kk, ss, dd, n_out in zip(size_in, k, s, d, out_hw):
        total = max((n_out - 1) * ss + (kk - 1) * dd + 1 - n_in, 0)
        total = total if layer.padding == "same" else 0
        pads.append((total // 2, total - total // 2))
    x = ops.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    hp, wp = x.shape[1], x.shape[2]
    oh, ow = idx // out_hw[1], idx % out_hw[1]  # (b, k)
    du = np.repeat(np.arange(k[0]) * d[0], k[1])  # window offsets, (kh*kw,), row-major
    dv = np.tile(np.arange(k[1]) * d[1], k[0])
    rows = oh[..., None] * s[0] + ops.convert_to_tensor(du, "int32")
    cols = ow[..., None] * s[1] + ops.convert_to_tensor(dv, "int32")
    flat = ops.reshape(rows * wp + cols, (b, -1))  # (b, k * kh * kw)
    win = ops.take_along_axis(ops.reshape(x, (b, hp * wp, c)), ops.expand_dims(flat, -1), axis=1)
    return ops.reshape(win, (-1, k[0] * k[1] * c))


def sample_positions(index, positions, k, period):
    """A fixed stratified subset of `k` of `positions` output positions per sample.

    Args:
        index: `(b,)` int32 global indices of the batch's samples.
        positions: output positions per sample.
        k: positions to keep per sample.
        period: the shift of a sample is a function of ``index % period`` (the pass uses
            its equal-batch size, so unsharded passes keep their historical subsets).

    Returns:
        `(b, k)` int32 positions, or None when `k >= positions` (all of them).
    """
    if k >= positions:
        return None
    j = ops.arange(k, dtype="int32") * (positions // k)
    shift = ((index % period) * 7919) % max(positions // k, 1)
    return (j[None, :] + shift[:, None]) % positions


def _gather(a, idx):
    """`a[b, idx[b, j]]` for `a` of shape `(b, P, d)` -> `(b * k, d)`."""
    if idx is None:
        return ops.reshape(a, (-1, ops.shape(a)[-1]))
    g = ops.take_along_axis(a, ops.expand_dims(idx, -1), axis=1)
    return ops.reshape(g, (-1, ops.shape(a)[-1]))


def layer_stats(wrapper, kind, recs, grads, needs, rows_per_sample, max_gram_dim, index, period):
    """Sums over this batch for one wrapper (every call of a reused layer counts).

    `index` `(b,)` holds the samples' global indices (see `sample_positions`); the
    per-sample keys (`SAMPLE_KEYS`) come from the first call only and only when in `needs`.
    """
    out = {}
    first = True
    for (x, z, t), g in zip(recs, grads):
        # Mixed precision: activations arrive in float16/bfloat16; sums of squares and Gram
        # matrices must be accumulated in float32 (a float16 Gram is not even PSD).
        x, z, t, g = (v if v is None or not _is_low_float(v) else ops.cast(v, "float32")
                      for v in (x, z, t, g))
        b = ops.shape(z)[0]
        units = z.shape[-1]
        positions = int(np.prod(z.shape[1:-1]))  # static: the model's spatial shape
        z3 = ops.reshape(z, (b, positions, units))
        t3 = ops.reshape(t, (b, positions, units))
        idx = sample_positions(index, positions, rows_per_sample, period)
        part = {
            "z2": ops.sum(ops.square(z3), axis=(0, 1)),
            "rows_all": ops.cast(b * positions, "float32"),
        }
        if first and "t_mean" in needs:
            part["t_mean"] = ops.mean(t3, axis=1)
        if first and "rows" in needs:
            part["z_rows"], part["t_rows"] = _gather(z3, idx), _gather(t3, idx)
        g3 = None
        if g is not None:
            g3 = ops.reshape(g, (b, positions, units))
            part["fisher"] = ops.sum(ops.square(g3), axis=(0, 1))
        if kind != "other" and x is not None and needs & {"x2", "gram", "fisher_x2"}:
            out_hw = tuple(z.shape[1:3]) if kind == "conv" and len(z.shape) == 4 else (1, positions)
            xs = _sampled_inputs(x, wrapper.layer, kind, idx, positions, out_hw)
            part["x2"] = ops.sum(ops.square(xs), axis=0)
            part["rows_sampled"] = ops.cast(ops.shape(xs)[0], "float32")
            if "gram" in needs and xs.shape[-1] <= max_gram_dim:
                part["gram"] = ops.matmul(ops.transpose(xs), xs)
            if "fisher_x2" in needs and g3 is not None:
                part["rows_fisher"] = part["rows_sampled"]
                gs = _gather(g3, idx)
                part["fisher_x2"] = ops.matmul(ops.transpose(ops.square(xs)), ops.square(gs))
        for k, v in part.items():
            out[k] = v if k not in out or k in SAMPLE_KEYS else out[k] + v
        out.setdefault("positions", ops.convert_to_tensor(positions, "int32"))
        first = False
    return out
