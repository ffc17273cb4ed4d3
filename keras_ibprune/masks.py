"""Masks from scores: exact top-k selection, blocks, monotonicity, and applying them.

Everything here is deterministic: ties are broken by position (stable sort), NaN or
infinite scores rank lowest, and a mask only ever holds 0.0 or 1.0.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_ibprune import _keras_compat


def _clean(scores):
    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(s), s, -np.inf)


def _as_matrix(x):
    x = np.asarray(x)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def _pool_blocks(scores2d, block):
    """Mean score per (br, bc) block; the matrix is padded with -inf-free edge blocks."""
    br, bc = block
    r, c = scores2d.shape
    nr, nc = -(-r // br), -(-c // bc)
    pad = np.zeros((nr * br, nc * bc))
    cnt = np.zeros_like(pad)
    finite = np.where(np.isfinite(scores2d), scores2d, 0.0)
    pad[:r, :c] = finite
    cnt[:r, :c] = 1.0
    sums = pad.reshape(nr, br, nc, bc).sum(axis=(1, 3))
    n = cnt.reshape(nr, br, nc, bc).sum(axis=(1, 3))
    pooled = sums / np.maximum(n, 1.0)
    # A block with any already-pruned (-inf) entry ranks lowest.
    bad = ~np.isfinite(scores2d)
    if bad.any():
        badpad = np.zeros_like(pad, dtype=bool)
        badpad[:r, :c] = bad
        pooled = np.where(badpad.reshape(nr, br, nc, bc).any(axis=(1, 3)), -np.inf, pooled)
    return pooled


def topk_mask(scores, sparsity, prev_mask=None, monotone=True, block_size=None, keep=None,
              pattern=None):
    """Returns a 0/1 float32 mask keeping the highest scores.

    `round(sparsity * n)` entries (or blocks) are zero, where `n` counts entries (blocks
    when `block_size` is given), with two exceptions that make the mask keep *more*:
    the entries flagged in `keep` are never removed, and at least one entry (block) always
    survives, so no tensor is silently emptied. With `monotone=True` entries zero in
    `prev_mask` stay zero (and count towards the target).

    Args:
        scores: array of scores, higher = more important.
        sparsity: target fraction of zeros, in [0, 1].
        prev_mask: optional previous mask of the same shape.
        monotone: keep previously pruned entries pruned.
        block_size: optional `(rows, cols)`; scores are averaged per block of the
            weight viewed as a `(prod(shape[:-1]), shape[-1])` matrix.
        keep: optional boolean array of the shape of `scores`: entries that must survive
            (e.g. one weight per output unit); a block holding one survives whole.
        pattern: optional `(N, M)`: N:M sparsity along the inputs (rows of the matrix
            view): at most `M − N` entries of each group of M consecutive rows of a column
            are removed (the lowest scores of the group), so the sparsity is capped at
            `1 − N/M`, where every group keeps exactly its N best entries.

    Returns:
        A numpy float32 array of the shape of `scores`.
    """
    scores = _clean(scores)
    shape = scores.shape
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1]. Received: sparsity={sparsity!r}")
    if prev_mask is not None and monotone:
        scores = np.where(np.asarray(prev_mask).reshape(shape) > 0, scores, -np.inf)
    forced = None if keep is None else np.asarray(keep, dtype=bool).reshape(shape)
    if block_size is not None:
        mat = _as_matrix(scores)
        pooled = _pool_blocks(mat, block_size)
        if forced is not None:
            pooled_forced = _pool_blocks(_as_matrix(forced.astype(np.float64)), block_size) > 0
            pooled = np.where(pooled_forced, np.inf, pooled)
        keep_blocks = _topk_flat(pooled.ravel(), sparsity, monotone and prev_mask is not None)
        keep_blocks = keep_blocks.reshape(pooled.shape)
        br, bc = block_size
        full = np.repeat(np.repeat(keep_blocks, br, axis=0), bc, axis=1)
        return full[: mat.shape[0], : mat.shape[1]].reshape(shape).astype(np.float32)
    if forced is not None:
        scores = np.where(forced, np.inf, scores)
    if pattern is not None:  # entries outside their group's lowest M - N cannot go
        prunable = _pattern_prunable(_as_matrix(scores), *pattern).reshape(shape)
        scores = np.where(prunable | (scores == -np.inf), scores, np.inf)  # pruned stay
    kept = _topk_flat(scores.ravel(), sparsity, monotone and prev_mask is not None)
    return kept.reshape(shape).astype(np.float32)


def _pattern_prunable(mat, n, m):
    """Boolean `(rows, cols)`: the entries among the `size − N` lowest of their group of
    `M` consecutive rows (the last group may be shorter: it keeps `min(size, N)`)."""
    r, c = mat.shape
    g = -(-r // m)
    pad = np.full((g * m, c), np.inf)
    pad[:r] = mat
    grp = pad.reshape(g, m, c)
    order = np.argsort(grp, axis=1, kind="stable")  # ties by position
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(m)[None, :, None], order.shape),
                      axis=1)
    sizes = np.full(g, m)
    sizes[-1] = r - (g - 1) * m
    prunable = ranks < np.maximum(sizes - n, 0)[:, None, None]
    return prunable.reshape(g * m, c)[:r]


def _topk_flat(flat, sparsity, respect_pruned):
    """Zeroes the lowest scores; `+inf` entries (forced keeps) and one entry always stay."""
    n = flat.size
    k_prune = int(round(float(sparsity) * n))
    if respect_pruned:
        k_prune = max(k_prune, int(np.sum(flat == -np.inf)))
    k_prune = min(k_prune, n - max(1, int(np.sum(flat == np.inf))))
    if k_prune <= 0:
        return np.ones(n, dtype=np.float32)
    keep = np.ones(n, dtype=np.float32)
    # O(n) selection, same result as a stable sort: everything below the k-th smallest
    # score, then ties at that score by position (-inf, i.e. already pruned, first).
    kth = np.partition(flat, k_prune - 1)[k_prune - 1]
    below = flat < kth
    ties = np.flatnonzero(flat == kth)[: k_prune - int(below.sum())]
    keep[below] = 0.0
    keep[ties] = 0.0
    return keep


def apply_masks(wrapper, masks, weights=None, zero_weights=True, optimizer=None):
    """Assigns `masks` (numpy arrays) to `wrapper.masks` and zeroes the pruned weights.

    Args:
        wrapper: a built `PruneWrapper`.
        masks: one 0/1 array per prunable weight.
        weights: optional new values of the prunable weights (e.g. re-fitted survivors).
        zero_weights: multiply the stored weights by the masks, so checkpoints and saved
            files are sparse; with an all-ones mask nothing changes.
        optimizer: the model's optimizer: its per-weight state (momentum, velocity, ...) of
            pruned weights is zeroed too (see `rezero`).
    """
    if len(masks) != len(wrapper.masks):
        raise ValueError(
            f"Expected {len(wrapper.masks)} masks for layer '{wrapper.name}'. "
            f"Received: {len(masks)} masks"
        )
    weights = weights or [None] * len(masks)
    for w, m_var, m, new in zip(wrapper.prunable_weights, wrapper.masks, masks, weights):
        m = np.asarray(m, dtype=np.float32).reshape(tuple(m_var.shape))
        if not np.all((m == 0.0) | (m == 1.0)):
            raise ValueError(f"Masks must hold only 0 and 1 (layer '{wrapper.name}').")
        m_var.assign(m)
        if new is not None:
            new = np.asarray(new).reshape(tuple(w.shape))
            if not np.all(np.isfinite(new)):
                raise ValueError(f"Non-finite weights for layer '{wrapper.name}'.")
            w.assign((new * m.astype(new.dtype)).astype(w.dtype))
        elif zero_weights:
            w.assign(ops.multiply(w.value, ops.cast(m_var.value, w.dtype)))  # on the device
    if zero_weights and optimizer is not None:
        _zero_slots(wrapper, optimizer)


def rezero(wrapper, optimizer=None):
    """Re-applies the current masks to the stored weights and the optimizer's state.

    The gradient of a pruned weight is exactly zero (the wrapper computes with `w * mask`),
    so once its momentum/velocity slots are zero too, no optimizer (SGD with momentum,
    Adam, AdamW, RMSprop, Adafactor, ...) moves it again: the stored weights stay sparse
    at every step, not only at mask updates.
    """
    for w, m in zip(wrapper.prunable_weights, wrapper.masks):
        w.assign(ops.multiply(w.value, ops.cast(m.value, w.dtype)))
    if optimizer is not None:
        _zero_slots(wrapper, optimizer)


def _zero_slots(wrapper, optimizer):
    for w, m in zip(wrapper.prunable_weights, wrapper.masks):
        for slot in _keras_compat.optimizer_slots(optimizer, w):
            slot.assign(ops.multiply(slot.value, ops.cast(m.value, slot.dtype)))


def mask_sparsity(masks) -> float:
    """Fraction of zeros over a list of masks."""
    total = sum(int(np.prod(np.shape(m))) for m in masks)
    if total == 0:
        return 0.0
    zeros = sum(int(np.sum(np.asarray(m) == 0)) for m in masks)
    return zeros / total
