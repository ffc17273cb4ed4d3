"""Prune a model that arrives trained: one-shot IB pruning, then a short fine-tune.

The usual situation in practice: someone hands you a trained `.keras` file. Load it,
wrap it (`kib.prune` keeps the trained weights), prune it once to the target sparsity with
`kib.Pruner` + `kib.OneShot` (IB scores on a few hundred held-out samples), and fine-tune
a couple of epochs with the masks fixed. The same one-shot step with magnitude scores is
shown for comparison. Pass your own model with `--model FILE.keras --data FILE.npz`
(`x`, `y` arrays; a fifth of it is held out for scoring, a fifth for testing);
without them a digits CNN is trained first and saved, standing in for the download.

    python examples/pretrained_finetune.py
    python examples/pretrained_finetune.py --quick    # (or KIB_QUICK=1)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_ibprune as kib


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def make_pretrained(path, x, y, epochs):
    """Trains and saves the stand-in for a downloaded, trained model."""
    L = keras.layers
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        L.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
        L.MaxPooling2D(),
        L.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(128, activation="relu", name="fc"),
        L.Dense(10, name="logits"),
    ], name="pretrained_cnn")
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    model.save(path)


def one_shot(trained, sparsity, score, held_out):
    """Wrapped copy of `trained` with masks set once to `sparsity` by `score`."""
    pruned = kib.prune(trained)
    pruner = kib.Pruner(pruned, kib.OneShot(sparsity), score=score, held_out=held_out)
    pruner.reset()
    pruner.update(1)  # OneShot(epoch=0) prunes at progress 1
    return pruned, pruner


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained .keras model (default: train a stand-in)")
    p.add_argument("--data", help=".npz with x, y for --model")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="where to write the files (default: temp)")
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    finetune_epochs = args.finetune_epochs or (1 if args.quick else 3)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="kib-pretrained-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)

    if args.data:
        with np.load(args.data) as f:
            x, y = f["x"].astype("float32"), f["y"]
    else:
        d = load_digits()
        x, y = (d.images / 16.0).astype("float32")[..., None], d.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n = len(x) // 5
    (xte, yte), (xval, yval), (xtr, ytr) = (x[:n], y[:n]), (x[n:2 * n], y[n:2 * n]), (
        x[2 * n:], y[2 * n:])
    path = args.model
    if path is None:
        path = str(out_dir / "pretrained.keras")
        make_pretrained(path, xtr, ytr, epochs=4 if args.quick else 15)
    trained = keras.models.load_model(path)
    print(f"pretrained model {path}: test accuracy {accuracy(trained, xte, yte):.2%}")

    results = {}
    for score in ("magnitude", "ib"):
        pruned, pruner = one_shot(trained, args.sparsity, score, (xval, yval))
        after_cut = accuracy(pruned, xte, yte)
        # Fine-tune with the masks fixed (the wrappers mask the forward pass).
        pruned.compile(keras.optimizers.Adam(5e-4),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        pruned.fit(xtr, ytr, batch_size=64, epochs=finetune_epochs, verbose=0)
        pruner.rezero()  # the optimizer moved pruned weights: zero them again
        final = kib.strip_pruning(pruned)
        results[score] = (after_cut, accuracy(final, xte, yte), kib.sparsity(final))
        if score == "ib":
            final.save(out_dir / "pruned.keras")
            print(kib.sparsity_summary(final))

    print(f"\none-shot to {args.sparsity:.0%}, then {finetune_epochs} fine-tuning epoch(s)")
    print(f"{'score':<10} {'after one-shot':>15} {'after fine-tune':>16} {'sparsity':>9}")
    for score, (cut, tuned, sp) in results.items():
        print(f"{score:<10} {cut:>15.2%} {tuned:>16.2%} {sp:>9.2%}")
    print(f"wrote {out_dir / 'pruned.keras'}; done in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
