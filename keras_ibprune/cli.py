"""The `keras-ibprune` command line: `demo`, `summary` (more commands register here)."""

from __future__ import annotations

import argparse
import sys
import time

_COMMANDS = {}


def command(name, help_text):
    """Registers `fn(args)` as a sub-command; `fn.configure(parser)` adds its flags."""

    def deco(fn):
        _COMMANDS[name] = (fn, help_text)
        return fn

    return deco


def _digits(seed=0):
    """scikit-learn's digits (1797 8x8 images, shipped with the package): train/val/test."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_test, n_val = 360, 240
    return (
        (x[n_test + n_val :], y[n_test + n_val :]),
        (x[n_test : n_test + n_val], y[n_test : n_test + n_val]),
        (x[:n_test], y[:n_test]),
    )


def _demo_model():
    import keras

    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(),
            L.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(128, activation="relu", name="fc1"),
            L.Dense(10, name="logits"),
        ],
        name="digits_cnn",
    )


def _accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def _demo(args):
    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    (xtr, ytr), (xval, yval), (xte, yte) = _digits(args.seed)
    print(
        f"keras-ibprune demo: scikit-learn digits, {len(xtr)} train / {len(xval)} held-out / "
        f"{len(xte)} test, target sparsity {args.sparsity:.0%}"
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = _demo_model()
    dense.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=args.dense_epochs, verbose=0)
    dense_acc = _accuracy(dense, xte, yte)
    print(f"[1/3] dense model trained ({args.dense_epochs} epochs): test accuracy {dense_acc:.2%}")

    pruned = kib.prune(dense)
    pruned.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    ramp = max(1, args.prune_epochs // 2)
    cb = kib.IBPruning(
        kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp),
        held_out=(xval, yval),
        verbose=1,
    )
    pruned.fit(xtr, ytr, batch_size=64, epochs=args.prune_epochs, callbacks=[cb], verbose=0)
    final = kib.strip_pruning(pruned)
    pruned_acc = _accuracy(final, xte, yte)
    print(f"[2/3] pruned with IBPruning (score={type(cb.score).__name__}) and stripped")

    before, after = kib.sparsity_summary(dense), kib.sparsity_summary(final)
    print("[3/3] before / after")
    w = max(len(r["layer"]) for r in after.rows)
    print(
        f"{'layer':<{w}}  {'weights':>8}  {'nonzero before':>14}  {'nonzero after':>13}  "
        f"{'sparsity':>8}"
    )
    for rb, ra in zip(before.rows, after.rows):
        print(
            f"{ra['layer']:<{w}}  {ra['weights']:>8}  {rb['nonzero']:>14}  {ra['nonzero']:>13}  "
            f"{ra['sparsity']:>8.1%}"
        )
    print(
        f"{'total':<{w}}  {after.total_weights:>8}  {before.total_nonzero:>14}  "
        f"{after.total_nonzero:>13}  {after.sparsity:>8.1%}"
    )
    print(
        f"test accuracy: dense {dense_acc:.2%} -> pruned {pruned_acc:.2%} "
        f"({after.total_nonzero} of {after.total_weights} prunable weights kept, "
        f"{before.total_nonzero / max(after.total_nonzero, 1):.1f}x fewer)"
    )
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0 if np.isfinite(pruned_acc) else 1


def _demo_configure(p):
    p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity (default 0.9)")
    p.add_argument("--dense-epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--prune-epochs", type=int, default=12, help="pruning/fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed")


command("demo", "train, IB-prune and strip a small CNN on scikit-learn's digits")(_demo)
_demo.configure = _demo_configure


def _summary(args):
    import keras

    import keras_ibprune as kib

    model = _load_model(args.model)
    print(kib.sparsity_summary(model))
    del keras
    return 0


def _summary_configure(p):
    p.add_argument("model", help="path to a .keras model (wrapped or stripped)")


command("summary", "print the per-layer sparsity table of a .keras model")(_summary)
_summary.configure = _summary_configure


def _load_model(path):
    import os

    import keras

    if not os.path.isfile(path):
        raise SystemExit(f"error: model file not found. Expected a .keras file. Received: {path}")
    import keras_ibprune  # noqa: F401  (registers PruneWrapper for loading)

    return keras.models.load_model(path)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-ibprune",
        description="Information-bottleneck pruning for Keras 3.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure = getattr(fn, "configure", None)
        if configure:
            configure(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv=None):
    """Entry point of the `keras-ibprune` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    return args._fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
