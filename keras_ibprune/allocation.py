"""Allocation: how a model-wide sparsity target is split across prunable tensors.

Each function takes the per-tensor scores (a list of arrays) and a model-wide target
sparsity and returns one sparsity per tensor, such that the number of zeros summed over
tensors is the target (up to rounding and the per-tensor density floor `min_density`).

- ``"uniform"``: every tensor at the target (tfmot's behaviour).
- ``"global"``: one score threshold across all tensors (needs comparable scores).
- ``"erk"``: Erdős–Rényi-Kernel densities (Evci et al., 2020), `d_l ∝ Σ shape / Π shape`,
  so small layers stay denser.
- ``"global_erk_floor"``: a global threshold with a per-tensor floor of half the ERK
  density (the 0.1 default for the legacy ``"gaussian_obd"`` score).

``"ib"`` is an alias of ``"global"``: for scores in nats (`IBScore`) one threshold is the
water-filling of the information lost.

A callable `f(scores, sparsity, min_density=...) -> list[float]` is accepted too.
"""

from __future__ import annotations

import numpy as np

_ALLOCATORS = {}


def register_allocation(name, fn):
    """Registers an allocation function under `name` (used by `get`)."""
    _ALLOCATORS[name] = fn


def _sizes(scores):
    return np.array([int(np.prod(np.shape(s))) for s in scores], dtype=np.float64)


def _check(sparsity, min_density):
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1). Received: sparsity={sparsity!r}")
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(
            f"`min_density` must be in [0, 1]. Received: min_density={min_density!r}"
        )


def uniform(scores, sparsity, min_density=0.0):
    """Every tensor gets `min(sparsity, 1 - min_density)`."""
    _check(sparsity, min_density)
    return [min(sparsity, 1.0 - min_density)] * len(scores)


def erk(scores, sparsity, min_density=0.0, shapes=None):
    """Erdős–Rényi-Kernel: density of tensor `l` is `eps * (Σ_i n_i) / (Π_i n_i)`.

    `eps` is solved so that the total number of kept weights is `(1 - sparsity) * N`;
    tensors whose density would exceed 1 are kept dense and the rest re-solved.
    1-D tensors (biases, embeddings rows) use their size as both sum and product.
    """
    _check(sparsity, min_density)
    shapes = shapes or [np.shape(s) for s in scores]
    n = np.array([float(np.prod(s)) for s in shapes])
    raw = np.array([float(np.sum(s)) / float(np.prod(s)) if len(s) > 1 else 1.0 for s in shapes])
    budget = (1.0 - sparsity) * n.sum()
    dense = np.zeros(len(n), dtype=bool)
    floor = np.full(len(n), min_density)
    for _ in range(len(n) + 1):
        free = ~dense
        remaining = budget - n[dense].sum()
        if remaining <= 0 or not free.any():
            break
        eps = remaining / np.sum(raw[free] * n[free])
        dens = np.where(dense, 1.0, eps * raw)
        over = free & (dens > 1.0)
        if not over.any():
            break
        dense |= over
    dens = np.clip(np.where(dense, 1.0, eps * raw), floor, 1.0)
    return [float(1.0 - d) for d in dens]


def global_threshold(scores, sparsity, min_density=0.0):
    """One threshold across tensors: the `sparsity` fraction of lowest scores overall.

    Tensors hitting the density floor are frozen there and the threshold re-solved on
    the rest, so the total target is met whenever the floors allow it.
    """
    _check(sparsity, min_density)
    return thresholds_with_floors(scores, sparsity, [min_density] * len(scores))


