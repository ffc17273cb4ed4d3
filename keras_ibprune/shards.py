"""Distributed plumbing of the statistics pass: strategies, worker shards, JAX processes.

Three ways the held-out statistics are split, all on the engines users already run:

- **Replicas of a `tf.distribute.Strategy`** (`replica_step`): each replica computes the
  statistics of its slice of a chunk inside `strategy.run`; the sums are all-reduced with
  ``strategy.reduce(SUM)`` and the per-sample rows gathered with ``strategy.gather``.
- **Worker shards of a dataset function** (`ShardStream`): `held_out(input_context)` is
  called with this worker's `tf.distribute.InputContext`, as
  `strategy.distribute_datasets_from_function` would, so each worker reads only its shard;
  the workers step in lockstep (`padded`) and the same all-reduce adds their sums.
- **JAX processes** (`process_share`, `merge_processes`): each process computes a
  contiguous share of the batches; the float64 totals travel through
  `jax.experimental.multihost_utils.process_allgather` and are added in process order.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np

from keras_ibprune import heldout as heldout_lib
from keras_ibprune.accumulate import Totals
from keras_ibprune.batch_stats import SAMPLE_KEYS
from keras_ibprune.stream import HeldOutStream


# ------------------------------------------------------------- tf.distribute
def replica_step(strategy, fn):
    """A `tf.function` running `fn` on every replica and all-reducing its statistics.

    Args:
        strategy: a `tf.distribute.Strategy`.
        fn: `fn(x, u, index, target) -> [dict per wrapper]` on one replica's slice.

    Returns:
        `step(x, u, index, target)` taking per-replica values and returning, per wrapper,
        the sums over all replicas (``strategy.reduce(SUM)``, on every worker) and the
        per-sample rows concatenated in replica order (``strategy.gather``).
    """
    import tensorflow as tf  # lazily: only under a tf.distribute strategy

    def step(x, u, index, target):
        per_replica = strategy.run(fn, args=(x, u, index, target))
        out = []
        for part in per_replica:
            red = {}
            for k, v in part.items():
                if k == "positions":
                    red[k] = strategy.experimental_local_results(v)[0]
                elif k in SAMPLE_KEYS:
                    red[k] = strategy.gather(v, axis=0)
                else:
                    red[k] = strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            out.append(red)
        return out

    return tf.function(step, reduce_retracing=True, autograph=False)


def replica_slices(replicas, start, stop):
    """Global sample ranges `[(a, b)]` of each replica for the samples `start..stop-1`.

    The chunk is split into `replicas` contiguous, near-equal slices in replica order
    (`num_replicas_in_sync`, or a worker's local replicas for a sharded input), so replica
    ``r`` gets the same samples on every run.
    """
    edges = np.linspace(start, stop, replicas + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def per_replica(strategy, values, local=False):
    """`values[r]` (a structure of arrays, one per replica) as distributed values.

    `r` is the replica's id in the sync group, or with `local=True` its position among
    this worker's replicas (the function is called once per local replica, in order).
    """
    calls = []

    def value(ctx):
        calls.append(ctx)
        return values[len(calls) - 1 if local else ctx.replica_id_in_sync_group]

    return strategy.experimental_distribute_values_from_function(value)


def worker_concat(strategy, values):
    """Every worker's `values` (numpy, same trailing shape), concatenated in worker order.

    Used on a few numbers per sample at most (shard sizes, labels). It is one
    ``strategy.reduce(SUM)`` of zero-padded slots (first the lengths, then the values), so
    every worker gets the same float64 result; integer values stay exact (< 2**53).
    """
    pipelines, pipeline_id = worker_position(strategy)
    values = np.asarray(values, np.float64)
    lengths = _worker_sum(strategy, np.eye(pipelines)[pipeline_id] * len(values))
    lengths = lengths.round().astype(int)
    slots = np.zeros((pipelines, max(int(lengths.max()), 1)) + values.shape[1:])
    slots[pipeline_id, : len(values)] = values
    slots = _worker_sum(strategy, slots)
    return np.concatenate([slots[p, : lengths[p]] for p in range(pipelines)])


def _worker_sum(strategy, array):
    """Sum over workers of one float64 array per worker (its first local replica adds it)."""
    import tensorflow as tf  # lazily: only under a tf.distribute strategy

    calls = []

    def value(ctx):  # called once per local replica, in order
        calls.append(ctx)
        return tf.constant(array if len(calls) == 1 else np.zeros_like(array))

    per = strategy.experimental_distribute_values_from_function(value)
    return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per, axis=None))


def worker_position(strategy):
    """`(workers, this worker's index)` of a strategy; `(1, 0)` without a cluster.

    The index is the one `tf.distribute` gives the input pipeline of this worker
    (`InputContext.input_pipeline_id`): the chief first, then the workers.
    """
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers <= 1:
        return 1, 0
    task = int(resolver.task_id or 0)
    return chiefs + workers, task if resolver.task_type == "chief" else chiefs + task


# --------------------------------------------------------------- JAX processes
def jax_processes():
    """`(count, index)` of the JAX processes (`(1, 0)` on other backends or one process)."""
    import keras

    if keras.backend.backend() != "jax":
        return 1, 0
    import jax  # lazily: only on the JAX backend

    return jax.process_count(), jax.process_index()


def process_share(batches, total, count, index):
    """The batches of process `index` of `count`: a contiguous share of the `total` batches
    (process order is global sample order; every process still reads the stream)."""
    lo, hi = (total * index) // count, (total * (index + 1)) // count
    for b, item in enumerate(batches):
        if b >= hi:
            return
        if b >= lo:
            yield item


def merge_processes(totals):
    """Sums the `Totals` of every JAX process (in process order) into `totals`.

    Each process's float64 sums and per-sample rows are written with `np.savez` and
    exchanged with JAX's own collective, `multihost_utils.process_allgather` (bytes, so
    float64 travels exactly); every process then adds them in the same order and holds
    the same totals.
    """
    import io

    from jax.experimental import multihost_utils  # lazily: JAX multi-process only

    flat = {"samples": np.asarray(totals.samples)}
    for i, (tot, rows) in enumerate(zip(totals.sums, totals.rows)):
        flat.update({f"s/{i}/{k}": np.asarray(v) for k, v in tot.items()})
        flat.update({f"r/{i}/{k}": np.concatenate(v) for k, v in rows.items()})
    buf = io.BytesIO()
    np.savez(buf, **flat)
    data = np.frombuffer(buf.getvalue(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    merged = Totals(len(totals.sums), totals.sample_cap)
    for size, raw in zip(sizes, every):
        with np.load(io.BytesIO(raw[: int(size)].tobytes()), allow_pickle=False) as part:
            merged.samples += int(part["samples"])
            for key in part.files:
                if key == "samples":
                    continue
                kind, i, k = key.split("/", 2)
                v = part[key]
                if kind == "r":
                    merged.rows[int(i)].setdefault(k, []).append(v)
                elif k == "positions":
                    merged.sums[int(i)][k] = int(v)
                else:
                    tot = merged.sums[int(i)]
                    tot[k] = tot.get(k, 0.0) + v
    return merged


# ----------------------------------------------------------- sharded input functions
def is_dataset_fn(held_out):
    """Whether `held_out` is a dataset function `fn(input_context) -> tf.data.Dataset`.

    That is a callable (not a dataset) with one required positional parameter, as
    `tf.distribute.Strategy.distribute_datasets_from_function` takes; a callable without
    required parameters is a source returning a fresh iterable (see `HeldOutStream`).
    """
    if not callable(held_out) or heldout_lib._is_tf_dataset(held_out):
        return False
    try:
        params = inspect.signature(held_out).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is p.empty for p in params) == 1


class ShardStream(HeldOutStream):
    """This worker's shard of a held-out dataset function, streamed.

    `fn(input_context)` is called with the `tf.distribute.InputContext` the strategy
    gives this worker's input pipeline (`input_context.shard(...)`, or any file-level
    split, reads only this worker's part) and again at every pass. Sample ``j`` of the
    shard of pipeline ``p`` of ``P`` gets the global index ``j * P + p``: the order of
    ``dataset.shard(P, p)`` on unbatched records, so a function sharding that way gives
    the statistics of one device reading everything. `scan` counts the shards and gathers
    the labels of all workers (one int or a few floats per sample).

    Args:
        fn: the dataset function.
        model: the model (inputs are checked against it).
        output: for multi-output targets, the index or name of the output to use.
        strategy: the `tf.distribute.Strategy`, or None (one pipeline: all of the data).
    """

    def __init__(self, fn, model=None, output=None, strategy=None):
        import tensorflow as tf  # lazily: a dataset function builds a tf.data pipeline

        self.strategy = strategy
        self.pipelines, self.pipeline_id = worker_position(strategy)
        replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        self.context = tf.distribute.InputContext(self.pipelines, self.pipeline_id, replicas)

        def source():
            ds = fn(self.context)
            if not heldout_lib._is_tf_dataset(ds):
                raise ValueError(
                    "A held-out dataset function `held_out(input_context)` must return a "
                    f"tf.data.Dataset. Received: {type(ds).__name__} from {fn!r}"
                )
            if int(ds.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
                raise ValueError(
                    "The held-out dataset function must return a finite dataset (use "
                    "`.take(n)`). Received: an infinite dataset"
                )
            return ds

        super().__init__(source, model, output)
        self.counts, self.local_n, self.local_y = None, None, None

    def scan(self):
        """Reads this worker's shard, then shares the shard sizes and labels.

        Returns:
            `(n, y)`: samples over all workers and their labels (worker order).
        """
        try:
            local_n, local_y = super().scan()
        except ValueError as e:
            if "empty" not in str(e) or self.pipelines == 1:
                raise
            local_n, local_y = 0, None
        self.local_n, self.local_y = local_n, local_y
        if self.pipelines == 1:
            self.counts = [local_n]
            return self.n, self.y
        self.counts = worker_concat(self.strategy, [local_n]).astype(int).tolist()
        if min(self.counts) == 0:
            raise ValueError(
                "Every worker's held-out shard must hold samples. Received: shard sizes "
                f"{self.counts} (input_pipeline_id -> samples)"
            )
        y = None
        if local_y is not None:
            y = worker_concat(self.strategy, local_y)
            y = y.astype(local_y.dtype) if local_y.dtype.kind in "iub" else y
        self.n, self.y = int(sum(self.counts)), y
        return self.n, self.y

    def indices(self, start, stop):
        """Global indices of this shard's samples ``start .. stop - 1`` (int32)."""
        return (np.arange(start, stop) * self.pipelines + self.pipeline_id).astype("int32")

    def calls(self, chunk):
        """Chunks of `chunk` samples in the largest shard: steps every worker runs."""
        return max(-(-c // chunk) for c in self.counts)


def check_sharded(stream, needs, fisher_samples):
    """Raises for statistics a `ShardStream` cannot give (per-sample rows, a Fisher subset)."""
    per_sample = sorted(set(needs) & {"t_mean", "rows"})
    if per_sample:
        raise ValueError(
            "A held-out dataset function gives sums over shards, not per-sample statistics "
            "(the information logs, channel scores and 'gaussian_obd' read them): use "
            "held-out arrays or a dataset with `strategy=`. Received: statistics "
            f"{per_sample} asked for"
        )
    if fisher_samples is not None and fisher_samples < stream.n:
        raise ValueError(
            "`fisher_samples` (the first samples by index) is not supported with a held-out "
            f"dataset function. Received: fisher_samples={fisher_samples}"
        )


# ---------------------------------------------------------------- the pass
def check_strategy(strategy):
    """The `tf.distribute.Strategy` to shard over, or None."""
    if strategy is None:
        return None
    if not (hasattr(strategy, "run") and hasattr(strategy, "num_replicas_in_sync")):
        raise ValueError(
            f"`strategy` must be None or a tf.distribute.Strategy. Received: strategy={strategy!r}"
        )
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "A tf.distribute strategy needs the TensorFlow backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    return strategy


def padded(batches, calls):
    """`batches`, then empty batches up to `calls` (workers step in lockstep)."""
    empty, done = None, 0
    for start, xb, yb in batches:
        empty = (start + heldout_lib.num_samples(xb), heldout_lib.slice_inputs(xb, slice(0, 0)))
        done += 1
        yield start, xb, yb
    for _ in range(done, calls):
        yield empty[0], empty[1], None


def local_target(y, kind):
    from keras_ibprune.estimators import label_kind

    return label_kind(y)[1] if kind == "classes" else np.asarray(y, np.float32)
