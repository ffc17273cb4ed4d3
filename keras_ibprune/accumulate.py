"""Sufficient statistics summed over batches (and noise by global sample index).

The statistics pass streams the held-out data through one traced step per batch (see
`stats.StatisticsPass`). This module owns what happens around that step:

- `SampleNoise`: the uniforms (or Gaussians) that draw the labels ``ŷ ~ p(·|x)`` of the
  Fisher statistics, as a function of each sample's *global* index and the seed, so they
  do not depend on batching or sharding;
- `Totals`: float64 sums on the host of the per-batch sums (counts, ``Σ z²``, Gram
  matrices, Fisher sums, input energies): memory is the size of the statistics, not of
  the data. The per-sample keys (``t_mean``, ``z_rows``, ``t_rows``, read by the
  information logs, channel scores and ``gaussian_obd``) are kept for the first
  `sample_cap` samples by global index only; `finish` normalises everything;

Splitting the pass over replicas, workers and JAX processes (and adding their totals) is
`shards`' job.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_ibprune.batch_stats import SAMPLE_KEYS

_SKIP_CHUNK = 1 << 16  # Gaussian draws discarded per call when seeking forward


class SampleNoise:
    """Per-sample randomness of the label sampling, by global sample index.

    Sample ``i`` gets the ``i``-th value of the stream ``np.random.default_rng(seed)``:
    `random()` for class / Bernoulli outputs (reached in O(1) by advancing the PCG64
    generator), `normal(size=width)` for Gaussian outputs (reached by drawing forward; the
    generator is kept, so a sequential pass draws each value once).

    Args:
        seed: the seed.
        gaussian: True for Gaussian outputs (then `width` values per sample).
        width: output width (Gaussian only).
    """

    def __init__(self, seed, gaussian=False, width=1):
        self.seed, self.gaussian, self.width = int(seed), bool(gaussian), int(width)
        self._rng, self._pos = None, 0

    def __call__(self, start, stop):
        """float32 noise of the samples ``start .. stop - 1``: `(m,)` or `(m, width)`."""
        if not self.gaussian:
            rng = np.random.default_rng(self.seed)
            rng.bit_generator.advance(int(start))  # one 64-bit draw per double
            return rng.random(stop - start).astype("float32")
        if self._rng is None or start < self._pos:
            self._rng, self._pos = np.random.default_rng(self.seed), 0
        while self._pos < start:
            k = min(start - self._pos, _SKIP_CHUNK)
            self._rng.normal(size=(k, self.width))
            self._pos += k
        self._pos = stop
        return self._rng.normal(size=(stop - start, self.width)).astype("float32")

    def at(self, index):
        """The noise of the samples `index` (sorted global indices), as `__call__`."""
        index = np.asarray(index, np.int64)
        if len(index) == 0:
            return np.zeros((0, self.width) if self.gaussian else (0,), "float32")
        lo = int(index[0])
        if np.array_equal(index, np.arange(lo, lo + len(index))):
            return self(lo, lo + len(index))
        return self(lo, int(index[-1]) + 1)[index - lo]  # strided shard: draw the span


def _numpy(v):
    return np.asarray(ops.convert_to_numpy(v))


class Totals:
    """Float64 sums of per-batch statistics on the host, one dict per wrapper.

    Args:
        count: number of wrappers.
        sample_cap: per-sample keys are kept for global samples ``< sample_cap`` only
            (None: all).
    """

    def __init__(self, count, sample_cap=None):
        self.sums = [{} for _ in range(count)]
        self.rows = [{} for _ in range(count)]
        self.sample_cap = sample_cap
        self.samples = 0  # per-sample rows kept (samples, in global order)

    def wants_rows(self, start):
        """Whether a batch starting at global sample `start` still contributes rows."""
        return self.sample_cap is None or start < self.sample_cap

    def add(self, parts, start, size):
        """Adds one batch (or one all-reduced step) of `size` samples from `start`."""
        keep = size if self.sample_cap is None else max(0, min(size, self.sample_cap - start))
        for tot, rows, part in zip(self.sums, self.rows, parts):
            for k, v in part.items():
                v = _numpy(v)
                if k == "positions":
                    tot[k] = int(v)
                elif k in SAMPLE_KEYS:
                    if keep:
                        per = len(v) // max(size, 1)
                        rows.setdefault(k, []).append(v[: keep * per].astype(np.float64))
                else:
                    tot[k] = tot.get(k, 0.0) + v.astype(np.float64)
        if parts and any(k in p for p in parts for k in SAMPLE_KEYS):
            self.samples += keep

    def finish(self, wrappers, kinds, n_fisher):
        """Normalised statistics per wrapper (the dicts `Score`s read as `summary`)."""
        return [
            _finish(w, kind, tot, rows, n_fisher, self.samples)
            for w, kind, tot, rows in zip(wrappers, kinds, self.sums, self.rows)
        ]


def _finish(w, kind, tot, rows, n_fisher, samples):
    s = {"kind": kind}
    if not tot:
        return s
    positions = tot.get("positions", 1)
    s["positions"] = positions
    s["z2"] = tot["z2"] / tot["rows_all"]
    if not np.all(np.isfinite(s["z2"])):  # a NaN/inf anywhere reaches the sum
        raise ValueError(
            f"Layer '{w.layer.name}' produced NaN or inf pre-activations on the held-out "
            "data (the model may have diverged; lower the learning rate). Received: "
            f"E[z²] = {s['z2'][~np.isfinite(s['z2'])][:3].tolist()}..."
        )
    for k, parts in rows.items():
        s[k] = np.concatenate(parts)
    if rows:
        s["samples"] = samples
    if "fisher" in tot:
        s["fisher"] = tot["fisher"] / max(n_fisher, 1)
    if "x2" in tot:
        kshape = tuple(w.prunable_weights[0].shape)
        m = float(tot["rows_sampled"])
        s["x2"] = (tot["x2"] / m).reshape(kshape[:-1])
        if "gram" in tot:
            s["gram"] = tot["gram"] / m
        if "fisher_x2" in tot:
            s["fisher_x2"] = tot["fisher_x2"] / float(tot["rows_fisher"]) * positions
    return s
