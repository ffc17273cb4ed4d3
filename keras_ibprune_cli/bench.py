"""`keras-ibprune bench`: a small benchmark on digits (overhead, accuracy, TFLite sizes)."""

from __future__ import annotations

import os
import time

from keras_ibprune_cli import _common as C

NAME = 'bench'
HELP = "a small benchmark on digits: training overhead, IB vs magnitude accuracy, TFLite sizes"
EPILOG = (
    "example:\n  keras-ibprune bench --sparsities 0.8,0.95 --json bench.json\n\n"
    "The full benchmarks (MNIST, tfmot side by side) are in benchmarks/ of the source tree."
)


def configure(p):
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95",
                   help="comma-separated target sparsities (default 0.5,0.8,0.9,0.95)")
    p.add_argument("--scores", default="ib,magnitude",
                   help="comma-separated scores to compare (default ib,magnitude)")
    p.add_argument("--dense-epochs", type=int, default=15, help="dense training epochs")
    p.add_argument("--epochs", type=int, default=6, help="pruning/fine-tuning epochs")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs for the overhead")
    p.add_argument("--no-export", action="store_true", help="skip the TFLite size table")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args):
    import json
    import statistics
    import tempfile

    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        sparsities = [-1.0]
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise C.CLIError(f"--sparsities must be comma-separated values in [0, 1). "
                       f"Received: {args.sparsities}")
    scores = [s.strip() for s in args.scores.split(",")]
    n_steps = 2 + len(scores) * len(sparsities) + (0 if args.no_export else 1)
    step = 0

    def progress(text):
        nonlocal step
        step += 1
        C.step(step, n_steps, text, start)

    keras.utils.set_random_seed(args.seed)
    (xtr, ytr), (xval, yval), (xte, yte) = C.digits(args.seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    print(f"keras-ibprune bench: digits CNN, {len(xtr)} train / {len(xval)} held-out / "
          f"{len(xte)} test; sparsities {sparsities}, scores {scores}")

    dense = C.demo_model()
    dense.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=args.dense_epochs, verbose=0)
    dense_acc = C.accuracy(dense, xte, yte)
    progress(f"dense model: test accuracy {dense_acc:.2%}")

    # Training overhead: epochs of the plain vs the wrapped model (+ callback), interleaved.
    plain = keras.models.clone_model(dense)
    plain.set_weights(dense.get_weights())
    plain.compile(keras.optimizers.Adam(1e-3), loss)
    wrapped = kib.prune(dense)
    wrapped.compile(keras.optimizers.Adam(1e-3), loss)
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), score="magnitude")
    times = {"plain": [], "wrapped": []}
    for r in range(args.rounds + 1):
        for name, m, cbs in (("plain", plain, []), ("wrapped", wrapped, [cb])):
            t0 = time.perf_counter()
            m.fit(xtr, ytr, batch_size=64, epochs=r + 1, initial_epoch=r, callbacks=cbs,
                  verbose=0, shuffle=False)
            if r:  # round 0 traces the train step
                times[name].append(time.perf_counter() - t0)
    overhead = statistics.median(times["wrapped"]) / statistics.median(times["plain"])
    progress(f"training overhead (wrapped + callback vs plain, median epoch): {overhead:.2f}x")

    results = {}
    models = {}
    ramp = max(1, (args.epochs + 1) // 2)
    for score in scores:
        for s in sparsities:
            keras.utils.set_random_seed(args.seed)
            pruned = kib.prune(dense)
            pruned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
            cb = kib.IBPruning(kib.PolynomialDecay(0.0, s, 0, ramp), score=score,
                               held_out=(xval, yval))
            t0 = time.perf_counter()
            pruned.fit(xtr, ytr, batch_size=64, epochs=args.epochs, callbacks=[cb], verbose=0)
            final = kib.strip_pruning(pruned)
            acc = C.accuracy(final, xte, yte)
            results[(score, s)] = acc
            models[(score, s)] = final
            progress(f"{score:>9} @ {s:.0%}: test accuracy {acc:.2%} "
                     f"(sparsity {kib.sparsity(final):.2%}, {time.perf_counter() - t0:.1f}s)")

    print(f"\naccuracy vs sparsity ({args.epochs} pruning/fine-tuning epochs from the same "
          f"dense weights; dense {dense_acc:.2%})")
    print("| sparsity | " + " | ".join(scores) + " |")
    print("|---|" + "---|" * len(scores))
    for s in sparsities:
        print(f"| {s:.0%} | " + " | ".join(f"{results[(sc, s)]:.2%}" for sc in scores) + " |")

    sizes = {}
    if not args.no_export:
        s_exp = min(sparsities, key=lambda s: abs(s - 0.9))
        final = models[(scores[0], s_exp)]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                f32 = kib.export_tflite(final, os.path.join(tmp, "f.tflite"), verify_data=xte,
                                    latency_runs=20)
                i8 = kib.export_tflite(final, os.path.join(tmp, "i.tflite"), quantize="int8",
                                   representative_data=xval, verify_data=xte,
                                   latency_runs=20, min_agreement=0.9)
        except kib.ExportVerificationError as err:
            progress(f"export of the {scores[0]} @ {s_exp:.0%} model not verified: {err}")
        else:
            sizes = {"float32 dense": f32.dense_bytes, "float32 sparse": f32.file_bytes,
                     "int8 dense": i8.dense_bytes, "int8 sparse": i8.file_bytes}
            progress(f"exported the {scores[0]} @ {s_exp:.0%} model")
            print(f"\nTFLite file sizes ({scores[0]} @ {s_exp:.0%}, bytes)")
            for k, v in sizes.items():
                print(f"  {k:<15} {v:>9,}")
            print(f"  latency (1 thread, batch 1): float32 sparse {f32.latency_ms:.3f} ms, "
                  f"int8 sparse {i8.latency_ms:.3f} ms")
    if args.json:
        out = {"dense_accuracy": dense_acc, "overhead": overhead,
               "accuracy": {f"{sc}@{s}": a for (sc, s), a in results.items()},
               "tflite_bytes": sizes}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0 if np.isfinite(dense_acc) else 1
