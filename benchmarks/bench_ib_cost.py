"""Cost of one IB mask update vs `model.predict` on the held-out batch and vs an epoch.

One "IB update" = what `IBPruning` does at an epoch end with the default score: the
compiled statistics pass over the held-out batch (forward, gradients of the sampled
log-likelihood w.r.t. every pre-activation, input Gram matrices), one factorization per
layer, the saliencies, the global threshold, the masks and the SparseGPT re-fit of the
survivors (the masks move from 40 % to 50 % sparsity so the re-fit really runs).

Settings: LeNet-5-Caffe on MNIST (8000 training samples per epoch, batch 64; digits when
MNIST is absent), MobileNetV2 (alpha 0.35, 96x96x3, 10 classes) and, with `--resnet50`,
ResNet50 (64x64x3, 10 classes), with random inputs and labels (only the cost is measured).
The peak resident memory of the process is reported after each setting. Held-out batch
1024. Medians over `--repeats` after a warm-up; the ratios are what matters (the machine is
shared and noisy).
Writes `results/ib_cost.md`.

Example:

    python benchmarks/bench_ib_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402
import keras  # noqa: E402

import keras_ibprune as kib  # noqa: E402


def _median(fn, repeats, setup=None):
    if setup:
        setup()
    fn()  # warm-up (tracing)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _update_cost(model, xh, yh, repeats):
    """Median seconds of one forced update from 40 % to 50 % sparsity (re-fit included)."""
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.5), held_out=(xh, yh))
    pruner.reset()
    pruner.update(1, force=True)
    weights = [(w.prunable_weights[0], w.prunable_weights[0].numpy()) for w in pruner.wrappers]

    def setup():  # back to 40 % sparse masks on the same weights
        pruner.schedule = kib.ConstantSparsity(0.4)
        for w in pruner.wrappers:
            for m in w.masks:
                m.assign(np.ones(m.shape, "float32"))
        for v, value in weights:
            v.assign(value)
        pruner.update(1, force=True)
        pruner.schedule = kib.ConstantSparsity(0.5)

    return _median(lambda: pruner.update(1, force=True), repeats, setup)


def lenet5(repeats, data_name):
    (x, y), _ = _data.load(data_name)
    x, y = x[:8000], y[:8000]
    keras.utils.set_random_seed(0)
    model = kib.prune(_data.build("lenet5", x.shape[1:]))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    xh, yh = x[:1024], y[:1024]
    t_predict = _median(lambda: model.predict(xh, batch_size=256, verbose=0), repeats)
    t_update = _update_cost(model, xh, yh, repeats)
    t_epoch = _median(lambda: model.fit(x, y, batch_size=64, epochs=1, verbose=0), 3)
    return {"setting": f"LeNet-5-Caffe, {data_name}, {len(x)} samples/epoch",
            "predict": t_predict, "update": t_update, "epoch": t_epoch,
            "peak_rss": _peak_rss()}


def _application(base, repeats, setting, size):
    model = kib.prune(base)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(1024, size, size, 3)).astype("float32")
    yh = rng.integers(0, 10, 1024)
    model.fit(xh[:256], yh[:256], batch_size=64, epochs=1, verbose=0)
    t_predict = _median(lambda: model.predict(xh, batch_size=256, verbose=0), repeats)
    t_update = _update_cost(model, xh, yh, repeats)
    return {"setting": setting, "predict": t_predict, "update": t_update, "epoch": None,
            "peak_rss": _peak_rss()}


def _peak_rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)


def mobilenet(repeats):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None,
                                          classes=10)
    return _application(base, repeats, "MobileNetV2 (alpha 0.35, 96 px), random data", 96)


def resnet50(repeats):
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10)
    return _application(base, repeats, "ResNet50 (64 px), random data", 64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist" if _data.mnist_available() else "digits")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-mobilenet", action="store_true")
    p.add_argument("--resnet50", action="store_true", help="also ResNet50 at 64 px (slow)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    rows = [lenet5(args.repeats, args.data)]
    if not args.skip_mobilenet:
        rows.append(mobilenet(args.repeats))
    if args.resnet50:
        rows.append(resnet50(args.repeats))
    lines = [
        "# Cost of one IB update",
        "",
        f"- Command: `python benchmarks/bench_ib_cost.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today().isoformat()}; machine: 2-core CPU, no GPU "
        f"({platform.machine()}); held-out batch 1024, `predict` with batch 256; medians of "
        f"{args.repeats}.",
        "",
        "| setting | predict | IB update | epoch | update / predict | update / epoch | "
        "peak RSS of the process so far |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        epoch = f"{r['epoch'] * 1e3:.0f} ms" if r["epoch"] else "–"
        share = f"{100 * r['update'] / r['epoch']:.1f} %" if r["epoch"] else "–"
        lines.append(f"| {r['setting']} | {r['predict'] * 1e3:.0f} ms | "
                     f"{r['update'] * 1e3:.0f} ms | {epoch} | "
                     f"{r['update'] / r['predict']:.2f}x | {share} | "
                     f"{r.get('peak_rss', _peak_rss()):.1f} GiB |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ib_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
