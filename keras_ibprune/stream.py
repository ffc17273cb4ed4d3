"""Held-out data as a re-readable stream of globally indexed batches (large held-out sets).

`HeldOutStream` wraps arrays, a finite `tf.data.Dataset` (read again at every pass) or a
callable returning a fresh iterable, and yields `(start, x, y)` batches of a fixed size,
where `start` is the global index of the batch's first sample. Batches are re-cut from
whatever the source yields (batched or not), so the same data always gives the same
batches, and only one batch (plus one source element) is in memory at a time.

`scan` reads the source once: it validates every element (the checks of
`heldout.held_out_arrays`: input names, shapes, integer inputs, NaN/inf), counts the
samples and keeps the labels (one int or a few floats per sample: the only per-sample
data kept). A Python generator cannot be read twice: materialise it with an integer
`held_out_size` instead.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np

from keras_ibprune import heldout as heldout_lib

SAMPLE_CAP = 4096  # samples whose per-sample statistics a streamed pass keeps


def _concat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)


def _merge(buf):
    """One `(x, y)` from buffered chunks (no copy for a single chunk)."""
    if len(buf) == 1:
        return buf[0]
    ys = None if buf[0][1] is None else np.concatenate([b[1] for b in buf])
    return _concat([b[0] for b in buf]), ys


def is_streamable(held_out):
    """Whether `held_out` can be read more than once (arrays, a dataset, a callable)."""
    return not (
        inspect.isgenerator(held_out)
        or (hasattr(held_out, "__next__") and not isinstance(held_out, np.ndarray))
    )


class HeldOutStream:
    """A re-readable held-out source, cut into batches with global sample indices.

    Args:
        source: `(x, y)` / `(x, None)` / `x` arrays (x a dict or list for several inputs),
            a finite `tf.data.Dataset` of `(x, y)` or `x` elements (batched or not), or a
            callable returning a fresh iterable of such elements.
        model: optional model; inputs are checked against it (as `held_out_arrays` does).
        output: for multi-output targets, the index or name of the output to use.

    Raises:
        ValueError: a Python generator/iterator (it can be read only once) or an
            infinite dataset.
    """

    def __init__(self, source, model=None, output=None):
        if not is_streamable(source):
            raise ValueError(
                "held_out_size=None streams the held-out data at every update, so it must be "
                "readable more than once: pass arrays, a finite tf.data.Dataset or a callable "
                "returning a fresh iterator (or cap a generator with an int held_out_size). "
                f"Received: a {type(source).__name__}"
            )
        if heldout_lib._is_tf_dataset(source):
            import tensorflow as tf  # lazily: the source is a tf.data.Dataset

            if int(source.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
                raise ValueError(
                    "held_out_size=None reads the whole held-out dataset at every update: it "
                    "must be finite (use `.take(n)`). Received: an infinite dataset"
                )
        self.source, self.model, self.output = source, model, output
        self.n, self.y = None, None

    # ------------------------------------------------------------- elements
    def _arrays(self):
        src = self.source
        if (
            isinstance(src, (tuple, list))
            and len(src) == 2
            and not (heldout_lib._is_tf_dataset(src) or callable(src))
        ):
            return src
        if isinstance(src, (np.ndarray, dict)) or hasattr(src, "__array__"):
            return src, None
        return None

    def _elements(self):
        """`(x, y)` numpy chunks of the source, batched, x standardized, y picked."""
        arrays = self._arrays()
        if arrays is not None:
            yield arrays
            return
        ndims = heldout_lib._leaf_ndims(self.model)
        for element in self.source() if callable(self.source) else self.source:
            x, y = heldout_lib._split(element)
            x = heldout_lib._as_numpy(x)
            x, unbatched = heldout_lib._batch_unbatched(x, ndims)
            if y is not None:
                y = heldout_lib._as_numpy(y)
                if unbatched:
                    y = keras.tree.map_structure(lambda a: np.asarray(a)[None], y)
            yield x, y

    def _standard(self, x, y, start):
        model = self.model
        x = (
            heldout_lib.standardize_inputs(model, x, "held-out x")
            if model is not None
            else heldout_lib._standalone(x)
        )
        n = heldout_lib.num_samples(x)
        if y is not None:
            y = heldout_lib._pick_y(y, heldout_lib._output_key(model, self.output, y))
            if len(y) != n:
                raise ValueError(
                    "Held-out x and y must have the same number of samples. Received: "
                    f"len(x)={n}, len(y)={len(y)} (in the element at sample {start})"
                )
        return x, y

    # ---------------------------------------------------------------- passes
    def scan(self):
        """Reads the source once: validates it, counts samples, keeps the labels.

        Returns:
            `(n, y)`: the number of samples and the labels (None without labels).
        """
        n, ys, labelled = 0, [], None
        for x, y in self._elements():
            x, y = self._standard(x, y, n)
            if labelled is None:
                labelled = y is not None
            elif labelled != (y is not None):
                raise ValueError(
                    "Every held-out element must carry labels, or none. "
                    f"Received: a change at sample {n}"
                )
            heldout_lib.check_finite(x, y, offset=n)
            n += heldout_lib.num_samples(x)
            if y is not None:
                ys.append(np.asarray(y))
        if n == 0:
            raise ValueError("The held-out dataset/generator is empty. Received: 0 samples")
        self.n, self.y = n, (np.concatenate(ys) if labelled else None)
        return self.n, self.y

    def batches(self, size):
        """Yields `(start, x, y)`: consecutive batches of `size` samples (the last smaller).

        `start` is the global index of the batch's first sample. At most one batch plus
        one source element is held at a time.
        """
        buf, have, start = [], 0, 0
        for x, y in self._elements():
            x, y = self._standard(x, y, start + have)
            buf.append((x, y))
            have += heldout_lib.num_samples(x)
            while have >= size:
                xs, ys = _merge(buf)
                yield start, heldout_lib.slice_inputs(xs, slice(0, size)), _head(ys, size)
                buf = [
                    (
                        heldout_lib.slice_inputs(xs, slice(size, None)),
                        None if ys is None else ys[size:],
                    )
                ]
                have -= size
                start += size
        if have:
            xs, ys = _merge(buf)
            yield start, xs, ys


def _head(y, size):
    return None if y is None else y[:size]


# ----------------------------------------------------------------- for the Pruner
def check_size(held_out_size):
    """`held_out_size` checked: an int >= 2 (read into memory) or None (streamed)."""
    if held_out_size is not None and (
        isinstance(held_out_size, bool) or not isinstance(held_out_size, int) or held_out_size < 2
    ):
        raise ValueError(
            "`held_out_size` must be an int >= 2 or None. Received: "
            f"held_out_size={held_out_size!r}"
        )
    return held_out_size


def statistics_pass(model, wrappers, score, needs, data, output, strategy, size):
    """The `stats.StatisticsPass` a score needs on `data` (from `load`), or None."""
    from keras_ibprune import shards, stats  # stats reads streams: imported lazily

    if data is None or not needs:
        return None
    sp = stats.StatisticsPass(
        model,
        wrappers,
        needs,
        output=output,
        fisher=getattr(score, "fisher", "model"),
        max_rows=getattr(score, "max_rows", 4096),
        fisher_samples=getattr(score, "fisher_samples", None),
        max_gram_dim=getattr(score, "max_gram_dim", 4096),
        seed=getattr(score, "seed", 0),
        strategy=strategy,
        sample_cap=None if size else SAMPLE_CAP,
    )
    if isinstance(data[0], shards.ShardStream):  # fail at reset, not at the first update
        shards.check_sharded(data[0], needs, sp.fisher_samples)
    return sp


def load(held_out, size, model, output=None, score=None, strategy=None):
    """The Pruner's held-out data: `(x, y)` arrays, or `(stream, y)` when streamed.

    Label-free data (`y` None) gets the dense model's own predictions when the score
    needs labels.

    Args:
        held_out: arrays, a dataset, a generator, a callable or a dataset function
            `fn(input_context)`.
        size: `held_out_size` (an int: read into memory; None: streamed).
        model: the model.
        output: for multi-output models, the output the score follows.
        score: the `Score` (what it reads decides what is allowed).
        strategy: the `tf.distribute.Strategy` of a dataset function, or None.
    """
    from keras_ibprune import shards  # the sharded stream subclasses `HeldOutStream`

    if shards.is_dataset_fn(held_out):
        if size is not None:
            raise ValueError(
                "A held-out dataset function `held_out(input_context)` is read shard by shard "
                f"and streamed: pass held_out_size=None. Received: held_out_size={size!r}"
            )
        data = shards.ShardStream(held_out, model, output=output, strategy=strategy)
    elif size is not None:
        x, y = heldout_lib.held_out_arrays(held_out, size, model, output=output)
        return x, _labels(x, y, model, output, score)
    else:
        data = HeldOutStream(held_out, model, output=output)
    if score.needs_activations or score.needs_gradients:
        raise ValueError(
            f"Score {type(score).__name__} reads full activations or weight gradients, which "
            "need the held-out data in memory: pass an int `held_out_size`. Received: "
            "held_out_size=None"
        )
    y = data.scan()[1]
    if isinstance(data, shards.ShardStream) and y is None and score.needs_labels:
        data.local_y = np.concatenate(
            [teacher_labels(b, model, output) for _, b, _ in data.batches(1024)]
        )
        y = data.local_y if data.pipelines == 1 else _worker_labels(strategy, data.local_y)
        heldout_lib.check_labels(y, min_count=1)  # rare predicted classes are fine
        return data, y
    return data, _labels(data, y, model, output, score)


def _worker_labels(strategy, local):
    from keras_ibprune import shards

    out = shards.worker_concat(strategy, local)
    return out.astype(local.dtype) if local.dtype.kind in "iub" else out


def _labels(x, y, model, output, score):
    if y is None and score.needs_labels:
        y = teacher_labels(x, model, output)
        heldout_lib.check_labels(y, min_count=1)  # rare predicted classes are fine
    elif y is not None and score.needs_labels:
        heldout_lib.check_labels(y)
    return y


def teacher_labels(x, model, output=None):
    """Label-free mode: the current (dense) model's predictions, captured once."""
    from keras_ibprune import likelihood as likelihood_lib

    if isinstance(x, HeldOutStream):
        return np.concatenate([teacher_labels(b, model, output) for _, b, _ in x.batches(1024)])
    pred = model.predict(x, batch_size=256, verbose=0)
    pred = np.asarray(likelihood_lib.output_of(pred, likelihood_lib.resolve_output(model, output)))
    pred = pred.reshape(len(pred), -1)  # `x` may be a dict of inputs
    if pred.shape[1] > 1:
        return np.argmax(pred, axis=1).astype(np.int64)
    return pred.astype(np.float64)
