"""IB pruning of a subclassed Keras model: wrap the layers where you define them.

`kib.prune` rebuilds Sequential and Functional models; a subclassed model cannot be
rebuilt, so wrap its layers in `kib.PruneWrapper` in `__init__`. Everything else is the
same: `IBPruning` finds the wrappers (also inside lists or nested layers),
`kib.strip_pruning(model)` unwraps them in place (masks baked into the weights) and the
model exports to TFLite like any other (`input_shape=` since it has no `Input`).

    python examples/subclassed_model.py
    python examples/subclassed_model.py --quick    # (or KIB_QUICK=1)
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

L = keras.layers


class DigitsNet(keras.Model):
    """A conv feature extractor and an MLP head, pruned through `PruneWrapper`s."""

    def __init__(self, num_classes=10, prune=True, **kwargs):
        super().__init__(**kwargs)
        wrap = kib.PruneWrapper if prune else (lambda layer: layer)
        self.conv = wrap(L.Conv2D(16, 3, padding="same", activation="relu", name="conv"))
        self.pool = L.MaxPooling2D()
        self.flatten = L.Flatten()
        self.hidden = [wrap(L.Dense(64, activation="relu", name=f"fc{i}")) for i in (1, 2)]
        self.head = wrap(L.Dense(num_classes, name="logits"))

    def call(self, x):
        x = self.flatten(self.pool(self.conv(x)))
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 16)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    (xte, yte), (xval, yval), (xtr, ytr) = (x[:360], y[:360]), (x[360:600], y[360:600]), (
        x[600:], y[600:])

    model = DigitsNet()
    model(xtr[:1])  # build, so the wrappers create their masks
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # Train dense for half the epochs, then ramp the sparsity up over a quarter.
    half = epochs // 2
    callback = kib.IBPruning(
        kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=half,
                            end_epoch=half + max(1, epochs // 4)),
        held_out=(xval, yval),
        verbose=1,
    )
    history = model.fit(xtr, ytr, batch_size=64, epochs=epochs, callbacks=[callback], verbose=0)
    print("sparsity per epoch:", [round(s, 3) for s in history.history["sparsity"]])

    kib.strip_pruning(model)  # in place for subclassed models: the wrappers are gone
    print(kib.sparsity_summary(model))
    acc = float(np.mean(np.argmax(model.predict(xte, verbose=0), -1) == yte))
    with tempfile.TemporaryDirectory() as tmp:
        report = kib.export_tflite(model, os.path.join(tmp, "digits.tflite"), verify_data=xte,
                               latency_runs=0)
    print(f"test accuracy {acc:.2%}; TFLite {report.file_bytes:,} bytes sparse vs "
          f"{report.dense_bytes:,} dense, agreement {report.top1_agreement:.4f}; "
          f"done in {time.perf_counter() - start:.0f}s")
    return {"accuracy": acc, "sparsity": kib.sparsity(model)}


if __name__ == "__main__":
    main()
