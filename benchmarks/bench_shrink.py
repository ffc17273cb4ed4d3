"""Structured pruning + shrink: FLOPs, accuracy and TFLite latency, one process, side by side.

LeNet-5-Caffe (and a BatchNorm variant, so that the BN-γ score has γs to read) is trained
dense once per seed on the train split; each unit score then fine-tunes a copy with channel
masks under the same schedule (`target="flops"`, 75 % of FLOPs removed -> 4x fewer), with
the validation split as held-out data; the model is shrunk and exported to float TFLite.
Test accuracy: mean ± standard error over seeds. Latency: median single-thread interpreter
time per inference, dense and shrunk files measured in the same run (seed 0). A small
residual CNN with BN, Add and Concatenate checks shrink exactness and TFLite agreement.
Writes `results/shrink.md`.

    python benchmarks/bench_shrink.py [--data mnist|digits] [--flops 0.75] [--seeds 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
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


def run_model(name, build, data, args, seed):
    import keras

    import keras_ibprune as kib

    (xtr, ytr), (xval, yval), (xte, yte) = data
    keras.utils.set_random_seed(seed)
    dense = build(xtr.shape[1:])
    dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    dense.fit(xtr, ytr, batch_size=128, epochs=args.dense_epochs, verbose=0)
    dense_lat = _latency(dense, xte, args.latency_runs)[0] if seed == 0 else None
    dense_flops = kib.count_flops(dense)
    rows = [(name, "dense", 1.0, _acc(dense, xte, yte), dense_lat, 1.0, None)]
    for score in args.scores.split(","):
        pruned = kib.prune(dense, granularity="channel")
        pruned.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        sched = kib.PolynomialDecay(0.0, args.flops, 0, args.ramp)
        cb = kib.IBPruning(sched, score=score, target="flops", held_out=(xval, yval))
        pruned.fit(xtr, ytr, batch_size=128, epochs=args.prune_epochs, callbacks=[cb], verbose=0)
        small = kib.shrink(pruned)
        diff = float(np.max(np.abs(small.predict(xte[:256], verbose=0)
                                   - pruned.predict(xte[:256], verbose=0))))
        lat = _latency(small, xte, args.latency_runs)[0] if seed == 0 else None
        rows.append((name, score, dense_flops / kib.count_flops(small), _acc(small, xte, yte),
                     lat, (dense_lat / lat) if lat else None, (diff, small.count_params())))
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
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "shrink.md"))
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.prune_epochs, args.ramp, args.latency_runs = 2, 2, 1, 20
        args.seeds = 1
    data = _data.splits(args.data)
    builders = {"lenet5": lambda s: _data.lenet5(s), "lenet5_bn": _lenet5_bn}
    acc, info = {}, {}
    for seed in range(args.seeds):
        for m in args.models.split(","):
            for model, score, red_f, a, lat, speed, extra in run_model(m, builders[m], data,
                                                                       args, seed):
                acc.setdefault((model, score), []).append(a)
                if seed == 0:
                    info[(model, score)] = (red_f, lat, speed, extra)
                print(f"seed {seed} {model} {score}: test {a:.4f}", flush=True)
    diff, tfl, red = residual_check()
    (xtr, _), (xval, _), (xte, _) = data
    lines = [
        f"# Structured pruning + shrink ({args.data}: {len(xtr)} train / {len(xval)} "
        f"validation (held-out) / {len(xte)} test; {args.dense_epochs} dense + "
        f"{args.prune_epochs} pruning epochs, ramp {args.ramp}, target {args.flops:.0%} of "
        "FLOPs)",
        "",
        f"- Command: `python benchmarks/bench_shrink.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today()}; machine: {platform.machine()} {os.cpu_count()} "
        f"CPUs, no GPU. Test accuracy: mean ± standard error over seeds 0..{args.seeds - 1}; "
        "FLOPs, latency (median single-thread TFLite inference) and shrink error: seed 0.",
        "",
        "| model | unit score | FLOPs reduction | test acc (%) | TFLite latency (ms) | "
        "speed-up | max abs(masked - shrunk) | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, score), (red_f, lat, speed, extra) in info.items():
        v = 100 * np.asarray(acc[(model, score)])
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        d = f"{extra[0]:.1e}" if extra else "-"
        n = f"{extra[1]}" if extra else "-"
        lines.append(f"| {model} | {score} | {red_f:.2f}x | {v.mean():.2f} ± {se:.2f} | "
                     f"{lat:.3f} | {speed:.2f}x | {d} | {n} |")
    lines += ["", f"residual CNN (BN, Add, Concatenate), 50 % FLOPs removed ({red:.2f}x): "
              f"max |masked - shrunk| = {diff:.2e}, max |Keras - TFLite| = {tfl:.2e}"]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
