"""Statistics for scores: what the held-out batch says about every wrapped layer.

`StatisticsPass` is built once per `Pruner` and reused at every update. On the
TensorFlow backend each batch runs inside one `tf.function` (traced once): the forward
pass with every `PruneWrapper` recording `(input, pre-activation, output)`, the
log-likelihood of a label sampled from the model's own prediction, its gradient with
respect to every layer's pre-activation, and the per-layer sufficient statistics. Only
those statistics leave the function (``O(Σ d_in² + d_in·units)`` numbers per layer); they
are summed over batches in float64 on the host (`accumulate.Totals`), so the held-out
data can be streamed (`stream.HeldOutStream`) and only one batch is ever in memory.
Under a `tf.distribute` strategy each replica computes its slice and the sums are
all-reduced (`shards.replica_step`); over several JAX processes each process computes
its share of the batches and the totals are merged (`shards.merge_processes`). On JAX
the gradients
come from `jax.value_and_grad` with respect to zero probes added to every pre-activation
(eager); other backends run the forward statistics eagerly and skip the Fisher ones (a
warning says so).

Per Dense / Conv1D / Conv2D layer (inputs ``x`` are the im2col rows feeding one output
position, in the kernel's ``(kh, kw, c_in)`` layout; ``g = ∂ log p(ŷ|x) / ∂z`` with
``ŷ ~ p(·|x)``, the model's predictive distribution; ``P`` output positions):

- ``x2``: ``E[x_i²]`` (Wanda's input energy) and ``gram``: ``H = E[x xᵀ]``, over a fixed,
  stratified subset of at most `max_rows` rows (all of them for Dense layers when
  `max_rows` ≥ the number of samples); windows are gathered only at those positions;
- ``fisher``: ``F_j = Σ_p E[g_pj²]``, the Fisher information of the prediction about
  unit ``j`` (summed over the positions that share its weights);
- ``fisher_x2``: ``D_ij = Σ_p E[g_pj² x_pi²]``, the exact diagonal Fisher of weight ``w_ij``.

Every layer also gets ``z2 = E[z_j²]`` and, when asked, ``t_mean`` (per-sample output
averaged over positions, for information estimates) and sampled pre-activation / output
rows. `capture` (full activations, eager) and `weight_gradients` serve custom scores.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
from keras import ops

from keras_ibprune import accumulate, batch_stats, shards
from keras_ibprune import heldout as heldout_lib
from keras_ibprune import likelihood as likelihood_lib
from keras_ibprune import stream as stream_lib
from keras_ibprune.batch_stats import layer_kind  # noqa: F401 - public `kib.stats` name

STATISTICS = ("x2", "gram", "fisher", "fisher_x2", "t_mean", "rows")


@dataclasses.dataclass
class LayerStats:
    """What a `Score` sees of one wrapped layer.

    Attributes:
        wrapper: the `PruneWrapper`.
        weights: numpy copies of the prunable weights (unmasked).
        masks: numpy copies of the current masks.
        index: position of the wrapper in the model's wrapper list.
        labels: held-out labels `(n,)` int or `(n, k)` float, or None.
        summary: dict of the statistics named in `STATISTICS` plus `kind` (`"dense"`,
            `"conv"` or `"other"`), `positions` and `z2`; empty without held-out data.
        inputs, preacts, outputs: full activations (only for scores that ask for them).
        grads: loss gradients w.r.t. each prunable weight (gradient scores only).
        extra: free room for custom scores.
    """

    wrapper: object
    weights: list
    masks: list
    index: int = 0
    labels: np.ndarray | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    inputs: np.ndarray | None = None
    preacts: np.ndarray | None = None
    outputs: np.ndarray | None = None
    grads: list | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def find_wrappers(model):
    """All `PruneWrapper`s in `model` (nested models and subclassed attributes included)."""
    from keras_ibprune import _keras_compat
    from keras_ibprune.wrapper import PruneWrapper

    seen, out = set(), []
    for layer in _keras_compat.all_layers(model):
        if isinstance(layer, PruneWrapper) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _np(x):
    return None if x is None else np.asarray(ops.convert_to_numpy(x))


def _tensors(x):
    """A batch (one array, or a dict / list of arrays) as backend tensors."""
    if isinstance(x, dict):
        return {k: ops.convert_to_tensor(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [ops.convert_to_tensor(v) for v in x]
    return ops.convert_to_tensor(x)


# ------------------------------------------------------------------- the pass
class StatisticsPass:
    """Computes the statistics of every wrapper over held-out data; built once.

    Args:
        model: the wrapped model.
        wrappers: its `PruneWrapper`s.
        needs: statistics to compute (names from `STATISTICS`).
        output: for multi-output models, the output (index or name) whose prediction the
            Fisher information is about.
        fisher: `"model"` (labels sampled from the model's prediction: the Fisher
            information) or `"empirical"` (the held-out labels).
        max_rows: rows (samples × sampled positions) per conv layer for `gram`,
            `fisher_x2` and `rows`.
        fisher_samples: held-out samples (the first ones, whole batches) whose gradients
            give the Fisher statistics; None = all. The forward statistics always use all.
        max_gram_dim: layers with more inputs get no `gram` (memory `d_in²`); scores then
            fall back to the diagonal `x2`.
        batch_size: samples per traced call (per replica under a strategy).
        seed: seed of the label sampling (per sample, by global index: see
            `accumulate.SampleNoise`).
        strategy: None (this process computes everything) or a `tf.distribute.Strategy`
            (every replica computes its slice of each chunk; sums all-reduced, per-sample
            rows gathered, so every worker gets the same statistics).
        sample_cap: per-sample statistics (`t_mean`, `rows`) cover the first
            `sample_cap` samples only (None: all); the summaries then carry `samples`.
        shard_processes: on JAX with several processes (`jax.distributed`), each process
            computes a contiguous share of the batches and the totals are merged with
            `multihost_utils.process_allgather` (every process must run the pass, as
            `fit` with the callback does); False: every process computes everything.
    """

    def __init__(self, model, wrappers, needs, output=None, fisher="model", max_rows=4096,
                 fisher_samples=None, max_gram_dim=4096, batch_size=256, seed=0,
                 strategy=None, sample_cap=None, shard_processes=True):
        unknown = set(needs) - set(STATISTICS)
        if unknown:
            raise ValueError(f"Unknown statistics. Expected names from {STATISTICS}. "
                             f"Received: {sorted(unknown)}")
        if fisher not in ("model", "empirical"):
            raise ValueError("`fisher` must be 'model' or 'empirical'. Received: "
                             f"fisher={fisher!r}")
        self.model, self.wrappers, self.needs = model, list(wrappers), set(needs)
        self.output = likelihood_lib.resolve_output(model, output)
        self.fisher, self.seed = fisher, int(seed)
        self.max_rows, self.batch_size = int(max_rows), int(batch_size)
        self.fisher_samples = None if fisher_samples is None else int(fisher_samples)
        self.max_gram_dim = int(max_gram_dim)
        self.kinds = [layer_kind(w.layer) for w in self.wrappers]
        self.gradients = bool(self.needs & {"fisher", "fisher_x2"})
        if self.gradients and keras.backend.backend() not in ("tensorflow", "jax"):
            warnings.warn(
                "The Fisher statistics need the TensorFlow or JAX backend; on the "
                f"{keras.backend.backend()!r} backend they are skipped and the 'ib' score falls "
                "back to the label-free OBS saliency ½ w² / [H⁻¹]_ii (score='obs' also uses "
                "it, with allocation='erk').",
                stacklevel=3,
            )
            self.gradients = False
        self._fns, self._lik, self.local_batches = {}, None, 0
        self._tf_strategy = shards.check_strategy(strategy)
        self.sample_cap = None if sample_cap is None else int(sample_cap)
        self.shard_processes = shard_processes

    def _batch(self, x, u, index, target, lik, rows_per_sample, with_grad, needs, period):
        recs = {id(w): [] for w in self.wrappers}
        try:
            for w in self.wrappers:
                w._capture = recs[id(w)]
            grads = self._forward_backward(x, u, target, lik, recs, with_grad)
        finally:
            for w in self.wrappers:
                w._capture = None
        out = []
        for w, kind in zip(self.wrappers, self.kinds):
            gs = grads.get(id(w)) or [None] * len(recs[id(w)])
            out.append(batch_stats.layer_stats(w, kind, recs[id(w)], gs, needs,
                                               rows_per_sample, self.max_gram_dim, index,
                                               period))
        return out

    def _forward_backward(self, x, u, target, lik, recs, with_grad):
        if not with_grad:
            self.model(x, training=False)
            return {}
        if keras.backend.backend() == "jax":
            return self._forward_backward_jax(x, u, target, lik, recs)
        import tensorflow as tf  # lazily: gradients w.r.t. intermediate activations

        with tf.GradientTape() as tape:
            out = likelihood_lib.output_of(self.model(x, training=False), self.output)
            ll = likelihood_lib.log_likelihood(out, lik, u, target)
        flat = [(id(w), r[1]) for w in self.wrappers for r in recs[id(w)]]
        g = tape.gradient(ll, [z for _, z in flat],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = {}
        for (key, _), gi in zip(flat, g):
            grads.setdefault(key, []).append(gi)
        return grads

    def _forward_backward_jax(self, x, u, target, lik, recs):
        """JAX: the gradient w.r.t. zero probes added to every pre-activation."""
        import jax  # lazily: only on the JAX backend

        for w in self.wrappers:  # shapes of every call's pre-activation
            w._capture = []
        self.model(x, training=False)
        shapes = {id(w): [tuple(r[1].shape) for r in w._capture] for w in self.wrappers}

        def probed_log_likelihood(probes):
            for w in self.wrappers:
                w._capture, w._probes = [], probes[str(id(w))]
            out = likelihood_lib.output_of(self.model(x, training=False), self.output)
            records = {str(id(w)): list(w._capture) for w in self.wrappers}
            return likelihood_lib.log_likelihood(out, lik, u, target), records

        zeros = {str(k): [jax.numpy.zeros(sh, "float32") for sh in v]
                 for k, v in shapes.items()}
        try:
            (_, records), grads = jax.value_and_grad(probed_log_likelihood, has_aux=True)(zeros)
        finally:
            for w in self.wrappers:
                w._probes = None
        for w in self.wrappers:
            recs[id(w)][:] = records[str(id(w))]
        return {id(w): grads[str(id(w))] for w in self.wrappers}

    def _compiled(self, lik, rows_per_sample, has_target, with_grad, with_rows, period):
        key = (lik, rows_per_sample, has_target, with_grad, with_rows, period)
        if key not in self._fns:
            needs = self.needs if with_rows else self.needs - {"t_mean", "rows"}

            def fn(x, u, index, target):
                return self._batch(x, u, index, target if has_target else None, lik,
                                   rows_per_sample, with_grad, needs, period)

            if self._tf_strategy is not None:
                fn = shards.replica_step(self._tf_strategy, fn)
            elif keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                fn = tf.function(fn, reduce_retracing=True, autograph=False)
            self._fns[key] = fn
        return self._fns[key]

    def _likelihood(self, x, kind):
        """How outputs define p(y|x): probed once per pass on a few samples."""
        if self._lik is None:
            head = (next(x.batches(8))[1] if isinstance(x, stream_lib.HeldOutStream)
                    else heldout_lib.slice_inputs(x, slice(0, 8)))
            probe = _np(likelihood_lib.output_of(self.model(head, training=False), self.output))
            self._lik = (likelihood_lib.likelihood_kind(probe, kind),
                         int(np.prod(probe.shape[1:])))
        return self._lik

    def __call__(self, x, y):
        """Returns one dict of numpy statistics per wrapper (see the module doc).

        Args:
            x: held-out inputs (arrays, as `heldout.held_out_arrays` returns them) or a
                scanned `stream.HeldOutStream` (streamed batch by batch).
            y: labels of all samples (or None); read by global index.
        """
        from keras_ibprune.estimators import label_kind

        streamed = isinstance(x, stream_lib.HeldOutStream)
        src = x if isinstance(x, shards.ShardStream) else None
        if src is not None:
            shards.check_sharded(x, self.needs, self.fisher_samples)
        n = x.n if streamed else heldout_lib.num_samples(x)
        kind = "classes" if y is None else label_kind(y)[0]
        lik, width = self._likelihood(x, kind)
        target = None
        if self.fisher == "empirical":
            if y is None:
                raise ValueError("fisher='empirical' needs held-out labels. Received: y=None")
            target = label_kind(y)[1] if kind == "classes" else np.asarray(y, np.float32)
        noise = accumulate.SampleNoise(self.seed, lik == "gaussian", width)
        rows_per_sample = max(1, -(-self.max_rows // max(n, 1)))
        n_fisher = n if self.fisher_samples is None else min(n, self.fisher_samples)
        step = -(-n // -(-n // self.batch_size))  # equal batches: no retrace for a remainder
        period = -(-n // -(-n // 256))  # conv rows' shift period: a function of n only
        replicas = self._tf_strategy.num_replicas_in_sync if self._tf_strategy else 1
        if src is not None:  # a worker's chunk comes from its shard: its replicas only
            replicas //= src.pipelines
        chunk = step * replicas  # samples per call (one batch per replica)
        batches = x.batches(chunk) if streamed else _array_batches(x, n, chunk)
        if src is not None:  # every worker runs as many steps as the largest shard needs
            batches = shards.padded(batches, src.calls(chunk))
            target = None if target is None else shards.local_target(src.local_y, kind)
        processes = shards.jax_processes() if self.shard_processes else (1, 0)
        if processes[0] > 1:  # JAX processes: each computes its share, then all merge
            batches = shards.process_share(batches, -(-n // chunk), *processes)
        totals = accumulate.Totals(len(self.wrappers), self.sample_cap)
        wants_rows = bool(self.needs & {"t_mean", "rows"})
        self.local_batches = 0  # batches this process computed (tests, logs)
        for start, xb, _ in batches:
            self.local_batches += 1
            m = heldout_lib.num_samples(xb)
            with_grad = self.gradients and (src is not None or start < n_fisher)
            fn = self._compiled(lik, rows_per_sample, target is not None, with_grad,
                                wants_rows and totals.wants_rows(start), period)
            index = (src.indices(start, start + m) if src is not None
                     else np.arange(start, start + m, dtype="int32"))
            args = [xb, noise.at(index), index,
                    None if target is None else target[start:start + m]]
            if self._tf_strategy is None:
                parts = fn(_tensors(args[0]), *[None if a is None else ops.convert_to_tensor(a)
                                                for a in args[1:]])
            else:
                parts = fn(*self._distribute(args, start, start + m, replicas,
                                             local=src is not None))
            totals.add(parts, start, m)
        if processes[0] > 1:
            totals = shards.merge_processes(totals)
        fisher_seen = min(n, -(-n_fisher // chunk) * chunk) if self.gradients else 0
        return totals.finish(self.wrappers, self.kinds, fisher_seen)

    def _distribute(self, args, start, stop, replicas, local=False):
        """Per-replica values of a chunk: replica r (of this worker if `local`) gets its
        contiguous slice."""
        strategy = self._tf_strategy
        slices = [slice(a - start, b - start)
                  for a, b in shards.replica_slices(replicas, start, stop)]
        out = []
        for i, a in enumerate(args):
            if a is None:
                out.append(None)
                continue
            cut = [heldout_lib.slice_inputs(a, sl) if i == 0 else a[sl] for sl in slices]
            out.append(shards.per_replica(strategy, cut, local))
        return out


def _array_batches(x, n, size):
    """`(start, x[start:start + size], None)` over in-memory arrays."""
    for start in range(0, n, size):
        yield start, heldout_lib.slice_inputs(x, slice(start, start + size)), None


# ------------------------------------------------------ full activations, gradients
def capture(model, x, wrappers, batch_size=256):
    """Runs `model` on `x` once (eagerly) and returns, per wrapper, `(inputs, preacts,
    outputs)` numpy arrays; reused layers contribute every call (concatenated)."""
    parts = {id(w): [] for w in wrappers}
    try:
        for i in range(0, heldout_lib.num_samples(x), batch_size):
            recs = {id(w): [] for w in wrappers}
            for w in wrappers:
                w._capture = recs[id(w)]
            model(heldout_lib.slice_inputs(x, slice(i, i + batch_size)), training=False)
            for w in wrappers:
                parts[id(w)].extend(tuple(_np(p) for p in r) for r in recs[id(w)])
    finally:
        for w in wrappers:
            w._capture = None
    out = []
    for w in wrappers:
        rec = parts[id(w)]
        out.append(tuple(np.concatenate(col, axis=0) for col in zip(*rec)) if rec
                   else (None, None, None))
    return out


def weight_gradients(model, x, y, wrappers, loss, batch_size=256):
    """Mean over batches of d loss / d w for each prunable weight (TensorFlow backend)."""
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
    n = heldout_lib.num_samples(x)
    for i in range(0, n, batch_size):
        xb, yb = heldout_lib.slice_inputs(x, slice(i, i + batch_size)), y[i : i + batch_size]
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=False))
        for j, gj in enumerate(tape.gradient(value, variables)):
            if gj is not None:
                total[j] += np.asarray(gj) * (len(yb) / n)
    out, k = [], 0
    for w in wrappers:
        out.append(total[k : k + len(w.prunable_weights)])
        k += len(w.prunable_weights)
    return out


def blas_threads(n=1):
    """Context limiting BLAS threads (threadpoolctl, a scikit-learn dependency) to `n`.

    The statistics end in many small factorizations; with TensorFlow's thread pool busy
    on the same cores, multi-threaded BLAS is several times slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
