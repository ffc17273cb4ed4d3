"""The accuracy protocol shared by `bench_select.py` and `bench_accuracy.py`.

One dense model per (model, data, seed) trained on the *train* split; every method starts
from a copy of its weights (a tf_keras twin for tfmot) and fine-tunes `prune_epochs` epochs
with Adam(1e-3), batch 64, while sparsity ramps 0 -> s over `ramp` epochs
(PolynomialDecay, power 3, masks updated at epoch ends). keras_ibprune's held-out batch is
the *validation* split (at most 1024 samples). Each run reports validation and test
accuracy; selection scripts read only validation, reports read test.

Methods are named `name[:key=value,...][@allocation]`: `ib:fisher=empirical@erk` is the IB
score with `fisher="empirical"` and the ERK allocation; `tfmot` is tfmot's
`prune_low_magnitude`.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras -> tf_keras for tfmot only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _data  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ibprune as kib  # noqa: E402

BATCH, LR, HELD_OUT = 64, 1e-3, 1024

BASE = {
    # name: (score, allocation); None = the package default for that score.
    "ib": (None, None),
    "magnitude": ("magnitude", None),
    "wanda": ("activation", None),
    "obs": ("obs", None),
    "gaussian_obd": ("gaussian_obd", None),
    "random": ("random", None),
}
LABELS = {
    "tfmot": "tfmot prune_low_magnitude",
    "ib": "**keras_ibprune IB default** (Fisher-OBS, global nats)",
    "magnitude@erk": "magnitude + ERK",
    "magnitude@uniform": "magnitude + uniform",
    "wanda@erk": "Wanda (activation) + ERK",
    "obs@erk": "OBS / SparseGPT (label-free) + ERK",
    "gaussian_obd": "0.1 default (gaussian_obd + ERK floors)",
}


def parse(method):
    """`"ib:fisher=empirical@erk"` -> `("ib", {"fisher": "empirical"}, "erk")`."""
    alloc = None
    if "@" in method:
        method, alloc = method.split("@", 1)
    name, _, args = method.partition(":")
    if name not in BASE and name != "tfmot":
        raise ValueError(f"Unknown method {name!r}; expected tfmot or one of {sorted(BASE)}")
    kwargs = {}
    for item in filter(None, args.split(",")):
        k, v = item.split("=")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        kwargs[k] = {"True": True, "False": False}.get(v, v) if isinstance(v, str) else v
    return name, kwargs, alloc


def _score(name, kwargs):
    score = BASE[name][0] or "ib"
    if not kwargs:
        return None if BASE[name][0] is None else score
    cls = type(kib.scores.get(score))
    return cls(**kwargs)


def compile_model(model, lib=keras):
    model.compile(lib.optimizers.Adam(LR), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def train_dense(model_name, train, seed, epochs):
    x, y = train
    keras.utils.set_random_seed(seed)
    model = compile_model(_data.build(model_name, x.shape[1:]))
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    return model


def _evaluate(model, split):
    return float(model.evaluate(*split, verbose=0, batch_size=512)[1])


def run(method, dense, model_name, data, sparsity, seed, prune_epochs=6, ramp=4,
        prune_kwargs=None):
    """Prunes a copy of `dense`; returns a dict with val/test accuracy, sparsity, time.

    `prune_kwargs` go to `kib.prune` (e.g. `{"pattern": "2:4"}`); not for tfmot."""
    train, val, test = data
    name, kwargs, alloc = parse(method)
    start = time.perf_counter()
    if name == "tfmot":
        acc_val, acc_test, real = _run_tfmot(dense, model_name, data, sparsity, seed,
                                             prune_epochs, ramp)
        return {"val": acc_val, "test": acc_test, "sparsity": real,
                "seconds": time.perf_counter() - start}
    keras.utils.set_random_seed(seed + 1000)
    twin = _data.build(model_name, train[0].shape[1:])
    twin.set_weights(dense.get_weights())
    pruned = compile_model(kib.prune(twin, **(prune_kwargs or {})))
    held = (val[0][:HELD_OUT], val[1][:HELD_OUT])
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, sparsity, 0, ramp),
                       score=_score(name, kwargs), allocation=alloc, held_out=held)
    pruned.fit(*train, batch_size=BATCH, epochs=prune_epochs, verbose=0, callbacks=[cb])
    return {"val": _evaluate(pruned, val), "test": _evaluate(pruned, test),
            "sparsity": kib.sparsity(pruned), "seconds": time.perf_counter() - start,
            "update_seconds": cb.pruner.last_update_seconds}


def _run_tfmot(dense, model_name, data, sparsity, seed, prune_epochs, ramp):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    train, val, test = data
    x, y = train
    tf_keras.utils.set_random_seed(seed + 1000)
    twin = _data.build(model_name, x.shape[1:], lib=tf_keras)
    twin.set_weights(dense.get_weights())
    steps = int(np.ceil(len(x) / BATCH))
    sched = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin_step=0,
                                                 end_step=ramp * steps, frequency=steps)
    pruned = compile_model(
        tfmot.sparsity.keras.prune_low_magnitude(twin, pruning_schedule=sched), lib=tf_keras)
    pruned.fit(x, y, batch_size=BATCH, epochs=prune_epochs, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    final = compile_model(tfmot.sparsity.keras.strip_pruning(pruned), lib=tf_keras)
    ws = [w for layer in final.layers for w in layer.weights if "kernel" in w.name]
    total = sum(int(np.prod(w.shape)) for w in ws)
    zeros = sum(int(tf.reduce_sum(tf.cast(w == 0, tf.int32))) for w in ws)
    acc = [float(final.evaluate(*s, verbose=0, batch_size=512)[1]) for s in (val, test)]
    return acc[0], acc[1], zeros / total


def mean_se(values):
    """`(mean, standard error)` in percent; SE = sample std / sqrt(n) (0 for one value)."""
    v = 100.0 * np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def fmt(values):
    if not len(values):
        return "–"
    m, se = mean_se(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {se:.2f}"


def paired(a, b):
    """Mean ± SE (points) of the per-seed difference `a - b` and a verdict."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    m, se = mean_se(d)
    if d.size < 2:
        return m, se, "one seed"
    verdict = "tie" if abs(m) <= se else ("ahead" if m > 0 else "behind")
    return m, se, verdict
