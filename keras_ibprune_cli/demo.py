"""`keras-ibprune demo`: train, IB-prune and strip a small CNN on scikit-learn's digits."""

from __future__ import annotations

import time

from keras_ibprune_cli import _common as C

NAME = 'demo'
HELP = "train, IB-prune and strip a small CNN on scikit-learn's digits"
EPILOG = None


def configure(p):
    p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity (default 0.9)")
    p.add_argument("--dense-epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--prune-epochs", type=int, default=12, help="pruning/fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args):
    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    (xtr, ytr), (xval, yval), (xte, yte) = C.digits(args.seed)
    print(
        f"keras-ibprune demo: scikit-learn digits, {len(xtr)} train / {len(xval)} held-out / "
        f"{len(xte)} test, target sparsity {args.sparsity:.0%}"
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = C.demo_model()
    dense.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=args.dense_epochs, verbose=0)
    dense_acc = C.accuracy(dense, xte, yte)
    print(f"[1/3] dense model trained ({args.dense_epochs} epochs): test accuracy {dense_acc:.2%}")

    ramp = max(1, args.prune_epochs // 2)
    schedule = kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp)

    def prune_and_strip(**callback_args):
        pruned = kib.prune(dense)
        pruned.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
        cb = kib.IBPruning(schedule, held_out=(xval, yval), **callback_args)
        pruned.fit(xtr, ytr, batch_size=64, epochs=args.prune_epochs, callbacks=[cb], verbose=0)
        return kib.strip_pruning(pruned)

    final = prune_and_strip(verbose=1)
    pruned_acc = C.accuracy(final, xte, yte)
    print("[2/3] pruned with IBPruning (information-bottleneck score) and stripped")
    baseline_acc = C.accuracy(prune_and_strip(score="magnitude", allocation="uniform"), xte, yte)

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
    print(
        f"same schedule with magnitude scores and uniform per-layer sparsity (tfmot's rule): "
        f"{baseline_acc:.2%}"
    )
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0 if np.isfinite(pruned_acc) else 1
