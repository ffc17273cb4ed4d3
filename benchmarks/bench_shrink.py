"""Structured pruning + shrink: FLOPs, accuracy and TFLite latency, one process, side by side.

LeNet-5-Caffe (and a BatchNorm variant, so that the BN-γ score has γs to read) is trained
dense once; each unit score then fine-tunes a copy with channel masks under the same
schedule (`target="flops"`, 75 % of FLOPs removed -> 4x fewer), the model is shrunk and
exported to float TFLite. Latency: median single-thread interpreter time per inference,
dense and shrunk files measured in the same run. A small residual CNN with BN, Add and
Concatenate checks shrink exactness and TFLite agreement.

    python benchmarks/bench_shrink.py [--data mnist|digits] [--flops 0.75] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _data  # noqa: E402


def _lenet5_bn(input_shape, num_classes=10):
    import keras

    L = keras.layers
    pad = "valid" if input_shape[0] >= 28 else "same"
    inp = keras.Input(input_shape)
    h = L.Conv2D(20, 5, padding=pad, name="conv1")(inp)
    h = L.ReLU()(L.BatchNormalization(name="bn1")(h))
    h = L.MaxPooling2D(2)(h)
    h = L.Conv2D(50, 5, padding=pad, name="conv2")(h)
    h = L.ReLU()(L.BatchNormalization(name="bn2")(h))
    h = L.MaxPooling2D(2)(h)
    h = L.Flatten()(h)
    h = L.Dense(500, name="fc1")(h)
    h = L.ReLU()(L.BatchNormalization(name="bn3")(h))
    out = L.Dense(num_classes, activation="softmax", name="fc2")(h)
    return keras.Model(inp, out, name="lenet5_bn")


def _residual():
    import keras

    L = keras.layers
    inp = keras.Input((16, 16, 3))
    a = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="stem")(inp)))
    b = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="b1")(a)))
    h = L.Add()([a, b])
    c = L.Conv2D(8, 1, activation="relu", name="side")(h)
    h = L.Concatenate()([h, c])
    h = L.Conv2D(24, 3, strides=2, activation="relu", name="head")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(5, name="out")(h), name="residual_cnn")


def _acc(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), -1) == y))


def _latency(model, x, runs):
    from keras_ibprune.export import export_tflite

    with tempfile.TemporaryDirectory() as d:
        rep = export_tflite(model, os.path.join(d, "m.tflite"), sparse=False, verify=True,
                            verify_data=x[:64], latency_runs=runs, compare_dense=False)
    return rep.latency_ms, rep.top1_agreement


def run_model(name, build, xtr, ytr, xte, yte, args):
    import keras

    import keras_ibprune as kib

    keras.utils.set_random_seed(0)
    dense = build(xtr.shape[1:])
    dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    dense.fit(xtr, ytr, batch_size=128, epochs=args.dense_epochs, verbose=0)
    dense_acc = _acc(dense, xte, yte)
    dense_lat, _ = _latency(dense, xte, args.latency_runs)
    dense_flops = kib.count_flops(dense)
    rows = [(name, "dense", 1.0, dense_acc, dense_lat, 1.0, None)]
    nval = min(1000, len(xtr) // 8)
    for score in args.scores.split(","):
        pruned = kib.prune(dense, granularity="channel")
        pruned.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        sched = kib.PolynomialDecay(0.0, args.flops, 0, args.ramp)
        cb = kib.IBPruning(sched, score=score, target="flops", held_out=(xtr[-nval:], ytr[-nval:]))
        pruned.fit(xtr, ytr, batch_size=128, epochs=args.prune_epochs, callbacks=[cb], verbose=0)
        small = kib.shrink(pruned)
        diff = float(np.max(np.abs(small.predict(xte[:256], verbose=0)
                                   - pruned.predict(xte[:256], verbose=0))))
        lat, agree = _latency(small, xte, args.latency_runs)
        rows.append((name, score, dense_flops / kib.count_flops(small), _acc(small, xte, yte),
                     lat, dense_lat / lat, (diff, agree, small.count_params())))
    return rows


def residual_check():
    import keras

    import keras_ibprune as kib

    keras.utils.set_random_seed(1)
    pruned = kib.prune(_residual(), granularity="channel")
    x = np.random.default_rng(0).standard_normal((64, 16, 16, 3)).astype("float32")
    cb = kib.Pruner(pruned, kib.OneShot(0.5), score="random", target="flops")
    cb.reset()
    cb.update(1)
    small = kib.shrink(pruned)
    diff = float(np.max(np.abs(small.predict(x, verbose=0) - pruned.predict(x, verbose=0))))
    from keras_ibprune.export import export_tflite

    with tempfile.TemporaryDirectory() as d:
        rep = export_tflite(small, os.path.join(d, "r.tflite"), sparse=False, verify_data=x,
                            latency_runs=5, compare_dense=False)
    return diff, rep.max_abs_diff, kib.count_flops(pruned) / kib.count_flops(small)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist" if _data.mnist_available() else "digits")
    p.add_argument("--flops", type=float, default=0.75, help="fraction of FLOPs to remove")
    p.add_argument("--scores", default="ib,l1,bn_gamma,random")
    p.add_argument("--models", default="lenet5,lenet5_bn")
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=6)
    p.add_argument("--ramp", type=int, default=4)
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.prune_epochs, args.ramp, args.latency_runs = 2, 2, 1, 20
    (xtr, ytr), (xte, yte) = _data.load(args.data)
    builders = {"lenet5": lambda s: _data.lenet5(s), "lenet5_bn": _lenet5_bn}
    rows = []
    for m in args.models.split(","):
        rows += run_model(m, builders[m], xtr, ytr, xte, yte, args)
    diff, tfl, red = residual_check()
    print(f"# Structured pruning + shrink ({args.data}: {len(xtr)} train / {len(xte)} test; "
          f"{args.dense_epochs} dense + {args.prune_epochs} pruning epochs, ramp {args.ramp}, "
          f"target {args.flops:.0%} of FLOPs)")
    print(f"date: {datetime.date.today()}, machine: {platform.machine()} {os.cpu_count()} CPUs")
    print("command: python benchmarks/bench_shrink.py " + " ".join(argv or sys.argv[1:]))
    print("\n| model | unit score | FLOPs reduction | test acc | TFLite latency (ms) | "
          "speed-up | max abs(masked - shrunk) | params |")
    print("|---|---|---|---|---|---|---|---|")
    for model, score, red_f, acc, lat, speed, extra in rows:
        d = f"{extra[0]:.1e}" if extra else "-"
        n = f"{extra[2]}" if extra else "-"
        print(f"| {model} | {score} | {red_f:.2f}x | {acc:.2%} | {lat:.3f} | {speed:.2f}x | {d} | "
              f"{n} |")
    print(f"\nresidual CNN (BN, Add, Concatenate), 50 % FLOPs removed ({red:.2f}x): "
          f"max |masked - shrunk| = {diff:.2e}, max |Keras - TFLite| = {tfl:.2e}")


if __name__ == "__main__":
    main()
