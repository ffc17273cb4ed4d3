"""Cost of one IB mask update vs `model.predict` on the held-out batch and vs an epoch.

Setting: LeNet-5-Caffe on the MNIST 8000/2000 split (digits when MNIST is absent), held-out
batch of 1024 training samples, batch 64 training. One "IB update" = what `IBPruning`
does at an epoch end with the default IB score: one captured forward pass over the
held-out batch, the Gaussian statistics of every layer, the scores, the "ib" allocation
and the new masks. Medians over `--repeats` runs after one warm-up.

Example:

    python benchmarks/bench_ib_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
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


def _median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="mnist" if _data.mnist_available() else "digits")
    p.add_argument("--held-out", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    (x, y), _ = _data.load(args.data)
    keras.utils.set_random_seed(0)
    model = kib.prune(_data.build(args.model, x.shape[1:]))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # a trained-ish model, built
    xh, yh = x[: args.held_out], y[: args.held_out]

    t_predict = _median_time(lambda: model.predict(xh, batch_size=256, verbose=0), args.repeats)
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.5), held_out=(xh, yh))
    pruner.reset()
    t_update = _median_time(lambda: pruner.update(1, force=True), args.repeats)
    epoch = []
    for _ in range(3):
        t = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        epoch.append(time.perf_counter() - t)
    t_epoch = float(np.median(epoch[1:]))
    print(f"setting: {args.model} on {args.data}, held-out {len(xh)}, train {len(x)} "
          f"samples/epoch, batch 64, 2-core CPU")
    print(f"model.predict(held-out)      {t_predict * 1e3:8.1f} ms")
    print(f"one IB update                {t_update * 1e3:8.1f} ms")
    print(f"one training epoch           {t_epoch * 1e3:8.1f} ms")
    print(f"IB update / predict          {t_update / t_predict:8.2f}x   (bar: <= 3x)")
    print(f"IB update / epoch            {100 * t_update / t_epoch:8.1f} %   (bar: <= 10 %)")
    return t_update / t_predict, t_update / t_epoch


if __name__ == "__main__":
    main()
