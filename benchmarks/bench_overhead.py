"""Training-time overhead of pruning: keras_ibprune's PruneWrapper vs tfmot, one process.

Four copies of LeNet-5-Caffe train on the same data with the same optimizer: the plain Keras 3
model, the same model wrapped by `kib.prune` with the `IBPruning` callback (magnitude score,
50 % sparsity, masks updated every epoch), a plain tf_keras twin, and that twin wrapped by
tfmot's `prune_low_magnitude` (+ `UpdatePruningStep`, same sparsity). Each wrapper is
compared with the plain model of its own framework. Epochs are interleaved
(in an order rotated every round) so machine noise hits all four alike; the first round
(tracing) is dropped and the median epoch time of each is divided by the plain model's.

    python benchmarks/bench_overhead.py [--data mnist|digits] [--rounds 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _data  # noqa: E402


def _keras_pair(x, num_classes, sparsity):
    import keras

    import keras_ibprune as kib

    keras.utils.set_random_seed(0)
    plain = _data.lenet5(x.shape[1:], num_classes)
    plain.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    ours = kib.prune(plain)
    ours.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    cb = kib.IBPruning(kib.ConstantSparsity(sparsity), score="magnitude")
    return plain, (ours, [cb])


def _tfmot(x, num_classes, sparsity, steps):
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    import tensorflow_model_optimization as tfmot
    import tf_keras

    if saved is None:  # tfmot sets this at import; do not let it leak further
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    plain = _data.lenet5(x.shape[1:], num_classes, lib=tf_keras)
    plain.compile(tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    base = _data.lenet5(x.shape[1:], num_classes, lib=tf_keras)
    sched = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=steps)
    model = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=sched)
    model.compile(tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    return (plain, []), (model, [tfmot.sparsity.keras.UpdatePruningStep()])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist" if _data.mnist_available() else "digits")
    p.add_argument("--rounds", type=int, default=7, help="interleaved epochs per model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--no-tfmot", action="store_true")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"
                                         / "overhead.md"))
    args = p.parse_args(argv)

    (x, y), _ = _data.load(args.data)
    steps = -(-len(x) // args.batch_size)
    plain, ours = _keras_pair(x, 10, args.sparsity)
    runs = {"keras (plain)": (plain, []), "keras_ibprune": ours}
    if not args.no_tfmot:
        runs["tf_keras (plain)"], runs["tfmot"] = _tfmot(x, 10, args.sparsity, steps)
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds + 1):
        # Rotate the order every round so that no model always runs first (cache, clocks).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, cbs = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            model.fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=r + 1,
                initial_epoch=r,
                callbacks=cbs,
                verbose=0,
                shuffle=False,
            )
            if r > 0:  # round 0 traces the train step
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    # Each wrapper against the plain model of its own framework (Keras 3 / tf_keras).
    reference = {"keras_ibprune": "keras (plain)", "tfmot": "tf_keras (plain)"}
    lines = [
        f"# Training overhead ({args.data}, {len(x)} samples, batch {args.batch_size}, "
        f"{args.rounds} timed epochs each, interleaved)",
        f"date: {datetime.date.today()}, machine: {platform.machine()} "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}; command: `python "
        f"benchmarks/bench_overhead.py {' '.join(sys.argv[1:])}`",
        # CPU time (all threads) is the robust figure here: this machine's CPU quota
        # throttles wall time in steps (epochs cluster at ~1.8 s and ~2.65 s whatever runs).
        "| model | median epoch CPU (s) | CPU ratio to its plain model | median epoch wall (s) "
        "| wall ratio |",
        "|---|---|---|---|---|",
    ]
    for name in times:
        ref = reference.get(name, name)
        c, w = statistics.median(cpu[name]), statistics.median(times[name])
        c_ref, w_ref = statistics.median(cpu[ref]), statistics.median(times[ref])
        lines.append(f"| {name} | {c:.3f} | {c / c_ref:.3f} | {w:.3f} | {w / w_ref:.3f} |")
    for name, ts in times.items():
        lines.append(f"raw {name}: " + ", ".join(f"{t:.2f}" for t in ts))
    sp = [
        float(np.mean(m.numpy() == 0))
        for w in ours[0].layers
        if hasattr(w, "masks")
        for m in w.masks
    ]
    lines.append(f"keras_ibprune mask sparsity per tensor: {[round(s, 3) for s in sp]}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)  # never a half-written results file

if __name__ == "__main__":
    main()