def thresholds_with_floors(scores, sparsity, floors):
    """Global threshold (water-filling) with a per-tensor density floor `floors[l]`.

    Finds the largest set of lowest scores to remove, `round(sparsity · N)` in total,
    such that tensor `l` keeps at least `floors[l]` of its entries; tensors that hit their
    floor are frozen there and the threshold is re-solved on the others.
    """
    sizes = _sizes(scores)
    floors = np.clip(np.asarray(floors, dtype=np.float64), 0.0, 1.0)
    cap = np.floor((1.0 - floors) * sizes)
    total = int(round(sparsity * sizes.sum()))
    flat = [np.where(np.isfinite(np.ravel(s)), np.ravel(s), -np.inf) for s in scores]
    # Entries already pruned (-inf) must stay counted even above the floor.
    cap = np.maximum(cap, [np.sum(~np.isfinite(f)) for f in flat])
    frozen = np.zeros(len(scores), dtype=bool)
    counts = np.zeros(len(scores))
    for _ in range(len(scores) + 1):
        budget = total - counts[frozen].sum()
        live = [i for i in range(len(scores)) if not frozen[i]]
        if not live or budget <= 0:
            counts[~frozen] = 0
            break
        allv = np.concatenate([flat[i] for i in live])
        k = int(min(budget, allv.size))
        kth = np.partition(allv, k - 1)[k - 1] if k > 0 else -np.inf
        below = [np.sum(flat[i] < kth) for i in live]
        ties = [np.sum(flat[i] == kth) for i in live]
        extra = k - sum(below)
        for j, i in enumerate(live):  # ties: earlier tensors first (deterministic)
            take = min(ties[j], max(extra, 0))
            counts[i] = below[j] + take
            extra -= take
        over = [i for i in live if counts[i] > cap[i]]
        if not over:
            break
        for i in over:
            counts[i] = cap[i]
            frozen[i] = True
    return [float(c / s) if s else 0.0 for c, s in zip(counts, sizes)]


def global_erk_floor(scores, sparsity, min_density=0.0, erk_floor=0.5):
    """Global threshold with a per-tensor floor of `erk_floor` times the ERK density.

    Each tensor keeps at least ``max(min_density, erk_floor · d_erk)``, where ``d_erk`` is
    its ERK density at this sparsity. The hand-set floor was the 0.1 default's way to keep
    a per-layer-biased score from emptying layers; kept for the ``"gaussian_obd"`` score.

    Args:
        scores: per-tensor score arrays (-inf = already pruned).
        sparsity: model-wide target.
        min_density: absolute per-tensor floor.
        erk_floor: fraction of the ERK density used as a floor (0 disables).
    """
    _check(sparsity, min_density)
    dens_erk = 1.0 - np.asarray(erk(scores, sparsity))
    floors = np.maximum(min_density, float(erk_floor) * dens_erk)
    return thresholds_with_floors(scores, sparsity, floors)


def starved(shapes, sparsities, target, ratio=0.25):
    """Indices of tensors the allocation starved: fewer kept weights than output units, at
    a density under `ratio` times the model's (`1 - target`).

    Fewer than one kept input per unit on average is the signature of layer collapse, the
    failure of one global threshold on deep networks (Tanaka et al., 2020, *Pruning neural
    networks without any data by iteratively conserving synaptic flow*): a layer that every
    path to the output crosses is then close to disconnected. The density condition leaves
    out layers with a small fan-in that any allocation near `target` thins that far (a
    uniform one included). Units are a kernel's last axis (its channels for a depthwise
    kernel, whose last axis is the multiplier 1).
    """
    out = []
    for i, (shape, s) in enumerate(zip(shapes, sparsities)):
        if len(shape) < 2:
            continue
        units = shape[-1] if shape[-1] > 1 else shape[-2]
        density = 1.0 - s
        if density * int(np.prod(shape)) < units and density < ratio * (1.0 - target):
            out.append(i)
    return out


register_allocation("uniform", uniform)
register_allocation("erk", erk)
register_allocation("global", global_threshold)
register_allocation("global_erk_floor", global_erk_floor)
register_allocation("ib", global_threshold)

ALLOCATIONS = tuple(_ALLOCATORS)  # the registered names, for messages and the CLI


def get(identifier):
    """Returns an allocation function from a name or a callable."""
    if callable(identifier):
        return identifier
    if isinstance(identifier, str) and identifier in _ALLOCATORS:
        return _ALLOCATORS[identifier]
    raise ValueError(
        f"Unknown allocation. Expected one of {sorted(_ALLOCATORS)} or a callable "
        f"`f(scores, sparsity, min_density=...)`. Received: allocation={identifier!r}"
    )
