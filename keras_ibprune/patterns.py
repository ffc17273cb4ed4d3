"""Structured layouts of weight masks: blocks and N:M patterns, checked.

A `block_size` `(rows, cols)` keeps or removes weights in blocks of the kernel viewed as
the `(inputs, units)` matrix; an N:M `pattern` keeps at least N of every M consecutive
inputs of a unit. `PruneWrapper` and `prune` validate their arguments here; `masks`
computes the masks.
"""

from __future__ import annotations

import keras


def check_block_size(block_size):
    """`(rows, cols)` of positive ints -> a tuple; None and `(1, 1)` (no blocks) -> None."""
    if block_size is None:
        return None
    try:
        bs = tuple(int(b) for b in block_size)
    except TypeError:
        bs = ()
    if len(bs) != 2 or min(bs) < 1:
        raise ValueError(
            "`block_size` must be None or a pair of positive ints such as (4, 1). "
            f"Received: block_size={block_size!r}"
        )
    return None if bs == (1, 1) else bs


def check_pattern(pattern):
    """`"N:M"` or `(N, M)` -> `(N, M)` with `1 <= N < M`; None stays None."""
    if pattern is None:
        return None
    try:
        if isinstance(pattern, str):
            n, m = (int(v) for v in pattern.split(":"))
        else:
            n, m = (int(v) for v in pattern)
    except (TypeError, ValueError):
        n, m = 0, 0
    if not 1 <= n < m:
        raise ValueError(
            "`pattern` must be None or N:M sparsity with 1 <= N < M, as a string like '2:4' "
            f"or a pair like (2, 4). Received: pattern={pattern!r}"
        )
    return (n, m)


def supports_pattern(layer):
    """Whether N:M `pattern` masks apply to `layer`: Dense and Conv1D/2D/3D with
    `groups=1`, whose kernel is `(..., inputs, units)` with the inputs last but one."""
    L = keras.layers
    return (
        isinstance(layer, (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D))
        and not isinstance(
            layer,
            (
                L.Conv1DTranspose,
                L.Conv2DTranspose,
                L.Conv3DTranspose,
                L.DepthwiseConv1D,
                L.DepthwiseConv2D,
                L.SeparableConv1D,
                L.SeparableConv2D,
            ),
        )
        and getattr(layer, "groups", 1) == 1
    )


def check_layout(layer, granularity, block_size, pattern):
    """Validated `(block_size, pattern)` of a `PruneWrapper` around `layer`.

    Args:
        layer: the wrapped layer.
        granularity: the wrapper's granularity (`"weight"` or `"channel"`).
        block_size: `block_size` as passed (see `check_block_size`).
        pattern: `pattern` as passed (see `check_pattern`).

    Returns:
        `(block_size, pattern)`: a tuple or None each.

    Raises:
        ValueError: a bad value, blocks or a pattern with `granularity="channel"`, a
            pattern with blocks, or a pattern on a layer `supports_pattern` rejects.
    """
    blocks = check_block_size(block_size)
    if blocks is not None and granularity != "weight":
        raise ValueError(
            "`block_size` applies to granularity='weight' only. Received: "
            f"granularity={granularity!r}, block_size={block_size!r}"
        )
    n_m = check_pattern(pattern)
    if n_m is not None and not supports_pattern(layer):
        raise ValueError(
            "`pattern` (N:M sparsity along the inputs) applies to Dense and Conv1D/2D/3D "
            "layers (groups=1), whose kernel is `(..., inputs, units)`; other kernels "
            "(EinsumDense, MultiHeadAttention, depthwise, transposed) lay their input axis "
            f"out differently. Received: layer={layer.name!r} of type "
            f"{type(layer).__name__}, pattern={pattern!r}"
        )
    if n_m is not None and (granularity != "weight" or blocks):
        raise ValueError(
            "`pattern` (N:M sparsity) applies to granularity='weight' without "
            f"`block_size`. Received: granularity={granularity!r}, block_size="
            f"{block_size!r}, pattern={pattern!r}"
        )
    return blocks, n_m
