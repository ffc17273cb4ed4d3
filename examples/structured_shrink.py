"""Structured pruning: remove whole filters and units, then `shrink` to a smaller model.

Unstructured sparsity shrinks files; to make a model *faster* on a CPU or phone, remove
whole output units. `kib.prune(model, granularity="channel")` gives every Dense/Conv
layer a mask over its units; `IBPruning` ranks units by their unique label information
minus a compression term and masks the least useful ones; `shrink` then rebuilds the
model without them (consumers lose the matching inputs, exactly: same predictions).
The output layer is excluded: its units are the classes.

    python examples/structured_shrink.py
    python examples/structured_shrink.py --quick    # (or KIB_QUICK=1)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_ibprune as kib


def build_model():
    L = keras.layers
    inp = keras.Input((8, 8, 1))
    x = L.Conv2D(32, 3, padding="same", name="conv1")(inp)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    x = L.Dense(128, activation="relu", name="fc")(x)
    out = L.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="digits_cnn")


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of units removed")
    p.add_argument("--score", default="ib", help="unit score (default: ib)")
    p.add_argument("--epochs", type=int, default=None, help="dense epochs")
    p.add_argument("--prune-epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 12)
    prune_epochs = args.prune_epochs or (2 if args.quick else 6)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    xte, yte, xval, yval, xtr, ytr = x[:360], y[:360], x[360:600], y[360:600], x[600:], y[600:]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    dense = build_model()
    dense.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=epochs, verbose=0)

    pruned = kib.prune(dense, granularity="channel", exclude=["logits"])
    pruned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    callback = kib.IBPruning(
        kib.PolynomialDecay(0.0, args.sparsity, 0, max(1, prune_epochs // 2)),
        score=args.score, held_out=(xval, yval), verbose=1)
    pruned.fit(xtr, ytr, batch_size=64, epochs=prune_epochs, callbacks=[callback], verbose=0)
    print(f"effective after masking: {kib.count_params(pruned, effective=True):,} parameters, "
          f"{kib.count_flops(pruned, effective=True):,} FLOPs")

    small = kib.shrink(pruned)  # a new, smaller Functional model without wrappers
    diff = float(np.max(np.abs(small.predict(xte, verbose=0) - pruned.predict(xte, verbose=0))))
    widths = {la.name: la.kernel.shape[-1] for la in small.layers if hasattr(la, "kernel")}
    print(f"layer widths after shrink: {widths}; max |shrunk - masked| = {diff:.2e}")

    def acc(m):
        return float(np.mean(np.argmax(m.predict(xte, verbose=0), -1) == yte))

    with tempfile.TemporaryDirectory() as tmp:
        r_dense = kib.export_tflite(dense, os.path.join(tmp, "dense.tflite"), sparse=False,
                                verify_data=xte, compare_dense=False, latency_runs=50)
        r_small = kib.export_tflite(small, os.path.join(tmp, "small.tflite"), sparse=False,
                                verify_data=xte, compare_dense=False, latency_runs=50)
    print(f"\n{'':<16} {'dense':>12} {'shrunk':>12}")
    rows = [
        ("test accuracy", acc(dense), acc(small), "{:>12.4f}"),
        ("parameters", kib.count_params(dense), kib.count_params(small), "{:>12,}"),
        ("FLOPs", kib.count_flops(dense), kib.count_flops(small), "{:>12,}"),
        ("TFLite bytes", r_dense.file_bytes, r_small.file_bytes, "{:>12,}"),
        ("latency (ms)", r_dense.latency_ms, r_small.latency_ms, "{:>12.4f}"),
    ]
    for name, a, b, fmt in rows:
        print(f"{name:<16} {fmt.format(a)} {fmt.format(b)}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return {"accuracy": acc(small), "max_diff": diff,
            "params": (kib.count_params(dense), kib.count_params(small))}


if __name__ == "__main__":
    main()
