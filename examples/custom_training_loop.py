"""IB pruning in a custom training loop: `kib.Pruner`, the engine behind the callback.

`kib.IBPruning` is a thin Keras callback around `kib.Pruner`. Without `fit`, drive the
pruner yourself: `reset()` once before training (finds the wrappers, takes the held-out
data), `update(t)` at the end of each epoch with `t` = completed epochs (it asks the
schedule and, when due, scores the weights and writes new masks), and `rezero()` to zero
pruned weights again after optimizer steps (momentum can move them; the forward pass
is masked either way). `logs()` gives the same `sparsity/<layer>` numbers the callback
adds to the epoch logs, and with `log_information=True` the `I_TY/...`, `I_XT/...` ones.

    python examples/custom_training_loop.py
    python examples/custom_training_loop.py --quick    # (or KIB_QUICK=1)
"""

from __future__ import annotations

import argparse
import os
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_ibprune as kib


def data(seed=0):
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (x[600:], y[600:]), (x[360:600], y[360:600]), (x[:360], y[:360])


def build_model():
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv"),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(64, activation="relu", name="fc"),
            L.Dense(10, name="logits"),
        ]
    )


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.85)
    p.add_argument("--epochs", type=int, default=None, help="total epochs (dense + pruning)")
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.quick else 16)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    (xtr, ytr), (xval, yval), (xte, yte) = data()

    # Wrap a freshly built model (kib.prune clones it; weights are kept).
    model = kib.prune(build_model())
    optimizer = keras.optimizers.Adam(2e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Dense for the first third of training, then ramp to the target by two thirds.
    begin = epochs // 3
    schedule = kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=begin,
                                   end_epoch=begin + max(1, epochs // 3))
    pruner = kib.Pruner(model, schedule, held_out=(xval, yval),  # IB score by default
                        log_information=True)
    pruner.reset()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    dataset = tf.data.Dataset.from_tensor_slices((xtr, ytr)).shuffle(2048, seed=0).batch(64)
    for epoch in range(epochs):
        losses = [float(train_step(x, y)) for x, y in dataset]
        updated = pruner.update(epoch + 1)  # masks change only when the schedule says so
        if not updated:
            pruner.rezero()
            pruner.measure()  # refresh the information-plane logs
        logs = pruner.logs()
        acc = float(np.mean(np.argmax(model.predict(xte, verbose=0), -1) == yte))
        print(f"epoch {epoch + 1:2d}: loss {np.mean(losses):.4f}, test accuracy {acc:.2%}, "
              f"sparsity {logs['sparsity']:.2%}" + (" (masks updated)" if updated else ""))
    pruner.rezero()

    final = kib.strip_pruning(model)
    print(kib.sparsity_summary(final))
    ity = {k: round(v, 3) for k, v in pruner.logs().items() if k.startswith("I_TY/")}
    print(f"I(T;Y) per layer at the end (nats): {ity}")
    acc = float(np.mean(np.argmax(final.predict(xte, verbose=0), -1) == yte))
    print(f"final test accuracy {acc:.2%} at sparsity {kib.sparsity(final):.2%}; "
          f"done in {time.perf_counter() - start:.0f}s")
    return {"accuracy": acc, "sparsity": kib.sparsity(final)}


if __name__ == "__main__":
    main()
